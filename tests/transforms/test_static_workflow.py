"""prepare / calibrate / convert behaviour: state as data, no retrace, errors that name the module."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxquant as jq
import jaxquant.nn as jqnn
from jaxquant.nn.variables import QuantStats
from testkit.small_models import SmallMLP as Small, minmax_qconfig as _qconfig


def _data(n=4, seed=0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.normal(size=(8, 6)).astype(np.float32)) for _ in range(n)]


def test_prepare_returns_new_model_with_separable_observer_state():
    model = Small(nnx.Rngs(0))
    prepared = jq.prepare(model, _qconfig())
    assert isinstance(model.fc1, nnx.Linear), "prepare(inplace=False) must not touch the input model"
    _, params, stats, _ = nnx.split(prepared, nnx.Param, QuantStats, ...)
    stat_paths = {".".join(map(str, p)) for p, _ in stats.flat_state()}
    assert any(p.startswith("fc1.activation_post_process") for p in stat_paths)
    assert any(p.startswith("quant.activation_post_process") for p in stat_paths)
    # Params are the float model's, unchanged.
    np.testing.assert_array_equal(prepared.fc1.module.kernel.get_value(), model.fc1.kernel.get_value())


def test_calibrate_compiles_once_and_matches_reference_minmax():
    model = Small(nnx.Rngs(0))
    prepared = jq.prepare(model, _qconfig())
    traces = []

    def forward(m, batch):
        traces.append(1)
        return m(batch)

    data = _data(5)
    jq.calibrate(prepared, data, forward, progress=False)
    assert len(traces) == 1, "calibration must reuse one compiled step for same-shaped batches"
    # The input observer saw every batch: min/max of all data, as a hand-computed reference.
    all_x = np.concatenate([np.asarray(d) for d in data])
    lo, hi = min(all_x.min(), 0.0), max(all_x.max(), 0.0)
    scale, zp = prepared.quant.activation_post_process.calculate_qparams()
    expected_scale = np.float32(np.float32(hi) - np.float32(lo)) / np.float32(127)
    assert np.isclose(float(scale), expected_scale, rtol=1e-6)
    assert int(zp) == int(np.clip(0 - np.round(np.float32(lo) / np.float32(scale)), 0, 127))


def test_plain_jax_jit_loop_over_split_state():
    model = Small(nnx.Rngs(0))
    reference = jq.prepare(model, _qconfig())
    jq.calibrate(reference, _data(3), progress=False)

    prepared = jq.prepare(model, _qconfig())
    graphdef, stats, rest = nnx.split(prepared, QuantStats, ...)

    @jax.jit
    def step(stats, x):
        m = nnx.merge(graphdef, stats, rest)
        m(x)
        return nnx.state(m, QuantStats)

    for x in _data(3):
        stats = step(stats, x)
    nnx.update(prepared, stats)
    a = reference.fc1.activation_post_process.calculate_qparams()
    b = prepared.fc1.activation_post_process.calculate_qparams()
    assert float(a[0]) == float(b[0]) and int(a[1]) == int(b[1])


def test_converted_model_has_no_float_weights_and_runs_integer_dots():
    model = Small(nnx.Rngs(0))
    prepared = jq.prepare(model, _qconfig())
    jq.calibrate(prepared, _data(2), progress=False)
    converted = jq.convert(prepared)
    assert not list(nnx.state(converted, nnx.Param).flat_state()), "a converted model keeps no float Params"
    assert converted.fc1.weight().int_repr().dtype == jnp.int8
    x = _data(1)[0]
    with jq.use_native(False):  # the pure-XLA kernels (tests/native checks the native backend against them)
        hlo = jax.jit(lambda x: converted(x)).lower(x).as_text()
    # u8 x s8 -> s32 dot_general, no float matmul.
    assert re.search(r"dot_general.*tensor<\w*xui8>.*tensor<\w*xi8>.*->\s*tensor<\w*xi32>", hlo) or \
        re.search(r"stablehlo.dot_general[^\n]*ui8[^\n]*i8[^\n]*i32", hlo), hlo[:2000]
    assert not re.search(r"dot_general[^\n]*xf32>, tensor<[^\n]*xf32>", hlo)


def test_qconfig_none_keeps_subtree_float():
    model = Small(nnx.Rngs(0))
    mapping = jq.QConfigMapping().set_global(_qconfig()).set_module_name("head", None)
    prepared = jq.prepare(model, mapping)
    assert isinstance(prepared.head, nnx.Linear)
    jq.calibrate(prepared, _data(2), progress=False)
    converted = jq.convert(prepared)
    assert isinstance(converted.head, nnx.Linear)
    assert isinstance(converted.fc1, jqnn.quantized.Linear)


def test_inplace_prepare_and_convert():
    model = Small(nnx.Rngs(0))
    out = jq.prepare(model, _qconfig(), inplace=True)
    assert out is model and not isinstance(model.fc1, nnx.Linear)
    jq.calibrate(model, _data(2), progress=False)
    assert jq.convert(model, inplace=True) is model
    assert isinstance(model.fc1, jqnn.quantized.Linear)


def test_unsupported_module_with_qconfig_names_path():
    class WithEmbed(nnx.Module):
        def __init__(self, rngs):
            self.quant = jqnn.QuantStub()
            self.embed = nnx.Embed(10, 4, rngs=rngs)

    model = WithEmbed(nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"'embed'.*no static quantized counterpart.*set_module_name"):
        jq.prepare(model, _qconfig())


def test_float_input_without_quantstub_is_a_clear_error():
    model = Small(nnx.Rngs(0), with_stub=False)
    prepared = jq.prepare(model, _qconfig())
    jq.calibrate(prepared, _data(2), progress=False)
    converted = jq.convert(prepared)
    with pytest.raises(TypeError, match=r"'fc1'.*insert a QuantStub"):
        converted(_data(1)[0])


def test_convert_with_uncalibrated_observer_names_path_and_leaves_model_untouched():
    model = Small(nnx.Rngs(0))
    prepared = jq.prepare(model, _qconfig())
    with pytest.raises(ValueError, match=r"fc1|quant"):
        jq.convert(prepared, inplace=True)
    assert isinstance(prepared.fc1, jqnn.observed.Observed), "a failed convert must not half-convert the model"


def test_calibrating_with_nan_names_the_observer():
    model = Small(nnx.Rngs(0))
    prepared = jq.prepare(model, _qconfig())
    bad = _data(2)
    bad[1] = bad[1].at[0, 0].set(jnp.nan)
    with pytest.raises(ValueError, match=r"quant.*(NaN|nan|non-finite)"):
        jq.calibrate(prepared, bad, progress=False)


def test_quantized_activation_into_float_op_is_a_clear_error():
    q = jq.quantize_per_tensor(jnp.ones(3), 0.1, 0, jq.quint8)
    with pytest.raises(TypeError, match="DeQuantStub"):
        jnp.tanh(q)


def test_quantize_one_call_equals_prepare_calibrate_convert():
    model = Small(nnx.Rngs(0))
    data = _data(2)
    a = jq.quantize(model, lambda m, xs: jq.calibrate(m, xs, progress=False), (data,), _qconfig())
    p = jq.prepare(model, _qconfig())
    jq.calibrate(p, data, progress=False)
    b = jq.convert(p)
    x = _data(1, seed=3)[0]
    np.testing.assert_array_equal(np.asarray(a(x)), np.asarray(b(x)))
