"""save/load: documented file format, bit-exact round trip, size, and a clear error for each kind of bad file."""
import hashlib
import json
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxquant as jq
from jaxquant import serialization
from jaxquant.models.fashion_cnn import FashionCNN, fusion_patterns
from jaxquant.serialization import CheckpointError, converted_template, load, save
from jaxquant.tools.size import model_arrays

from .conftest import build_fashion_cnn, images, minmax_qconfig


@pytest.fixture(scope="module")
def saved(cnn_models, tmp_path_factory):
    _, _, int8_model = cnn_models
    path = tmp_path_factory.mktemp("ckpt") / "cnn.jq"
    save(path, int8_model, qconfig=minmax_qconfig(), metadata={"note": "test"})
    return path


@pytest.fixture(scope="module")
def template():
    # Another seed and synthetic calibration: every array differs from the saved model's.
    prepared = jq.prepare(build_fashion_cnn(seed=7), minmax_qconfig())
    return converted_template(prepared, images(2, seed=9))


def _snapshot(model):
    return {k: v.copy() for k, v in model_arrays(model).items()}


def _assert_same_arrays(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _rewrite(src, dst, edit_header=None, version=None):
    """Re-serialise a checkpoint by hand (the documented layout) after editing its header."""
    blob = open(src, "rb").read()
    magic, file_version, hlen = struct.unpack_from("<8sIQ", blob, 0)
    header = json.loads(blob[20:20 + hlen])
    data = blob[20 + hlen:-32]
    if edit_header:
        edit_header(header)
    if version is not None:
        file_version = header["format_version"] = version
    hbytes = json.dumps(header).encode()
    body = struct.pack("<8sIQ", magic, file_version, len(hbytes)) + hbytes + data
    open(dst, "wb").write(body + hashlib.sha256(body).digest())


def test_round_trip_is_bit_exact(cnn_models, saved, template):
    _, _, int8_model = cnn_models
    x = images(5, seed=3)
    assert not np.array_equal(np.asarray(template(x)), np.asarray(int8_model(x)))
    loaded = load(saved, template, inplace=False)
    _assert_same_arrays(model_arrays(loaded), model_arrays(int8_model))
    # Outputs depend on the rebuilt QuantCache (packed weights), so this also checks the rebuild.
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(int8_model(x)))
    packed_saved = int8_model.fc1.packed.get_value()
    packed_loaded = loaded.fc1.packed.get_value()
    for a, b in zip(jax_leaves(packed_saved), jax_leaves(packed_loaded)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def jax_leaves(tree):
    import jax

    return jax.tree_util.tree_leaves(tree)


def test_file_layout_matches_the_documented_format(cnn_models, saved):
    _, _, int8_model = cnn_models
    blob = open(saved, "rb").read()
    magic, version, hlen = struct.unpack_from("<8sIQ", blob, 0)
    assert magic == b"JAXQUANT" and version == serialization.FORMAT_VERSION
    assert hashlib.sha256(blob[:-32]).digest() == blob[-32:]
    header = json.loads(blob[20:20 + hlen])
    assert header["metadata"] == {"note": "test"}
    assert "MinMaxObserver" in header["qconfig"]
    entries = {e["path"]: e for e in header["arrays"]}
    e = entries["fc1.weight_int8"]
    assert e["dtype"] == "int8" and e["offset"] % 64 == 0
    start = 20 + hlen + e["offset"]
    raw = np.frombuffer(blob[start:start + e["nbytes"]], np.int8).reshape(e["shape"])
    np.testing.assert_array_equal(raw, np.asarray(int8_model.fc1.weight_int8.get_value()))
    assert entries["fc1.weight_scale"]["dtype"] == "float32"
    assert entries["fc1.out_zero_point"]["dtype"] == "int32" and entries["fc1.out_zero_point"]["shape"] == []
    fc1 = header["modules"]["fc1"]
    assert fc1["type"] == "jaxquant.nn.quantized.linear.Linear"
    assert fc1["static"]["weight_qscheme"] == repr(int8_model.fc1.weight_qscheme) == "jaxquant.per_channel_affine"
    assert fc1["static"]["relu"] is True
    # QuantCache (packed layouts) is rebuilt at load, not stored.
    assert not any(p.startswith("fc1.packed") for p in entries)


def test_int8_checkpoint_is_at_most_027_of_the_float_one(cnn_models, tmp_path):
    float_model, _, int8_model = cnn_models
    n_int8 = save(tmp_path / "q.jq", int8_model)
    n_float = save(tmp_path / "f.jq", float_model)
    assert n_int8 == (tmp_path / "q.jq").stat().st_size
    assert n_int8 <= 0.27 * n_float, (n_int8, n_float)


def test_float_model_round_trip(cnn_models, tmp_path):
    float_model, _, _ = cnn_models
    save(tmp_path / "f.jq", float_model)
    other = build_fashion_cnn(seed=3)
    load(tmp_path / "f.jq", other)
    _assert_same_arrays(model_arrays(other), model_arrays(float_model))


def _expect_failure(path, model, match):
    before = _snapshot(model)
    with pytest.raises(CheckpointError, match=match):
        load(path, model)
    _assert_same_arrays(model_arrays(model), before)


def test_truncated_file(saved, template, tmp_path):
    blob = open(saved, "rb").read()
    for cut in (len(blob) - 100, 30, 10):
        (tmp_path / "t.jq").write_bytes(blob[:cut])
        _expect_failure(tmp_path / "t.jq", template, "truncated")


def test_flipped_byte_fails_checksum(saved, template, tmp_path):
    blob = bytearray(open(saved, "rb").read())
    blob[len(blob) // 2] ^= 0x10
    (tmp_path / "c.jq").write_bytes(bytes(blob))
    _expect_failure(tmp_path / "c.jq", template, "checksum")


def test_wrong_version(saved, template, tmp_path):
    _rewrite(saved, tmp_path / "v.jq", version=99)
    _expect_failure(tmp_path / "v.jq", template, "format version 99")


def test_not_a_checkpoint(template, tmp_path):
    (tmp_path / "x.jq").write_bytes(b"PK\x03\x04" + bytes(100))
    _expect_failure(tmp_path / "x.jq", template, "not a jaxquant checkpoint")


def test_missing_key(saved, template, tmp_path):
    def drop(header):
        header["arrays"] = [e for e in header["arrays"] if e["path"] != "fc1.bias"]
    _rewrite(saved, tmp_path / "m.jq", drop)
    _expect_failure(tmp_path / "m.jq", template, r"array 'fc1.bias' is in the model, not in the checkpoint \(missing key\)")


def test_wrong_dtype(saved, template, tmp_path):
    def retype(header):
        for e in header["arrays"]:
            if e["path"] == "fc1.weight_int8":
                e["dtype"] = "uint8"
    _rewrite(saved, tmp_path / "d.jq", retype)
    _expect_failure(tmp_path / "d.jq", template, "'fc1.weight_int8': dtype uint8 in the checkpoint, int8 in the model")

    def objectify(header):
        header["arrays"][0]["dtype"] = "object"
    _rewrite(saved, tmp_path / "o.jq", objectify)
    _expect_failure(tmp_path / "o.jq", template, "unsupported dtype 'object'")


def test_different_architecture(cnn_models, saved, tmp_path):
    float_model, _, _ = cnn_models
    # A float model of another width: same paths, other shapes.
    save(tmp_path / "w8.jq", float_model)
    narrow = build_fashion_cnn(seed=0, width=4)
    _expect_failure(tmp_path / "w8.jq", narrow, r"'fc1.linear.kernel': shape \[784, 128\] in the checkpoint, \[392, 128\]")
    # An int8 checkpoint into the float model: module types and paths differ.
    _expect_failure(saved, float_model, r"module 'fc1' is a jaxquant.nn.quantized.linear.Linear in the checkpoint, "
                                        r"a jaxquant.nn.intrinsic.LinearReLU in the model")
    # Unfused float model: fc1.linear exists only in the checkpoint.
    unfused = FashionCNN(width=8, rngs=nnx.Rngs(0))
    _expect_failure(tmp_path / "w8.jq", unfused, "module 'fc1.linear'")


def test_static_config_mismatch(saved, template, tmp_path):
    def unrelu(header):
        header["modules"]["fc1"]["static"]["relu"] = False
    _rewrite(saved, tmp_path / "s.jq", unrelu)
    _expect_failure(tmp_path / "s.jq", template, "module 'fc1': relu = False in the checkpoint, True in the model")


def test_rebuild_cache_refuses_unknown_cache_holders():
    from jaxquant.nn.variables import QuantCache

    class Custom(nnx.Module):
        def __init__(self):
            self.cache = QuantCache(jnp.zeros(3))

    class Outer(nnx.Module):
        def __init__(self):
            self.inner = Custom()

    with pytest.raises(TypeError, match="'inner': .*Custom holds a QuantCache"):
        serialization.rebuild_cache(Outer())


def test_orbax_round_trip_of_converted_state(cnn_models, template, tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    _, _, int8_model = cnn_models
    state = nnx.state(int8_model, nnx.Not(nnx.RngState))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "orbax", state)
    target = nnx.clone(template)
    abstract = nnx.state(target, nnx.Not(nnx.RngState))
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(tmp_path / "orbax", abstract)
    nnx.update(target, restored)
    _assert_same_arrays(model_arrays(target), model_arrays(int8_model))
    x = images(3, seed=4)
    np.testing.assert_array_equal(np.asarray(target(x)), np.asarray(int8_model(x)))


@pytest.mark.slow
def test_converted_template_of_a_qat_model(tmp_path):
    """A QAT checkpoint loads into a template built from an untrained prepare_qat model."""
    import optax

    def qat_int8(seed, steps):
        float_model = FashionCNN(width=8, rngs=nnx.Rngs(seed))
        model = jq.prepare_qat(jq.fuse_modules_qat(float_model, fusion_patterns(float_model)),
                               jq.get_default_qat_qconfig("x86"))
        opt = nnx.Optimizer(model, optax.sgd(1e-2), wrt=nnx.Param)
        x, labels = images(8, seed=seed), jnp.arange(8) % 10
        for _ in range(steps):
            grads = nnx.grad(lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), labels).mean())(model)
            opt.update(model, grads)
        return model

    trained = qat_int8(0, steps=1)
    trained.eval()
    int8_model = jq.convert(trained)
    save(tmp_path / "qat.jq", int8_model)
    untrained = qat_int8(5, steps=0)
    before = _snapshot(untrained)
    template = converted_template(untrained, images(2, seed=9))
    _assert_same_arrays(_snapshot(untrained), before)  # the prepared model is not modified
    loaded = load(tmp_path / "qat.jq", template)
    x = images(4, seed=3)
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(int8_model(x)))
