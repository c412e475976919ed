"""jq.save / jq.load of graph-mode int8 programs: bit-for-bit round trips (static with conv, BatchNorm,
residual add and max-pool; dynamic with activation x activation dots; weight-only), the structure rebuilt
by re-capturing the function, and clear errors when the function or the file does not fit."""
import json
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxquant as jq
from jaxquant.serialization import CheckpointError


class SmallCNN(nnx.Module):
    """Conv -> BatchNorm -> relu -> max-pool, a residual add of two int8 values, a clipped Dense."""

    def __init__(self, rngs):
        self.conv1 = nnx.Conv(1, 4, (3, 3), use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(4, use_running_average=True, rngs=rngs)
        self.conv2 = nnx.Conv(4, 4, (3, 3), rngs=rngs)
        self.fc = nnx.Linear(4 * 4 * 4, 5, rngs=rngs)

    def __call__(self, x):
        h = jax.nn.relu(self.bn(self.conv1(x)))
        h = nnx.max_pool(h, (2, 2), (2, 2))
        h = h + self.conv2(h)
        return jax.nn.relu6(self.fc(h.reshape(h.shape[0], -1)))


def _cnn(seed=0):
    model = SmallCNN(nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    model.bn.var.set_value(jnp.asarray(rng.uniform(0.5, 2.0, 4), jnp.float32))
    model.bn.mean.set_value(jnp.asarray(rng.normal(0, 0.1, 4), jnp.float32))
    return model


def _x(n=3, seed=1):
    return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, (n, 8, 8, 1)), jnp.float32)


def attention(params, x):
    q, k, v = (x @ params[n] for n in ("wq", "wk", "wv"))
    p = jax.nn.softmax(jnp.einsum("btd,bsd->bts", q, k) / 4.0, axis=-1)
    return jnp.einsum("bts,bsd->btd", p, v) @ params["wo"]


def _attn_params(seed=0):
    rng = np.random.default_rng(seed)
    return {n: jnp.asarray(rng.normal(0, 0.3, (8, 8)), jnp.float32) for n in ("wq", "wk", "wv", "wo")}


@pytest.fixture(scope="module")
def static_cnn():
    model, x = _cnn(), _x()
    observed = jq.graph.prepare(model, x, jq.default_per_channel_qconfig)  # min/max: a fast calibration
    state = jq.graph.calibrate(observed, [x, _x(seed=2)], progress=False)
    return model, x, jq.graph.convert(observed, state)


def test_static_program_round_trip_is_bit_identical(tmp_path, static_cnn):
    model, x, qprog = static_cnn
    assert len(qprog.plan.requant) == 1 and qprog.plan.passthrough  # the add requantizes; max-pool passes int8
    path = tmp_path / "cnn.jq"
    jq.save(path, qprog, metadata={"note": "graph"})
    # a fresh model of the same class with other weights: only the structure comes from it
    loaded = jq.load(path, _cnn(seed=5), _x())
    assert isinstance(loaded, jq.graph.QuantizedProgram)
    for leaf_a, leaf_b in zip(jax.tree_util.tree_leaves(qprog.params), jax.tree_util.tree_leaves(loaded.params)):
        np.testing.assert_array_equal(np.asarray(leaf_a), np.asarray(leaf_b))
    # through the serving path, at another batch size (re-captured at the new shape)
    xi = _x(5, seed=5)
    np.testing.assert_array_equal(np.asarray(jq.compile(loaded)(xi)), np.asarray(qprog(xi)))
    header = jq.serialization.read_checkpoint(path).header
    assert header["format"] == "jaxquant.graph_program" and header["metadata"] == {"note": "graph"}


def test_dynamic_and_weight_only_round_trip(tmp_path):
    params, x = _attn_params(), jnp.asarray(np.random.default_rng(3).normal(size=(2, 5, 8)), jnp.float32)
    dyn = jq.graph.quantize_dynamic(attention, (params, x))
    assert sum(1 for i in dyn.static if i != "acts" and dyn.analysis.units[i].kind == "matmul") == 2
    wo = jq.graph.quantize_weight_only(attention, (params, x))
    for name, prog in (("dyn", dyn), ("wo", wo)):
        jq.save(tmp_path / f"{name}.jq", prog)
        other = jax.tree_util.tree_map(jnp.zeros_like, params)  # values never read: shapes only
        loaded = jq.load(tmp_path / f"{name}.jq", attention, (other, x))
        assert loaded.mode == prog.mode
        np.testing.assert_array_equal(np.asarray(jax.jit(loaded.apply)(loaded.params, x)), np.asarray(prog(x)))
    # jax.export and the per-op SQNR debugger work on a loaded program (activation x activation dots too)
    exported = jax.export.deserialize(jax.export.export(jax.jit(loaded.apply))(loaded.params, x).serialize())
    np.testing.assert_array_equal(np.asarray(exported.call(loaded.params, x)), np.asarray(prog(x)))
    rows = jq.graph.compare(jq.load(tmp_path / "dyn.jq", attention, (params, x)), params, x)
    assert [p for p, _ in rows if "matmul" in p] and rows[-1][0] == "output"
    assert all(s > 15 for _, s in rows), rows  # dB


def test_load_refuses_a_changed_function_naming_the_op(tmp_path):
    params, x = _attn_params(), jnp.ones((2, 5, 8), jnp.float32)
    jq.save(tmp_path / "a.jq", jq.graph.quantize_dynamic(attention, (params, x)))

    def changed(params, x):  # one more op (a relu after the scores)
        q, k, v = (x @ params[n] for n in ("wq", "wk", "wv"))
        p = jax.nn.softmax(jax.nn.relu(jnp.einsum("btd,bsd->bts", q, k)) / 4.0, axis=-1)
        return jnp.einsum("bts,bsd->btd", p, v) @ params["wo"]

    with pytest.raises(CheckpointError, match=r"does not fit this function.*differ from op \d+ at '"):
        jq.load(tmp_path / "a.jq", changed, (params, x))
    with pytest.raises(CheckpointError, match="example_args"):
        jq.load(tmp_path / "a.jq", attention)
    with pytest.raises(CheckpointError, match="NNX model checkpoint"):  # an NNX file given a function
        model = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
        jq.save(tmp_path / "m.jq", model)
        jq.load(tmp_path / "m.jq", attention, (params, x))


def _rewrite_header(path, edit):
    """Edit the JSON header and re-seal the checksum (a crafted file, valid container)."""
    import hashlib

    blob = path.read_bytes()
    magic, version, hlen = struct.unpack_from("<8sIQ", blob, 0)
    header = json.loads(blob[20:20 + hlen])
    edit(header)
    hb = json.dumps(header).encode()
    body = struct.pack("<8sIQ", magic, version, len(hb)) + hb + blob[20 + hlen:-32]
    path.write_bytes(body + hashlib.sha256(body).digest())


def test_load_refuses_arrays_that_do_not_fit(tmp_path, static_cnn):
    model, x, qprog = static_cnn
    path = tmp_path / "cnn.jq"
    jq.save(path, qprog)

    def bad_shape(h):  # claim a conv weight of another shape (bytes re-sized consistently)
        e = next(e for e in h["arrays"] if e["path"].endswith(".w_q"))
        e["shape"] = [e["nbytes"]]

    _rewrite_header(path, bad_shape)
    with pytest.raises(CheckpointError, match=r"w_q' has shape"):
        jq.load(path, _cnn(), x)
    jq.save(path, qprog)
    _rewrite_header(path, lambda h: h["graph"].update(mode="exec"))
    with pytest.raises(CheckpointError, match="mode 'exec'"):
        jq.load(path, _cnn(), x)
    jq.save(path, qprog)
    _rewrite_header(path, lambda h: h["graph"]["units"].update({"99999": {"mode": "static"}}))
    with pytest.raises(CheckpointError, match="not a dot/conv"):
        jq.load(path, _cnn(), x)
