"""Dynamic ``nnx.LinearGeneral`` / ``nnx.Einsum`` (and so ``nnx.MultiHeadAttention``) against numpy
references written from the formulas, plus the per-token preset.

Reference pipeline per projection (fbgemm's dynamic linear, x86 ``reduce_range``: activation levels
0..127): weight scale ``max|w| / 127.5`` (symmetric qint8), ``w_q = round(w / s_w)``; activation
``s_x = (max(x, 0) - min(x, 0)) / 127``, ``z_x = round(-min / s_x)``, ``x_q = clip(round(x / s_x + z_x))`` (zero point added before rounding);
``y = (x_q - z_x) @ w_q * (s_x s_w) + b``. The integer accumulators are exact in both, so outputs
agree to float32 rounding of the last multiply-add (asserted at 1e-5 relative to the output's scale).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxquant import float16
from jaxquant import qconfig as qc
from jaxquant.nn import dynamic as nnqd
from jaxquant.nn.dynamic.einsum import MatmulEinsum
from jaxquant.transforms.quantize_dynamic import get_default_dynamic_quant_module_mappings, quantize_dynamic


def np_weight_q(w2, per_channel=False):
    """Symmetric qint8 weight quantization of a (K, N) kernel: per tensor or per column."""
    amax = np.abs(w2).max(axis=0) if per_channel else np.abs(w2).max()
    ws = (np.asarray(amax, np.float32) / np.float32(127.5)).astype(np.float32)
    wq = np.clip(np.round(w2 * (np.float32(1) / ws)), -128, 127)
    return wq, ws


def np_act_q(x, axis=None):
    """Dynamic uint8 activation qparams over [0, 127] (reduce_range), per tensor or per row."""
    lo = np.minimum(x.min(axis=axis, keepdims=axis is not None), 0).astype(np.float32)
    hi = np.maximum(x.max(axis=axis, keepdims=axis is not None), 0).astype(np.float32)
    xs = ((hi.astype(np.float64) - lo) / 127).astype(np.float32)
    zp = np.clip(np.round(np.float32(0) - lo / xs), 0, 127)
    xq = np.clip(np.round(x * (np.float32(1) / xs) + zp), 0, 127)
    return xq, xs, zp


def np_dyn_linear(x2, w2, b, per_channel=False, per_token=False):
    wq, ws = np_weight_q(w2, per_channel)
    xq, xs, zp = np_act_q(x2, axis=1 if per_token else None)
    acc = (xq - zp).astype(np.int64) @ wq.astype(np.int64)
    y = acc.astype(np.float32) * (xs * ws)
    return y + b if b is not None else y


def np_softmax(a):
    a = a - a.max(-1, keepdims=True)
    e = np.exp(a)
    return e / e.sum(-1, keepdims=True)


def _mha(seed=0):
    return nnx.MultiHeadAttention(num_heads=4, in_features=32, qkv_features=48, out_features=24,
                                  decode=False, rngs=nnx.Rngs(seed))


def np_mha(m, x, per_channel=False):
    """MultiHeadAttention with each projection run through the numpy dynamic-linear reference."""
    def proj(mod, inp, n_in_axes):
        w = np.asarray(mod.kernel[...], np.float32)
        k = math.prod(w.shape[:n_in_axes])
        lead = inp.shape[:inp.ndim - n_in_axes]
        y = np_dyn_linear(inp.reshape(-1, k), w.reshape(k, -1), np.asarray(mod.bias[...]).reshape(-1),
                          per_channel)
        return y.reshape(*lead, *w.shape[n_in_axes:])

    q, k, v = (proj(mod, x, 1) for mod in (m.query, m.key, m.value))   # (B, T, H, D)
    d = q.shape[-1]
    logits = np.einsum("bqhd,bkhd->bhqk", q / np.float32(np.sqrt(d)), k)
    attn = np.einsum("bhqk,bkhd->bqhd", np_softmax(logits), v)
    return proj(m.out, attn, 2)


@nnx.jit
def run(model, x):
    return model(x)


@pytest.mark.parametrize("qconfig", ["default_dynamic_qconfig", "per_channel_dynamic_qconfig"])
def test_multi_head_attention_matches_numpy_reference_and_float(qconfig):
    m = _mha()
    x = np.random.default_rng(0).normal(size=(2, 9, 32)).astype(np.float32)
    q = quantize_dynamic(m, {nnx.LinearGeneral: getattr(qc, qconfig)})
    for name in ("query", "key", "value", "out"):
        assert isinstance(getattr(q, name), nnqd.LinearGeneral), name
    y = np.asarray(run(q, jnp.asarray(x)))
    ref = np_mha(m, x, per_channel=qconfig.startswith("per_channel"))
    scale = np.abs(ref).max()
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-5 * scale)
    # close to float: 7-bit activations and 8-bit weights on four chained projections; each one adds
    # about (s_x/2 sum|w| + |x| s_w/2) ~ 1 % rms, so 5 % relative (Frobenius) leaves room, not slack
    yf = np.asarray(m(jnp.asarray(x)))
    rel = np.linalg.norm(y - yf) / np.linalg.norm(yf)
    assert rel < 0.05, rel
    assert rel > 1e-4  # it really is quantized


def test_multi_head_attention_weights_are_the_observer_integers():
    m = _mha(1)
    q = quantize_dynamic(m, {nnx.LinearGeneral: qc.per_channel_dynamic_qconfig})
    w = np.asarray(m.query.kernel[...]).reshape(32, 48)
    wq, ws = np_weight_q(w, per_channel=True)
    got = q.query.linear.weight()
    np.testing.assert_array_equal(np.asarray(got.int_repr()), wq.astype(np.int8))
    np.testing.assert_allclose(np.asarray(got.q_per_channel_scales()), ws, rtol=1e-6)


def test_linear_general_multiple_in_and_out_axes():
    lg = nnx.LinearGeneral((3, 4), (2, 5), axis=(1, -1), rngs=nnx.Rngs(0))
    lg.bias.set_value(jax.random.normal(jax.random.key(1), (2, 5)))
    x = np.random.default_rng(1).normal(size=(2, 3, 6, 4)).astype(np.float32)
    q = nnqd.LinearGeneral.from_float(lg, qc.default_dynamic_qconfig, "lg")
    y = np.asarray(run(q, jnp.asarray(x)))
    assert y.shape == (2, 6, 2, 5) == lg(jnp.asarray(x)).shape
    # reference by hand: contracted axes (1, 3) moved last, flattened, numpy dynamic linear
    x2 = np.moveaxis(x, (1, 3), (2, 3)).reshape(12, 12)
    ref = np_dyn_linear(x2, np.asarray(lg.kernel[...]).reshape(12, 10), np.asarray(lg.bias[...]).reshape(10))
    np.testing.assert_allclose(y, ref.reshape(2, 6, 2, 5), rtol=0, atol=1e-5 * np.abs(ref).max())
    yf = np.asarray(lg(jnp.asarray(x)))
    assert np.linalg.norm(y - yf) / np.linalg.norm(yf) < 0.03


def _fake_quant_einsum(eq, x, kernel, bias):
    """Independent of the reshaping: dequantize the per-tensor-quantized input and weight, then
    ``np.einsum`` with the float equation (exact up to float rounding)."""
    xq, xs, zp = np_act_q(x)
    _, ws = np_weight_q(kernel)
    wq = np.clip(np.round(kernel * (np.float32(1) / ws)), -128, 127)
    y = np.einsum(eq, ((xq - zp) * xs).astype(np.float64), (wq * ws).astype(np.float64))
    return (y + bias).astype(np.float32) if bias is not None else y.astype(np.float32)


@pytest.mark.parametrize("eq, kshape, bshape, xshape", [
    ("...k,kn->...n", (8, 16), (16,), (2, 3, 8)),
    ("BTNH,NHD->BTD", (4, 8, 16), (16,), (2, 3, 4, 8)),
    ("BKT,KN->BNT", (8, 5), (5, 1), (3, 8, 7)),         # contracted axis in the middle, output interleaved
    ("btk,kNH->bNtH", (8, 2, 3), (2, 1, 3), (2, 4, 8)),  # several feature labels, reordered
])
def test_einsum_patterns(eq, kshape, bshape, xshape):
    e = nnx.Einsum(eq, kshape, bshape, rngs=nnx.Rngs(0))
    e.bias.set_value(jax.random.normal(jax.random.key(3), bshape))
    x = np.random.default_rng(2).normal(size=xshape).astype(np.float32)
    q = quantize_dynamic(nnx.Sequential(e)).layers[0]
    assert isinstance(q, nnqd.Einsum)
    y = np.asarray(run(q, jnp.asarray(x)))
    yf = np.asarray(e(jnp.asarray(x)))
    assert y.shape == yf.shape
    kernel = np.asarray(e.kernel[...], np.float32)
    # flax's own broadcast of the bias, read off the float module
    bias_b = yf - np.einsum(eq, x.astype(np.float64), kernel.astype(np.float64))
    ref = _fake_quant_einsum(eq, x, kernel, bias_b)
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    assert np.linalg.norm(y - yf) / np.linalg.norm(yf) < 0.03


def test_einsum_refuses_what_is_not_a_matrix_product():
    batched = nnx.Einsum("BTNH,NHD->BTND", (4, 8, 16), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"'attn\.proj'.*batched dot"):
        nnqd.Einsum.from_float(batched, qc.default_dynamic_qconfig, "attn.proj")
    with pytest.raises(ValueError, match="summed within one operand"):
        MatmulEinsum.parse("bk,kn->b")
    with pytest.raises(ValueError, match="repeated label"):
        MatmulEinsum.parse("bkk,kn->bn")
    no_eq = nnx.Einsum("bk,kn->bn", (8, 16), rngs=nnx.Rngs(0))
    no_eq.einsum_str = None  # flax allows giving the equation per call instead
    with pytest.raises(ValueError, match="no einsum_str"):
        nnqd.Einsum.from_float(no_eq, qc.default_dynamic_qconfig, "e")
    q = nnqd.Einsum.from_float(nnx.Einsum("bk,kn->bn", (8, 16), rngs=nnx.Rngs(0)), qc.default_dynamic_qconfig, "e")
    with pytest.raises(ValueError, match="quantized for 'bk,kn->bn'"):
        q(jnp.ones((2, 8)), "bk,kn->nb")
    with pytest.raises(ValueError, match="sizes"):
        q(jnp.ones((2, 7)))


def test_linear_general_batch_axis_refused_and_spec_can_skip_it():
    lg = nnx.LinearGeneral(4, 3, axis=-1, batch_axis={0: 2}, rngs=nnx.Rngs(0))
    model = nnx.Sequential(lg, nnx.Linear(3, 3, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"'layers\.0'.*batch_axis"):
        quantize_dynamic(model)
    q = quantize_dynamic(model, {nnx.Linear: qc.default_dynamic_qconfig})
    assert type(q.layers[0]) is nnx.LinearGeneral and isinstance(q.layers[1], nnqd.Linear)


def test_mapping_and_float16_variant():
    mapping = get_default_dynamic_quant_module_mappings()
    assert mapping[nnx.LinearGeneral] is nnqd.LinearGeneral and mapping[nnx.Einsum] is nnqd.Einsum
    m = _mha(2)
    x = jnp.asarray(np.random.default_rng(3).normal(size=(1, 5, 32)).astype(np.float32))
    q = quantize_dynamic(m, dtype=float16)
    assert isinstance(q.query.linear, nnqd.Float16Linear)
    # fp16 weights (11-bit mantissa), f32 math: relative rounding 2**-11 per weight
    np.testing.assert_allclose(np.asarray(q(x)), np.asarray(m(x)), rtol=0, atol=2e-3 * float(jnp.abs(m(x)).max()))


def test_per_token_dynamic_qconfig():
    assert qc.per_token_dynamic_qconfig.activation().qscheme.is_per_channel
    lg = nnx.LinearGeneral(16, (2, 4), rngs=nnx.Rngs(0))
    rows = np.logspace(-2, 1, 6, dtype=np.float32)[:, None]
    x = (np.random.default_rng(4).normal(size=(6, 16)).astype(np.float32) * rows)
    q = quantize_dynamic(nnx.Sequential(lg), {nnx.LinearGeneral: qc.per_token_dynamic_qconfig}).layers[0]
    assert q.linear.per_token and q.linear.weight_qscheme.is_per_channel
    y = np.asarray(run(q, jnp.asarray(x))).reshape(6, 8)
    ref = np_dyn_linear(x, np.asarray(lg.kernel[...]).reshape(16, 8), np.asarray(lg.bias[...]).reshape(8),
                        per_channel=True, per_token=True)
    # per row, relative to that row's own scale: small rows keep their precision
    assert np.all(np.abs(y - ref) <= 1e-5 * np.abs(ref).max(axis=1, keepdims=True))
    # the preset's per-token choice reaches quantize_dynamic's module-level default too
    assert quantize_dynamic(nnx.Sequential(nnx.Linear(4, 4, rngs=nnx.Rngs(0))),
                            {nnx.Linear: qc.per_token_dynamic_qconfig}).layers[0].per_token
