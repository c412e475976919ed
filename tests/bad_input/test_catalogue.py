"""The bad-input catalogue (docs/bad_input_catalogue.md): one test per entry.

Each entry feeds one kind of bad input to one place of the library and checks that the error names
the place and says what to do, and that the user's model and data are left as they were. Entries
where the library does not give a clear error yet are ``xfail(strict=True)``: they document the
gap and start failing (XPASS) the day it is fixed, so the mark gets removed.
Test ids: P primitives, O observers, Q qconfig, T transforms (prepare/fuse), C calibration,
V convert, I inference, L load, K kernels.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxquant as jq
import jaxquant.nn as jqnn
from jaxquant.nn.variables import QuantParams
from jaxquant.qtensor import QTensor, quantize_per_group, quint8
from jaxquant.observers import NotCalibratedError
from testkit.small_models import SmallMLP as Small, minmax_qconfig as _qconfig


def _data(n=2, k=6, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(8, k)).astype(np.float32) for _ in range(n)]


def _calibrated(seed=0, k=6):
    prepared = jq.prepare(Small(nnx.Rngs(seed), d_in=k), _qconfig())
    return jq.calibrate(prepared, [jnp.asarray(d) for d in _data(k=k, seed=seed)], progress=False)


def _snapshot(model):
    """Structure and every array of a model, to check that a failed call left it untouched."""
    graphdef, state = nnx.split(model)
    return graphdef, [np.array(a) for a in jax.tree.leaves(state)]


def _assert_untouched(model, snap):
    graphdef, leaves = _snapshot(model)
    assert graphdef == snap[0], "the model's structure changed"
    assert len(leaves) == len(snap[1])
    for a, b in zip(leaves, snap[1]):
        np.testing.assert_array_equal(a, b)


def _raises(exc, *needles):
    """pytest.raises whose message must contain every needle (case-insensitive regex)."""
    return pytest.raises(exc, match="(?is)" + "".join(f"(?=.*{n})" for n in needles))


X = np.linspace(-1, 1, 8, dtype=np.float32)

# ------------------------------------------------------------------------------ primitives


def test_P01_quantize_integer_input():
    with _raises(TypeError, "quantize_per_tensor", "floating-point"):
        jq.quantize_per_tensor(np.arange(4), 0.1, 0, jq.quint8)


def test_P02_quantize_with_a_numpy_dtype_instead_of_a_qdtype():
    with _raises(TypeError, "quantize_per_tensor", "qint8"):
        jq.quantize_per_tensor(X, 0.1, 0, jnp.int8)


@pytest.mark.parametrize("scale", [0.0, -0.1, float("nan"), 7e-39])
def test_P03_quantize_with_zero_negative_or_nan_scale(scale):
    with _raises(ValueError, "quantize_per_tensor", "scale"):
        jq.quantize_per_tensor(X, scale, 0, jq.quint8)


def test_P04_zero_point_outside_dtype_range():
    with _raises(ValueError, "zero_point", "255"):
        jq.quantize_per_tensor(X, 0.1, 300, jq.quint8)


def test_P05_quantize_nan_input():
    x = X.copy()
    x[0] = np.nan
    with _raises(ValueError, "quantize_per_tensor", "NaN"):
        jq.quantize_per_tensor(x, 0.1, 3, jq.quint8)


def test_P06_quantize_per_channel_axis_out_of_range():
    with _raises(ValueError, "quantize_per_channel", "axis 2"):
        jq.quantize_per_channel(np.ones((3, 4), np.float32), np.ones(4), np.zeros(4, np.int32), 2)


def test_P07_quantize_per_channel_wrong_number_of_scales():
    with _raises(ValueError, "quantize_per_channel", "expected 4 scales"):
        jq.quantize_per_channel(np.ones((3, 4), np.float32), np.ones(3), np.zeros(3, np.int32), 1)


def test_P08_dequantize_a_float_array():
    with _raises(TypeError, "dequantize", "QTensor"):
        jq.dequantize(jnp.asarray(X))


def test_P09_quantized_tensor_into_a_float_op():
    q = jq.quantize_per_tensor(X, 0.1, 3, jq.quint8)
    with _raises(TypeError, "float operation", "DeQuantStub"):
        jnp.sin(q)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_P10_choose_qparams_nonfinite(bad):
    x = X.copy()
    x[3] = bad
    with _raises(ValueError, "choose_qparams", "NaN|Inf|finite"):
        scale, _ = jq.choose_qparams(jnp.asarray(x))
        assert np.isfinite(float(scale))


def test_P11_choose_qparams_empty():
    with _raises(ValueError, "choose_qparams", "empty"):
        jq.choose_qparams(jnp.zeros((0, 4)))


def test_P12_per_tensor_accessor_on_per_channel_tensor():
    q = jq.quantize_per_channel(np.ones((3, 4), np.float32), np.ones(4), np.zeros(4, np.int32), 1)
    with _raises(ValueError, "q_scale", "q_per_channel"):
        q.q_scale()


# ------------------------------------------------------------------------------- observers


def test_O01_per_tensor_observer_given_per_channel_scheme():
    with _raises(ValueError, "MinMaxObserver", "PerChannelMinMaxObserver"):
        jq.MinMaxObserver(qscheme=jq.per_channel_affine)


def test_O02_quant_min_without_quant_max():
    with _raises(ValueError, "quant_min", "both"):
        jq.MinMaxObserver(quant_min=0)


def test_O03_custom_range_wider_than_dtype():
    with _raises(ValueError, "MinMaxObserver", r"\[0, 300\]", "quint8"):
        jq.MinMaxObserver(quant_min=0, quant_max=300)


def test_O04_observer_fed_integers():
    obs = jq.MinMaxObserver()
    with _raises(TypeError, "MinMaxObserver", "floating-point"):
        obs.update(obs.init(), jnp.arange(4))


def test_O05_per_channel_observer_init_without_shape():
    with _raises(ValueError, "PerChannelMinMaxObserver", "init"):
        jq.PerChannelMinMaxObserver().init()


def test_O06_per_channel_observer_channel_count_changes():
    obs = jq.PerChannelMinMaxObserver(ch_axis=0)
    state = obs.init((4, 3))
    with _raises(ValueError, "5 channels", "re-run init"):
        obs.update(state, jnp.ones((5, 3)))


def test_O07_qparams_before_any_data():
    obs = jq.MinMaxObserver()
    with _raises(NotCalibratedError, "not observed any data"):
        obs.calculate_qparams(obs.init())


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_O08_nonfinite_values_observed(bad):
    obs = jq.HistogramObserver(bins=32)
    x = X.copy()
    x[2] = bad
    state = obs.update(obs.init(), jnp.asarray(x))
    assert np.isfinite(np.asarray(state.histogram)).all() and np.isfinite(float(state.min_val))
    with _raises(NotCalibratedError, "NaN/Inf", "calibration data"):
        obs.calculate_qparams(state)


def test_O09_empty_batch_observed():
    obs = jq.MinMaxObserver()
    state = obs.update(obs.init(), jnp.zeros((0, 6)))
    assert int(state.num_batches) == 0
    with _raises(NotCalibratedError, "not observed any data"):
        obs.calculate_qparams(state)


def test_O10_histogram_with_zero_bins():
    with _raises(ValueError, "HistogramObserver", "bins"):
        jq.HistogramObserver(bins=0)


def test_O11_moving_average_constant_out_of_range():
    with _raises(ValueError, "averaging_constant", r"\(0, 1\]"):
        jq.MovingAverageMinMaxObserver(averaging_constant=1.5)


def test_O12_range_wider_than_float32():
    obs = jq.MinMaxObserver()
    state = obs.update(obs.init(), jnp.asarray([-3e38, 3e38], jnp.float32))
    with _raises(ValueError, "MinMaxObserver", "range"):
        scale, _ = obs.calculate_qparams(state)
        assert np.isfinite(float(scale))


# --------------------------------------------------------------------------------- qconfig


def test_Q01_qconfig_given_an_observer_instance():
    with _raises(ValueError, "observer instance", "with_args"):
        jq.QConfig(activation=jq.MinMaxObserver(), weight=jq.default_weight_observer)


def test_Q02_unknown_backend():
    with _raises(ValueError, "bogus", "x86"):
        jq.get_default_qconfig("bogus")


def test_Q03_per_channel_activation_observer():
    model = Small(nnx.Rngs(0))
    snap = _snapshot(model)
    qconfig = jq.QConfig(activation=jq.PerChannelMinMaxObserver.with_args(ch_axis=-1),
                         weight=jq.default_weight_observer)
    with _raises(ValueError, "'quant'|'fc1'", "per tensor"):
        jq.prepare(model, qconfig)
    _assert_untouched(model, snap)


def test_Q04_weight_observer_with_quint8():
    prepared = jq.prepare(Small(nnx.Rngs(0)), jq.QConfig(activation=jq.MinMaxObserver,
                                                         weight=jq.MinMaxObserver.with_args(dtype=jq.quint8)))
    jq.calibrate(prepared, [jnp.asarray(d) for d in _data()], progress=False)
    snap = _snapshot(prepared)
    with _raises(ValueError, "'fc1'", "qint8"):
        jq.convert(prepared)
    _assert_untouched(prepared, snap)


# ------------------------------------------------------------------------------ transforms


def test_T01_prepare_without_any_qconfig():
    model = Small(nnx.Rngs(0))
    with _raises(ValueError, "prepare", "get_default_qconfig"):
        jq.prepare(model, None)


class WithEmbed(nnx.Module):
    def __init__(self, rngs):
        self.quant = jqnn.QuantStub()
        self.emb = nnx.Embed(10, 4, rngs=rngs)

    def __call__(self, x):
        return self.emb(x)


def test_T02_prepare_layer_without_static_counterpart():
    model = WithEmbed(nnx.Rngs(0))
    snap = _snapshot(model)
    with _raises(ValueError, "'emb'", "set_module_name", "quantize_dynamic"):
        jq.prepare(model, _qconfig(), inplace=True)
    _assert_untouched(model, snap)


def test_T03_prepare_a_bare_linear():
    model = nnx.Linear(4, 2, rngs=nnx.Rngs(0))
    with _raises(ValueError, "QuantWrapper"):
        jq.prepare(model, _qconfig())


def test_T04_fuse_path_that_does_not_exist():
    model = Small(nnx.Rngs(0))
    snap = _snapshot(model)
    with _raises(KeyError, "nope"):
        jq.fuse_modules(model, [["fc1", "nope"]])
    _assert_untouched(model, snap)


def test_T05_fuse_unsupported_pattern():
    model = Small(nnx.Rngs(0))
    with _raises(NotImplementedError, "ReLU, Linear", "supported patterns"):
        jq.fuse_modules(model, [["relu", "fc1"]])


# ----------------------------------------------------------------------------- calibration


def test_C01_calibrate_a_model_that_was_not_prepared():
    with _raises(ValueError, "calibrate", "prepare"):
        jq.calibrate(Small(nnx.Rngs(0)), [jnp.ones((2, 6))], progress=False)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_C02_nan_or_inf_in_calibration_data(bad):
    prepared = jq.prepare(Small(nnx.Rngs(0)), _qconfig())
    params_before = [np.array(a) for a in jax.tree.leaves(nnx.state(prepared, nnx.Param))]
    data = _data()
    data[1][3, 2] = bad
    copies = [d.copy() for d in data]
    with _raises(NotCalibratedError, r"\w+\.activation_post_process", "NaN/Inf", "clean the calibration data"):
        jq.calibrate(prepared, data, progress=False)
    for d, c in zip(data, copies):
        np.testing.assert_array_equal(d, c)
    for a, b in zip(jax.tree.leaves(nnx.state(prepared, nnx.Param)), params_before):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_C03_calibrate_with_no_batches():
    prepared = jq.prepare(Small(nnx.Rngs(0)), _qconfig())
    with _raises(NotCalibratedError, "activation_post_process", "representative data"):
        jq.calibrate(prepared, [], progress=False)


def test_C04_calibrate_with_empty_batches():
    prepared = jq.prepare(Small(nnx.Rngs(0)), _qconfig())
    with _raises(NotCalibratedError, "activation_post_process", "not observed any data"):
        jq.calibrate(prepared, [jnp.zeros((0, 6))], progress=False)


def test_C05_calibrate_with_integer_data():
    prepared = jq.prepare(Small(nnx.Rngs(0)), _qconfig())
    with _raises(TypeError, "floating-point", "int32"):
        jq.calibrate(prepared, [jnp.ones((2, 6), jnp.int32)], progress=False)


def test_C06_calibration_batch_of_wrong_width():
    prepared = jq.prepare(Small(nnx.Rngs(0)), _qconfig())
    snap = _snapshot(prepared)
    with _raises(ValueError, "batch 1", r"'fc1\.module'", r"\(2, 7\)", r"kernel has shape \(6, 16\)"):
        jq.calibrate(prepared, [jnp.ones((2, 6)), jnp.ones((2, 7))], progress=False)
    _assert_untouched(prepared, snap)


# --------------------------------------------------------------------------------- convert


def test_V01_convert_before_calibration():
    prepared = jq.prepare(Small(nnx.Rngs(0)), _qconfig())
    snap = _snapshot(prepared)
    with _raises(NotCalibratedError, "at fc1|at quant|at head", "representative data"):
        jq.convert(prepared, inplace=True)
    _assert_untouched(prepared, snap)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_V02_non_finite_weights(bad):
    prepared = _calibrated()
    kernel = prepared.fc1.module.kernel
    kernel.set_value(kernel.get_value().at[0, 0].set(bad))
    snap = _snapshot(prepared)
    with _raises(ValueError, "'fc1'", "NaN or Inf", "fix the float model"):
        jq.convert(prepared)
    _assert_untouched(prepared, snap)


def test_V03_contraction_too_long_for_int32_accumulator():
    k = 65537
    prepared = jq.prepare(Small(nnx.Rngs(0), d_in=k), _qconfig())
    jq.calibrate(prepared, [jnp.linspace(-1, 1, k).reshape(1, k)], progress=False)
    snap = _snapshot(prepared)
    try:
        with _raises(ValueError, "65536", "split", "'fc1'"):
            jq.convert(prepared)
    finally:
        _assert_untouched(prepared, snap)


def test_V03b_contraction_limit_is_real():
    """Why V03 matters: at K = 65536 with the extreme operands the accumulator is at the edge."""
    term = 255 * -128  # uint8 activation x int8 weight at their extremes, PERF_NOTES' u8 x s8 dot
    safe = np.full(65536, term, np.int64).sum()
    assert safe >= np.iinfo(np.int32).min
    # a little past the limit the exact sum leaves int32, and an int32 accumulator wraps around
    over = np.full(65794, term, np.int64).sum()
    assert over < np.iinfo(np.int32).min
    assert np.full(65794, term, np.int32).sum(dtype=np.int32) > 0  # wrapped: the sign flipped


def test_V04_convert_a_float_model():
    with _raises(ValueError, "convert", "prepare"):
        jq.convert(Small(nnx.Rngs(0)))


# ------------------------------------------------------------------------------- inference


def test_I01_inference_input_width_differs_from_calibration():
    converted = jq.convert(_calibrated())
    x = np.ones((2, 7), np.float32)
    with _raises(ValueError, "'fc1'", "7 features", "expected 6"):
        converted(x)
    np.testing.assert_array_equal(x, np.ones((2, 7), np.float32))


def test_I02_integer_input_to_converted_model():
    converted = jq.convert(_calibrated())
    with _raises(TypeError, "quantize", "floating-point"):
        converted(jnp.ones((2, 6), jnp.int32))


def test_I03_float_input_to_a_quantized_layer():
    converted = jq.convert(_calibrated())
    with _raises(TypeError, "'fc1'", "QuantStub"):
        converted.fc1(jnp.ones((2, 6)))


def test_I04_nan_input_at_inference():
    converted = jq.convert(_calibrated())
    x = np.ones((2, 6), np.float32)
    x[0, 0] = np.nan
    with _raises(ValueError, "'quant'", "NaN"):
        converted(x)


# ------------------------------------------------------------------------------------ load


def test_L01_load_arrays_of_another_architecture():
    target = jq.convert(_calibrated(0, k=6))
    source = jq.convert(_calibrated(1, k=5))
    with _raises(ValueError, "fc1", "shape"):
        nnx.update(target, nnx.state(source, QuantParams))
        target(jnp.ones((2, 6)))


def test_L02_load_same_shape_arrays_uses_the_loaded_weights():
    target = jq.convert(_calibrated(0))
    source = jq.convert(_calibrated(1))
    nnx.update(target, nnx.state(source, QuantParams))
    x = jnp.asarray(_data(seed=5)[0])
    np.testing.assert_array_equal(np.asarray(target(x)), np.asarray(source(x)))


def test_L03_load_arrays_then_call_under_jit():
    from jaxquant.serialization import rebuild_cache

    target = jq.convert(_calibrated(0))
    source = jq.convert(_calibrated(1))
    nnx.update(target, nnx.state(source, QuantParams))
    forward = nnx.jit(lambda m, x: m(x))
    x = jnp.asarray(_data(seed=5)[0])
    with _raises(ValueError, "'fc1'", "under jit", r"rebuild_cache\(model\)"):
        forward(target, x)
    rebuild_cache(target)
    np.testing.assert_array_equal(np.asarray(forward(target, x)), np.asarray(source(x)))


class SmallConv(nnx.Module):
    def __init__(self, rngs):
        self.quant = jqnn.QuantStub()
        self.conv = nnx.Conv(2, 4, (3, 3), rngs=rngs)
        self.dequant = jqnn.DeQuantStub()

    def __call__(self, x):
        return self.dequant(self.conv(self.quant(x)))


def test_L04_load_conv_arrays_uses_the_loaded_weights():
    def converted(seed):
        prepared = jq.prepare(SmallConv(nnx.Rngs(seed)), _qconfig())
        rng = np.random.default_rng(seed)
        return jq.convert(jq.calibrate(prepared, [jnp.asarray(rng.normal(size=(2, 5, 5, 2)), jnp.float32)],
                                       progress=False))

    target, source = converted(0), converted(1)
    nnx.update(target, nnx.state(source, QuantParams))
    x = jnp.asarray(np.random.default_rng(7).normal(size=(1, 5, 5, 2)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(target(x)), np.asarray(source(x)))


def test_L05_load_dynamic_linear_arrays():
    def converted(seed, k=6):
        model = nnx.Sequential(nnx.Linear(k, 4, rngs=nnx.Rngs(seed)))
        return jq.quantize_dynamic(model)

    target, source = converted(0), converted(1)
    nnx.update(target, nnx.state(source, QuantParams))
    x = jnp.asarray(np.random.default_rng(7).normal(size=(3, 6)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(target(x)), np.asarray(source(x)))
    with _raises(ValueError, "'layers.0'", "shape"):
        nnx.update(target, nnx.state(converted(2, k=5), QuantParams))
        target(x)


# ---------------------------------------------------------------------------------- kernels


def test_K01_pack_weight_contraction_too_long():
    from jaxquant.kernels.linear import pack_weight

    with _raises(ValueError, "65537", "split the contraction"):
        pack_weight(jnp.zeros((65537, 2), jnp.int8), 0)


def test_K02_requantize_non_int32_accumulator():
    from jaxquant.kernels.requantize import requantize

    with _raises(TypeError, "requantize", "int32"):
        requantize(jnp.zeros((2, 3), jnp.float32), jnp.ones(3), 0)


def test_K03_mixed_dot_wrong_operand_dtypes():
    from jaxquant.kernels.mixed_dot import dot_general_u8s8

    with _raises(TypeError, "uint8", "x \\^ 0x80"):
        dot_general_u8s8(jnp.zeros((2, 3), jnp.int8), jnp.zeros((3, 2), jnp.int8), (((1,), (0,)), ((), ())))


def test_K04_conv_groups_do_not_divide_channels():
    from jaxquant.kernels.conv import pack_conv

    with _raises(ValueError, "groups=3"):
        pack_conv(jnp.zeros((3, 3, 2, 8), jnp.int8), 1.0, 0, None, groups=3)


def test_K05_static_linear_input_width():
    from jaxquant.kernels.linear import pack_linear, quantized_linear

    packed = pack_linear(jnp.zeros((4, 2), jnp.int8), 1.0, 0, None)
    x = QTensor(jnp.zeros((1, 5), jnp.uint8), jnp.float32(1), jnp.int32(0), quint8)
    with _raises(ValueError, "quantized_linear", "5 features", "expects 4"):
        quantized_linear(x, packed, 1.0, 0, out_dtype=quint8)

# ------------------------------------------------------------------------------ weight-only / LLM (W01-W07)


class _TwoLinears(nnx.Module):
    def __init__(self):
        self.a = nnx.Linear(48, 16, rngs=nnx.Rngs(0))
        self.e = nnx.Einsum("bk,kn->bn", (16, 4), rngs=nnx.Rngs(1))

    def __call__(self, x):
        return self.e(self.a(x))


def test_W01_group_size_does_not_divide_contraction():
    model = _TwoLinears()
    snap = _snapshot(model)
    with _raises(ValueError, "'a'", "group_size 32 does not divide", "48", "16", "allow_partial_group"):
        jq.quantize_weight_only(model, jq.int4_weight_only(group_size=32))
    _assert_untouched(model, snap)


def test_W02_int4_asked_of_an_op_that_cannot_take_it():
    model = _TwoLinears()
    with _raises(ValueError, "Einsum", "cannot hold a block-quantized weight", "quantize_dynamic"):
        jq.quantize_weight_only(model, {nnx.Einsum: jq.int4_weight_only(16)})
    with _raises(ValueError, "'e'", "int4 weight-only is not supported"):
        jq.quantize_weight_only(model, {"e": jq.int4_weight_only(16)})


def test_W03_gptq_singular_hessian():
    from jaxquant.weight_only.gptq import GPTQError, gptq_quantize

    x = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float64)
    x = np.concatenate([x, x], axis=1)  # duplicated inputs: X^T X is singular
    w = jnp.ones((16, 4), jnp.float32)
    with _raises(GPTQError, "not positive definite", "damp_percent=0.0", "raise damp_percent"):
        gptq_quantize(w, x.T @ x, 64, group_size=8, damp_percent=0.0, where="gptq: 'layer'")


def test_W04_too_little_calibration_data():
    model = _TwoLinears()
    stats = jq.collect_linear_stats(model, [jnp.ones((4, 48))], paths=["a"], progress=False)
    with _raises(ValueError, "'a'", "4 calibration rows for 48 inputs", "at least 48"):
        jq.quantize_gptq(model, stats, jq.int4_weight_only(16), progress=False)
    with _raises(ValueError, "collect_linear_stats", "no calibration batch"):
        jq.collect_linear_stats(model, [], progress=False)


def test_W05_weight_only_qconfig_given_to_quantize_dynamic():
    model = _TwoLinears()
    with _raises(ValueError, "quantize_dynamic", "'a'", "weight-only qconfig", "quantize_weight_only"):
        jq.quantize_dynamic(model, {nnx.Linear: jq.default_weight_only_qconfig})
    q = jq.quantize_dynamic(model, jq.int8_weight_only())  # the supported spelling: float activations
    assert type(q.a).__name__ == "WeightOnlyLinear"


def test_W06_gguf_corrupt_file(tmp_path):
    pytest.importorskip("gguf")
    from jaxquant.models.gguf_reader import GGUFError, read_llama_gguf

    p = tmp_path / "bad.gguf"
    p.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 16)
    with _raises(GGUFError, "GGUF", "bad.gguf"):
        read_llama_gguf(str(p))


def test_W07_weight_only_config_out_of_range():
    with _raises(ValueError, "WeightOnlyConfig", "bits must be 4 or 8"):
        jq.WeightOnlyConfig(bits=2)
    with _raises(ValueError, "WeightOnlyConfig", "group_size"):
        jq.int4_weight_only(group_size=0)


def test_W08_gptq_awq_without_stats_or_with_a_wrong_config():
    net = nnx.Linear(32, 8, rngs=nnx.Rngs(0))
    with _raises(ValueError, "awq", "no layer statistics", "collect_linear_stats"):
        jq.quantize_awq(net, {}, jq.int4_weight_only(16), progress=False)
    with _raises(TypeError, "gptq", "config must be a WeightOnlyConfig", "int4_weight_only"):
        jq.quantize_gptq(net, {"x": object()}, {"x": jq.int4_weight_only(16)}, progress=False)


def test_W09_awq_clip_grid_without_one():
    from jaxquant.weight_only.awq import awq_clip

    w = jnp.asarray(np.random.default_rng(1).standard_normal((32, 4)), jnp.float32)
    with _raises(ValueError, "clip_grid", "must contain 1.0"):
        awq_clip(w, np.eye(32), 64, group_size=16, clip_grid=(0.9, 0.8))


def test_W12_gptq_bits_block_size_or_stats_of_another_layer():
    from jaxquant.weight_only.gptq import GPTQError, gptq_quantize

    w = jnp.asarray(np.random.default_rng(2).standard_normal((16, 4)), jnp.float32)
    xtx = np.eye(16) * 64.0
    with _raises(GPTQError, "gptq: 'fc'", "bits must be 4 or 8", "got 3"):
        gptq_quantize(w, xtx, 64, bits=3, group_size=None, where="gptq: 'fc'")
    with _raises(GPTQError, "gptq: 'fc'", "block_size", "got 0"):
        gptq_quantize(w, xtx, 64, bits=8, group_size=None, block_size=0, where="gptq: 'fc'")
    with _raises(GPTQError, "gptq: 'fc'", r"\(8, 8\), expected \(16, 16\)", "this layer's inputs"):
        gptq_quantize(w, xtx[:8, :8], 64, bits=8, group_size=None, where="gptq: 'fc'")


def test_W10_native_weight_only_gemv_given_another_layout():
    from jaxquant.native.weight_only_ops import weight_only_gemv

    q = jq.quantize_weight_only(nnx.Linear(64, 8, rngs=nnx.Rngs(0)), jq.int4_weight_only(32)).weight()
    with _raises(ValueError, "weight_only_gemv", "not one int4 weight", "own bits, group_size and out_features"):
        weight_only_gemv(jnp.ones((1, 64)), q.data, q.scale, q.zero_point, bits=4, group_size=16, out_features=8)


def test_W11_native_decode_ops_given_mismatched_shapes():
    from jaxquant.native.decode_ops import add_rms_norm, decode_attention

    cache = jnp.zeros((1, 4, 2, 8), jnp.float32)
    with _raises(ValueError, "decode_attention", "do not fit", r"k/v \(B, KVH\*D\)"):  # v of 2 heads x 8, k of 1 x 8
        decode_attention(jnp.zeros((1, 48)), jnp.zeros((1, 8)), jnp.zeros((1, 16)), jnp.zeros(4), jnp.zeros(4),
                         cache, cache, 0)
    with _raises(ValueError, "add_rms_norm", "float32", "RMSNorm weight of 8 features"):
        add_rms_norm(jnp.zeros((1, 7)), None, jnp.ones(8), 1e-5)

# ------------------------------------------------- issue 15: usage errors found by a careless user


def test_P13_quantize_per_tensor_non_integer_zero_point():
    with _raises(ValueError, "quantize_per_tensor", "zero_point must be an integer", "3.5"):
        jq.quantize_per_tensor(X, 0.1, 3.5, jq.quint8)
    # an integral float is still the integer it spells (what a float32 qparams array holds)
    np.testing.assert_array_equal(np.asarray(jq.quantize_per_tensor(X, 0.1, 3.0, jq.quint8).int_repr()),
                                  np.asarray(jq.quantize_per_tensor(X, 0.1, 3, jq.quint8).int_repr()))


def test_P14_quantize_per_tensor_vector_scale():
    with _raises(ValueError, "quantize_per_tensor", "scale must be a single value", r"\(2,\)", "quantize_per_channel"):
        jq.quantize_per_tensor(X, np.array([0.1, 0.2], np.float32), 0, jq.quint8)
    with _raises(ValueError, "quantize_per_tensor", "zero_point must be a single value"):
        jq.quantize_per_tensor(X, 0.1, np.array([0, 1]), jq.quint8)
    with _raises(ValueError, "scale must be a single value"):  # static: under jit too
        jax.jit(lambda x, s: jq.quantize_per_tensor(x, s, 0, jq.quint8).int_repr())(X, np.ones(2, np.float32))


def test_P15_qtensor_axis_out_of_range():
    with _raises(ValueError, "QTensor", "axis 2", r"shape \(3, 4\)"):
        jq.QTensor(jnp.zeros((3, 4), jnp.int8), jnp.ones(4), jnp.zeros(4, jnp.int32), jq.qint8, jq.per_channel_affine, 2)


def test_P16_pytorch_accessor_on_per_group_tensor():
    q = quantize_per_group(np.ones((4, 2), np.float32), np.ones((2, 2), np.float32), np.zeros((2, 2), np.int32), (2, 1))
    with _raises(ValueError, "q_scale", "block_size", r"\.scale"):
        q.q_scale()
    with _raises(ValueError, "q_per_channel_scales", "block_size", r"\.scale"):
        q.q_per_channel_scales()


@pytest.mark.parametrize("eps", [1e-45, 1e-39])
def test_O13_eps_below_float32_tiny(eps):
    with _raises(ValueError, "MinMaxObserver", f"eps={eps!r}", "smallest normal"):
        jq.MinMaxObserver(eps=eps)
    jq.MinMaxObserver(eps=float(np.finfo(np.float32).tiny))  # the smallest allowed


def test_O14_reduce_range_collapses_custom_range():
    with _raises(ValueError, "MinMaxObserver", r"\[0, 1\]", "reduce_range=True", r"\[0, 0\]"):
        jq.MinMaxObserver(quant_min=0, quant_max=1, reduce_range=True)
    with _raises(ValueError, "HistogramObserver", "collapses"):
        jq.HistogramObserver(dtype=jq.quint8, quant_min=0, quant_max=1, reduce_range=True)
    assert jq.MinMaxObserver(quant_min=0, quant_max=3, reduce_range=True).quant_range == (0, 1)


def test_T06_prepare_twice():
    prepared = jq.prepare(Small(nnx.Rngs(0)), _qconfig())
    snap = _snapshot(prepared)
    with _raises(ValueError, "prepare", "'(quant|fc1|head|dequant)'", "prepared already", "float"):
        jq.prepare(prepared, _qconfig())
    _assert_untouched(prepared, snap)
    with _raises(ValueError, "prepare_qat", "prepared already"):
        jq.prepare_qat(prepared, jq.get_default_qat_qconfig("x86"))
    with _raises(ValueError, "prepare", "quantized"):  # a converted model is not a float model either
        jq.prepare(jq.convert(_calibrated()), _qconfig())


class _LinenMLP:
    @staticmethod
    def make():
        import flax.linen as nn

        class MLP(nn.Module):
            @nn.compact
            def __call__(self, x):
                return nn.Dense(3)(x)
        return MLP()


@pytest.mark.parametrize("fn", ["prepare", "quantize_dynamic", "prepare_qat", "convert", "calibrate"])
def test_T07_nnx_transform_given_a_linen_module(fn):
    args = {"prepare": (_qconfig(),), "prepare_qat": (jq.get_default_qat_qconfig("x86"),),
            "quantize_dynamic": (), "convert": (), "calibrate": ([X[None, :6]],)}[fn]
    with _raises(TypeError, fn, "Linen", f"jaxquant.linen.{fn}"):
        getattr(jq, fn)(_LinenMLP.make(), *args)


def test_T08_misspelled_set_module_name():
    model = Small(nnx.Rngs(0))
    mapping = jq.QConfigMapping().set_global(_qconfig()).set_module_name("hed", None)
    with _raises(KeyError, "prepare", "'hed'", "not in the model", "did you mean 'head'"):
        jq.prepare(model, mapping)
    mapping = jq.QConfigMapping().set_global(jq.get_default_qat_qconfig("x86")).set_module_name("fc", None)
    with _raises(KeyError, "prepare_qat", "'fc'", "'fc1'"):
        jq.prepare_qat(model, mapping)
    # a correct path keeps working (and only a path that exists counts)
    prepared = jq.prepare(model, jq.QConfigMapping().set_global(_qconfig()).set_module_name("head", None)
                          .set_module_name("dequant", None))
    assert isinstance(prepared.head, nnx.Linear)


class _WithBN(nnx.Module):
    def __init__(self, rngs):
        self.quant = jqnn.QuantStub()
        self.fc1 = nnx.Linear(6, 8, rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.dequant = jqnn.DeQuantStub()

    def __call__(self, x):
        return self.dequant(self.drop(self.bn(self.fc1(self.quant(x)))))


def test_C07_batchnorm_in_training_mode_during_calibrate():
    model = _WithBN(nnx.Rngs(0))
    model.drop.deterministic = True          # only the BatchNorm is left in training mode
    prepared = jq.prepare(model, _qconfig())
    before = [np.array(a) for a in jax.tree.leaves(nnx.state(prepared, nnx.Param, nnx.BatchStat))]
    with _raises(ValueError, "calibrate", "'bn.module'", "BatchNorm", "training mode", r"model\.eval\(\)"):
        jq.calibrate(prepared, _data(), progress=False)
    after = jax.tree.leaves(nnx.state(prepared, nnx.Param, nnx.BatchStat))
    for a, b in zip(before, after):          # the running statistics did not move either
        np.testing.assert_array_equal(a, np.asarray(b))
    prepared.eval()
    jq.calibrate(prepared, _data(), progress=False)


def test_C08_dropout_in_training_mode_during_calibrate():
    model = _WithBN(nnx.Rngs(0))
    model.bn.use_running_average = True      # only the Dropout is left in training mode
    prepared = jq.prepare(model, _qconfig())
    with _raises(ValueError, "calibrate", "'drop'", "Dropout", r"model\.eval\(\)"):
        jq.calibrate(prepared, _data(), progress=False)


def test_C09_calibration_batches_given_as_x_y_tuples():
    prepared = jq.prepare(Small(nnx.Rngs(0)), _qconfig())
    pairs = [(x, np.zeros(len(x), np.int32)) for x in _data()]
    with _raises(TypeError, "calibrate", "tuple of 2 arrays", r"\(inputs, labels\)", r"for x, _ in batches"):
        jq.calibrate(prepared, pairs, progress=False)
    jq.calibrate(prepared, (x for x, _ in pairs), progress=False)   # the fix the message gives
    jq.convert(prepared)


def test_C10_prepared_model_called_under_jax_jit():
    prepared = jq.prepare(Small(nnx.Rngs(0)), _qconfig())
    with _raises(ValueError, "MinMaxObserver", "jax.jit", r"jaxquant\.calibrate", r"nnx\.jit"):
        jax.jit(lambda x: prepared(x))(_data()[0])
    out = nnx.jit(lambda m, x: m(x))(prepared, _data()[0])      # what the message suggests works
    assert out.shape == (8, 3)
    assert np.isfinite(float(prepared.quant.activation_post_process.calculate_qparams()[0]))


def test_I05_converted_dropout_after_train():
    model = _WithBN(nnx.Rngs(0))
    model.eval()
    int8_model = jq.convert(jq.calibrate(jq.prepare(model, _qconfig()), _data(), progress=False))
    x = _data()[0]
    expected = np.asarray(int8_model(x))
    int8_model.train()
    # as torch.ao.nn.quantized.Dropout/BatchNorm2d: identity on quantized activations, running
    # statistics, in training mode too
    np.testing.assert_array_equal(np.asarray(int8_model(x)), expected)
    np.testing.assert_array_equal(np.asarray(nnx.jit(lambda m, x: m(x))(int8_model, x)), expected)
    # a Dropout on float values (after the DeQuantStub) still drops in training mode
    dropout = jqnn.quantized.Dropout.from_float(nnx.Dropout(0.5, rngs=nnx.Rngs(0)))
    y = np.asarray(dropout(jnp.ones((64,))))
    assert set(np.unique(y)) == {0.0, 2.0}


def test_I06_grad_through_an_int8_model():
    int8_model = jq.convert(_calibrated())
    x = jnp.asarray(_data()[0])
    with _raises(TypeError, "Quantize 'quant'", "grad", "zero", "prepare_qat"):
        jax.grad(lambda x: int8_model(x).sum())(x)
    with _raises(TypeError, "Quantize 'quant'"):
        nnx.grad(lambda m, x: m(x).sum(), argnums=1)(int8_model, x)
    # inference, jitted or not, is unaffected
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda x: int8_model(x))(x)), np.asarray(int8_model(x)))


class _ConvNet(nnx.Module):
    def __init__(self, rngs):
        self.quant = jqnn.QuantStub()
        self.conv = nnx.Conv(2, 4, (3, 3), rngs=rngs)
        self.relu = jqnn.ReLU()
        self.flatten = jqnn.Flatten()
        self.fc = nnx.Linear(6 * 6 * 4, 3, rngs=rngs)
        self.dequant = jqnn.DeQuantStub()

    def __call__(self, x):
        return self.dequant(self.fc(self.flatten(self.relu(self.conv(self.quant(x))))))


def _conv_int8():
    data = [np.random.default_rng(i).normal(size=(2, 6, 6, 2)).astype(np.float32) for i in range(2)]
    prepared = jq.prepare(_ConvNet(nnx.Rngs(0)), jq.get_default_qconfig("x86"))
    return jq.convert(jq.calibrate(prepared, data, progress=False)), data[0]


def test_I07_static_int8_under_jax_enable_x64():
    int8_model, x = _conv_int8()
    expected = np.asarray(int8_model(x))
    with jax.enable_x64(True):
        int8_x64, x = _conv_int8()           # the whole workflow with 64-bit types on
        got = np.asarray(int8_x64(x))
        jitted = np.asarray(jax.jit(lambda x: int8_x64(x))(x))
        with jq.use_native(False):  # the pure-XLA kernels' dots (the native backend runs custom calls)
            hlo = jax.jit(lambda x: int8_x64(x)).lower(x).compile().as_text()
        wide = [(jax.tree_util.keystr(p), a.dtype) for p, a in jax.tree_util.tree_leaves_with_path(
            nnx.state(int8_x64)) if getattr(a, "dtype", None) in (jnp.int64, jnp.float64)]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(jitted, expected)
    assert not wide, f"64-bit arrays in the int8 model: {wide}"
    # the int8 arithmetic survives: u8 x s8 dots accumulating in s32 (the conv's im2col and the Linear)
    dots = [b.strip().splitlines()[0] for b in hlo.split("\n\n") if " dot(" in b]
    assert len(dots) >= 2 and all("u8[" in d and "s8[" in d and "-> s32[" in d for d in dots), dots
