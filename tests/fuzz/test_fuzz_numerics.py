"""Hypothesis fuzzing: primitives, observers and int8 kernels against small numpy references.

Random shapes, dtypes, value ranges and scales, including denormal and huge scales. Properties: no
crash, no NaN, and results equal to a direct numpy transcription of the formula (PyTorch/fbgemm's,
see the module docstrings). Each test has a bounded number of examples so the file runs in well
under a minute and a half on two cores.
"""
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jaxquant as jq
from jaxquant.kernels.conv import pack_conv, quantized_conv
from jaxquant.kernels.linear import pack_linear, quantized_linear
from jaxquant.qtensor import QTensor, qint8, quint8

FAST = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])

def f32(v):
    return float(np.float32(v))  # Hypothesis wants bounds exactly representable at width 32


DTYPES = [jq.quint8, jq.qint8, jq.qint32]
# Normal float32 scales, from the smallest normal up to 1e30. Denormal scales are flushed to zero
# by XLA:CPU (1/scale becomes inf): eager calls refuse them (catalogue P03), see
# test_denormal_or_nonpositive_scales_are_refused.
# Below ~1.2e-35 (1/scale > 8e34) the per-tensor fused multiply-add path breaks down: see
# test_quantize_product_overflow, which pins those cases.
scales = st.one_of(
    st.floats(f32(1.3e-35), f32(1e-30), width=32),  # tiny
    st.floats(f32(1e-6), f32(1e3), width=32),
    st.floats(f32(1e20), f32(1e30), width=32),      # huge
)
finite32 = st.floats(f32(-1e6), f32(1e6), width=32, allow_nan=False, allow_infinity=False)
# |x| up to 8e34: beyond it the fused multiply-add path fails (test_quantize_product_overflow)
wide32 = st.floats(f32(-8e34), f32(8e34), width=32, allow_nan=False, allow_infinity=False)
shapes = hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=6)


def _quantize_ref(x, scale, zp, qmin, qmax, fused=False):
    """PyTorch's codes: ``round(x * (1/scale)) + zp`` with the product rounded to float32 (quantize_val:
    per channel, qint32), or with fbgemm's 8-bit per-tensor fused multiply-add (``fused``): the exact
    ``x * inv + zp`` rounded once to float32 (the product of two float32s is exact in float64)."""
    inv = np.float32(1.0) / np.float32(scale)
    with np.errstate(over="ignore"):
        if fused:
            q = np.round((x.astype(np.float64) * np.float64(inv) + np.float64(zp)).astype(np.float32))
        else:
            q = np.round((x.astype(np.float32) * inv) + np.float32(zp))
    return np.clip(q, qmin, qmax)  # float; compared before the cast


@FAST
@given(data=st.data(), dtype=st.sampled_from(DTYPES), scale=scales)
def test_quantize_per_tensor_matches_numpy(data, dtype, scale):
    x = data.draw(hnp.arrays(np.float32, shapes, elements=st.one_of(finite32, wide32)))
    zp = data.draw(st.integers(max(dtype.min, -1000), min(dtype.max, 1000)))
    # products beyond float32's range: test_quantize_product_overflow below
    inv = np.float64(np.float32(1.0) / np.float32(scale))
    x = np.where(np.abs(x.astype(np.float64) * inv) > 1e38, np.float32(0), x).astype(np.float32)
    q = jq.quantize_per_tensor(x, scale, zp, dtype)
    ref = _quantize_ref(x, scale, zp, dtype.min, dtype.max, fused=dtype != jq.qint32)
    got = np.asarray(q.int_repr()).astype(np.float64)
    if dtype == jq.qint32:
        # float32 cannot hold 2**31 - 1: the clamp gives 2**31, and the cast saturates to int32 max
        ref = np.clip(ref.astype(np.float64), dtype.min, dtype.max)
    np.testing.assert_array_equal(got, ref.astype(np.float64))
    deq = np.asarray(q.dequantize())
    assert not np.isnan(deq).any()
    if dtype == jq.qint32:
        return  # q - zero_point wraps in int32 at the range ends: test_dequantize_qint32_range_end below
    expected = (np.asarray(q.int_repr()).astype(np.int64) - zp).astype(np.float32) * np.float32(scale)
    np.testing.assert_array_equal(deq, expected)


@pytest.mark.parametrize("x, scale, expected", [
    (3e38, 1.0, 255),                        # huge value
    (0.0, 1.2e-38, 1),                       # tiny (normal) scale: zero must map to the zero point
    (5.0, 1e-35, 255),
    (2.2232862e07, 6.533650920902876e-32, 255),  # product overflows float32
])
def test_quantize_product_overflow(x, scale, expected):
    q = jq.quantize_per_tensor(np.asarray([x], np.float32), scale, 1, jq.quint8)
    assert int(q.int_repr()[0]) == expected


def test_quantize_per_channel_product_near_float32_max():
    q = jq.quantize_per_channel(np.asarray([[4424.0]], np.float32), np.asarray([1.3000000377525586e-35], np.float32),
                                np.zeros(1, np.int32), 0, jq.qint8)
    assert int(q.int_repr()[0, 0]) == 127


def test_dequantize_qint32_range_end():
    q = jq.quantize_per_tensor(np.asarray([-1.0], np.float32), 1e-37, 1, jq.qint32)
    assert int(q.int_repr()[0]) == -(2**31)
    assert float(q.dequantize()[0]) < 0


@FAST
@given(data=st.data(), scale_lo=scales)
def test_quantize_per_channel_matches_numpy(data, scale_lo):
    x = data.draw(hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=3, min_side=1, max_side=5),
                             elements=finite32))
    axis = data.draw(st.integers(-x.ndim, x.ndim - 1))
    c = x.shape[axis]
    s = np.asarray(data.draw(st.lists(scales, min_size=c, max_size=c)), np.float32)
    zps = np.asarray(data.draw(st.lists(st.integers(-20, 20), min_size=c, max_size=c)), np.int32)
    shape = [1] * x.ndim
    shape[axis] = c
    # products near float32's max: test_quantize_per_channel_product_near_float32_max below
    inv = (np.float32(1.0) / s).astype(np.float64).reshape(shape)
    x = np.where(np.abs(x.astype(np.float64) * inv) > 1e38, np.float32(0), x).astype(np.float32)
    q = jq.quantize_per_channel(x, s, zps, axis, jq.qint8)
    ref = _quantize_ref(x, s.reshape(shape), zps.reshape(shape).astype(np.float32), -128, 127)
    np.testing.assert_array_equal(np.asarray(q.int_repr()), ref.astype(np.int8))
    deq = np.asarray(q.dequantize())
    assert not np.isnan(deq).any()
    np.testing.assert_array_equal(
        deq, (ref.astype(np.int32) - zps.reshape(shape)).astype(np.float32) * s.reshape(shape))


bad_scales = st.one_of(
    st.floats(f32(1e-45), f32(1.1754942e-38), width=32),  # denormal (XLA:CPU flushes them to zero)
    st.floats(f32(-1e30), f32(0.0), width=32),             # zero and negative
    st.sampled_from([float("nan"), float("inf")]),
)


@FAST
@given(data=st.data(), dtype=st.sampled_from(DTYPES), scale=bad_scales, per_channel=st.booleans())
def test_denormal_or_nonpositive_scales_are_refused(data, dtype, scale, per_channel):
    """Eager calls refuse every scale XLA:CPU cannot invert; a valid scale next to it is accepted."""
    x = data.draw(hnp.arrays(np.float32, (3, 2), elements=finite32))
    if per_channel:
        scales = np.asarray([0.5, scale], np.float32)
        with pytest.raises(ValueError, match=r"quantize_per_channel: scale of channel 1 is"):
            jq.quantize_per_channel(x, scales, np.zeros(2, np.int32), 1, dtype)
        jq.quantize_per_channel(x, np.asarray([0.5, 0.25], np.float32), np.zeros(2, np.int32), 1, dtype)
    else:
        with pytest.raises(ValueError, match=r"quantize_per_tensor: scale is"):
            jq.quantize_per_tensor(x, scale, 0, dtype)


@FAST
@given(dtype=st.sampled_from([jq.quint8, jq.qint8]), zp=st.one_of(st.integers(-2**31, -129), st.integers(256, 2**31 - 1)))
def test_zero_points_outside_the_dtype_are_refused(dtype, zp):
    with pytest.raises(ValueError, match=rf"zero_point is {zp}, outside .*\[{dtype.min}, {dtype.max}\]"):
        jq.quantize_per_tensor(np.ones(3, np.float32), 0.1, zp, dtype)


def test_value_checks_do_not_run_under_jit():
    """Under jit nothing is read on the host: a NaN input quantizes as PyTorch's kernel does (no error)."""
    import jax

    x = jnp.asarray([np.nan, 1.0], jnp.float32)
    f = lambda x: jq.quantize_per_tensor(x, 0.1, 3, jq.quint8).int_repr()  # noqa: E731
    q = jax.jit(f)(x)
    assert int(q[1]) == 13  # round(1.0 / 0.1) + 3
    # and the traced program holds no check: no reduction over x (the eager check is an all-reduce)
    assert "reduce" not in str(jax.make_jaxpr(f)(x))


def _choose_qparams_ref(lo, hi, qmin, qmax):
    """PyTorch's ChooseQuantizationParams (quant_utils.h), in double as PyTorch computes it."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = (hi - lo) / (qmax - qmin)
    if np.float32(scale) == 0 or np.isinf(1.0 / np.float32(scale)):
        scale = 0.1
    scale = float(np.float32(scale))
    if scale < 6.1e-5:
        org = scale
        scale = float(np.float32(6.1e-5))
        if lo == 0:
            hi = 6.1e-5 * (qmax - qmin)
        elif hi == 0:
            lo = -6.1e-5 * (qmax - qmin)
        else:
            lo, hi = lo * (6.1e-5 / org), hi * (6.1e-5 / org)
    zp_min, zp_max = qmin - lo / scale, qmax - hi / scale
    err_min, err_max = abs(qmin) - abs(lo / scale), abs(qmax) - abs(hi / scale)
    initial = zp_min if err_min < err_max else zp_max
    return np.float32(scale), int(np.clip(np.rint(initial), qmin, qmax))


@FAST
@given(x=hnp.arrays(np.float32, shapes, elements=st.one_of(finite32, st.floats(f32(-1e-30), f32(1e-30), width=32))),
       dtype=st.sampled_from([jq.quint8, jq.qint8]), reduce_range=st.booleans())
def test_choose_qparams_matches_pytorch_formula(x, dtype, reduce_range):
    scale, zp = jq.choose_qparams(jnp.asarray(x), dtype, reduce_range)
    qmin, qmax = dtype.min, dtype.max
    if reduce_range:
        qmin, qmax = int(qmin / 2), int(qmax / 2)
    ref_scale, ref_zp = _choose_qparams_ref(x.min(), x.max(), qmin, qmax)
    assert np.isfinite(float(scale)) and float(scale) > 0
    np.testing.assert_allclose(float(scale), ref_scale, rtol=2.5e-7)  # within one float32 ulp
    assert abs(int(zp) - ref_zp) <= 1  # documented: float32 vs double ties
    assert qmin <= int(zp) <= qmax


@FAST
@given(lo=st.floats(f32(-3.4e38), f32(0.0), width=32), hi=st.floats(f32(0.0), f32(3.4e38), width=32),
       reduce_range=st.booleans())
def test_choose_qparams_ranges_near_float32_max_match_pytorch(lo, hi, reduce_range):
    """Found by fuzzing: ranges wider than ~2e37 made choose_qparams' error-free transforms overflow
    (NaN scale); PyTorch computes in double and gets a finite scale."""
    torch = pytest.importorskip("torch")
    x = np.asarray([lo, hi, 0.5 * lo], np.float32)
    scale, zp = jq.choose_qparams(jnp.asarray(x), jq.quint8, reduce_range)
    tscale, tzp = torch._choose_qparams_per_tensor(torch.from_numpy(x), reduce_range)
    assert np.isfinite(float(scale))
    assert np.float32(scale) == np.float32(tscale)
    assert abs(int(zp) - int(tzp)) <= 1  # documented: float32 vs double ties


def _minmax_qparams_ref(lo, hi, qmin, qmax, symmetric, dtype):
    """UniformQuantizationObserverBase._calculate_qparams in float32 (PyTorch's formula)."""
    eps = np.float32(np.finfo(np.float32).eps)
    min_neg, max_pos = np.minimum(np.float32(lo), np.float32(0)), np.maximum(np.float32(hi), np.float32(0))
    if symmetric:
        max_pos = np.maximum(-min_neg, max_pos)
        scale = np.maximum(max_pos / np.float32((qmax - qmin) / 2), eps)
        return scale, np.full(np.shape(scale), 128 if dtype == jq.quint8 else 0)
    scale = np.maximum((max_pos - min_neg) / np.float32(qmax - qmin), eps)
    return scale, np.clip(qmin - np.round(min_neg / scale), qmin, qmax)


@FAST
@given(data=st.data(), dtype=st.sampled_from([jq.quint8, jq.qint8]), symmetric=st.booleans(),
       per_channel=st.booleans(), reduce_range=st.booleans())
def test_minmax_observers_match_numpy(data, dtype, symmetric, per_channel, reduce_range):
    if symmetric and reduce_range and dtype == jq.quint8:
        reduce_range = False  # rejected by design (catalogue entry), not a numerics case
    shape = data.draw(hnp.array_shapes(min_dims=2, max_dims=3, min_side=1, max_side=5))
    # ranges wider than float32's max give a NaN scale: catalogue entry O12
    batches = data.draw(st.lists(hnp.arrays(np.float32, shape, elements=st.one_of(finite32, st.floats(
        f32(-1e37), f32(1e37), width=32))),
                                 min_size=1, max_size=3))
    if per_channel:
        qscheme = jq.per_channel_symmetric if symmetric else jq.per_channel_affine
        obs = jq.PerChannelMinMaxObserver(ch_axis=0, dtype=dtype, qscheme=qscheme, reduce_range=reduce_range)
        axes = tuple(range(1, len(shape)))
    else:
        qscheme = jq.per_tensor_symmetric if symmetric else jq.per_tensor_affine
        obs = jq.MinMaxObserver(dtype=dtype, qscheme=qscheme, reduce_range=reduce_range)
        axes = None
    state = obs.init(batches[0])
    for b in batches:
        state = obs.update(state, jnp.asarray(b))
    # XLA:CPU flushes denormal inputs to zero; quantization does not care (scales are >= eps)
    allx = np.stack(batches)
    allx = np.where(np.abs(allx) < np.finfo(np.float32).tiny, np.float32(0), allx)
    red = (0,) + tuple(a + 1 for a in axes) if axes else None
    lo, hi = allx.min(axis=red), allx.max(axis=red)
    np.testing.assert_array_equal(np.asarray(state.min_val), lo)
    np.testing.assert_array_equal(np.asarray(state.max_val), hi)
    scale, zp = obs.calculate_qparams(state)
    qmin, qmax = obs.quant_range
    with np.errstate(over="ignore"):
        ref_scale, ref_zp = _minmax_qparams_ref(lo, hi, qmin, qmax, symmetric, dtype)
    assert np.isfinite(np.asarray(scale)).all()
    np.testing.assert_array_equal(np.asarray(scale), ref_scale)
    np.testing.assert_array_equal(np.asarray(zp), ref_zp.astype(np.int32))


torch = None


@SLOW
@given(x=hnp.arrays(np.float32, (256,), elements=finite32), spread=st.floats(1e-3, 1e4))
def test_histogram_observer_matches_pytorch(x, spread):
    global torch
    torch = pytest.importorskip("torch")
    x = (x / np.float32(1e6) * np.float32(spread)).astype(np.float32)
    obs = jq.HistogramObserver(bins=64, reduce_range=True)
    state = obs.update(obs.init(), jnp.asarray(x))
    scale, zp = obs.calculate_qparams(state)
    tobs = torch.ao.quantization.HistogramObserver(bins=64, reduce_range=True)
    tobs(torch.from_numpy(x.copy()))
    tscale, tzp = tobs.calculate_qparams()
    assert np.isfinite(float(scale))
    assert float(scale) == float(tscale[0]) and int(zp) == int(tzp[0])


# ---------------------------------------------------------------------------------- kernels


def _requantize_ref(acc, x_scale, w_scale, out_scale, out_zp, bias, relu, out_dtype):
    atw = np.float32(x_scale) * np.asarray(w_scale, np.float32)
    mult = atw / np.float32(out_scale)
    y = acc.astype(np.float32)
    if bias is not None:
        y = y + bias.astype(np.float32) / atw
    y = np.round(y * mult)
    lo, hi = (0, 255) if out_dtype == np.uint8 else (-128, 127)
    lo = max(lo, out_zp) if relu else lo
    return (np.clip(y, lo - out_zp, hi - out_zp) + out_zp).astype(out_dtype)


kernel_scales = st.floats(f32(1e-4), f32(10.0), width=32)


@SLOW
@given(data=st.data(), m=st.integers(1, 9), k=st.integers(1, 40), n=st.integers(1, 12),
       x_dtype=st.sampled_from([np.uint8, np.int8]), out_dtype=st.sampled_from([np.uint8, np.int8]),
       per_channel=st.booleans(), relu=st.booleans(), with_bias=st.booleans())
def test_static_linear_matches_numpy(data, m, k, n, x_dtype, out_dtype, per_channel, relu, with_bias):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    info = np.iinfo(x_dtype)
    x = rng.integers(info.min, info.max + 1, size=(m, k)).astype(x_dtype)
    w = rng.integers(-128, 128, size=(k, n)).astype(np.int8)
    zx = int(rng.integers(info.min, info.max + 1))
    oinfo = np.iinfo(out_dtype)
    out_zp = int(rng.integers(oinfo.min, oinfo.max + 1))
    x_scale, out_scale = data.draw(kernel_scales), data.draw(kernel_scales)
    w_scale = (np.asarray([data.draw(kernel_scales) for _ in range(n)], np.float32) if per_channel
               else np.float32(data.draw(kernel_scales)))
    bias = rng.normal(size=n).astype(np.float32) * 3 if with_bias else None
    got = np.asarray(quantized_linear(_qtensor(x, x_scale, zx), pack_linear(w, w_scale, 0, bias), out_scale, out_zp,
                                      out_dtype=_QDTYPE[np.dtype(out_dtype)], relu=relu).int_data)
    acc = (x.astype(np.int64) - zx) @ w.astype(np.int64)
    assert np.abs(acc).max(initial=0) < 2**31
    np.testing.assert_array_equal(got, _requantize_ref(acc, x_scale, w_scale, out_scale, out_zp, bias, relu,
                                                       out_dtype))


_QDTYPE = {np.dtype(np.uint8): quint8, np.dtype(np.int8): qint8}


def _qtensor(x, scale, zero_point):
    return QTensor(jnp.asarray(x), jnp.float32(scale), jnp.int32(zero_point), _QDTYPE[np.dtype(x.dtype)])


def _conv_acc_ref(x, w, zx, stride, pad, groups):
    """int64 NHWC conv of (x - zx) with w (kh, kw, cin/g, cout), padding with the zero point."""
    n, h, wd, cin = x.shape
    kh, kw, cin_g, cout = w.shape
    xp = np.pad(x.astype(np.int64) - zx, ((0, 0), pad[0], pad[1], (0, 0)))
    oh = (xp.shape[1] - kh) // stride + 1
    ow = (xp.shape[2] - kw) // stride + 1
    out = np.zeros((n, oh, ow, cout), np.int64)
    cout_g = cout // groups
    for g in range(groups):
        wg = w[..., g * cout_g:(g + 1) * cout_g].astype(np.int64)
        for i in range(kh):
            for j in range(kw):
                patch = xp[:, i:i + stride * oh:stride, j:j + stride * ow:stride, g * cin_g:(g + 1) * cin_g]
                out[..., g * cout_g:(g + 1) * cout_g] += patch @ wg[i, j]
    return out


@SLOW
@given(data=st.data(), size=st.integers(3, 7), cin=st.integers(1, 4), k=st.sampled_from([1, 2, 3]),
       stride=st.sampled_from([1, 2]), pad=st.integers(0, 1), kind=st.sampled_from(["dense", "depthwise", "grouped"]),
       x_dtype=st.sampled_from([np.uint8, np.int8]), relu=st.booleans())
def test_static_conv_matches_numpy(data, size, cin, k, stride, pad, kind, x_dtype, relu):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    if kind == "depthwise":
        groups, cout = cin, cin * data.draw(st.integers(1, 2))
    elif kind == "grouped":
        groups = 2
        cin, cout = 2 * cin, 2 * data.draw(st.integers(1, 3))
    else:
        groups, cout = 1, data.draw(st.integers(1, 5))
    info = np.iinfo(x_dtype)
    x = rng.integers(info.min, info.max + 1, size=(2, size, size, cin)).astype(x_dtype)
    w = rng.integers(-128, 128, size=(k, k, cin // groups, cout)).astype(np.int8)
    zx = int(rng.integers(info.min, info.max + 1))
    w_scale = rng.uniform(1e-3, 1e-1, size=cout).astype(np.float32)
    x_scale, out_scale = np.float32(0.05), data.draw(kernel_scales)
    bias = rng.normal(size=cout).astype(np.float32)
    pads = ((pad, pad), (pad, pad))
    packed = pack_conv(w, w_scale, 0, bias, strides=stride, padding=pads, groups=groups)
    got = np.asarray(quantized_conv(_qtensor(x, x_scale, zx), packed, out_scale, 3, out_dtype=quint8,
                                    relu=relu).int_data)
    acc = _conv_acc_ref(x, w, zx, stride, pads, groups)
    np.testing.assert_array_equal(got, _requantize_ref(acc, x_scale, w_scale, out_scale, 3, bias, relu, np.uint8))
