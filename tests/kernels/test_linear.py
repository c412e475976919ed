import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.choose_qparams import choose_qparams_from_min_max
from kernel_refs import dot_signatures, entry_fusions, requantize_ref
from jaxquant.dtypes import qint8, quint8
from jaxquant.kernels.linear import pack_linear, quantized_linear, quantized_linear_dynamic
from jaxquant.qtensor import QTensor

_dyn = jax.jit(quantized_linear_dynamic, static_argnames=("reduce_range", "per_token", "relu", "layout"))
_static_op = jax.jit(quantized_linear, static_argnames=("out_dtype", "relu", "layout"))


def _qdtype(dtype):
    return {np.dtype(np.uint8): quint8, np.dtype(np.int8): qint8}[np.dtype(dtype)]


def _xq(x, sx, zx):
    x = jnp.asarray(x)
    return QTensor(x, jnp.float32(sx), jnp.int32(zx), _qdtype(x.dtype))


def _static(x, packed, sx, zx, so, zo, *, relu=False, out_dtype=np.uint8, layout=None):
    """quantized_linear on integer data ``x`` with input qparams (sx, zx): its output's integers."""
    y = _static_op(_xq(x, sx, zx), packed, jnp.float32(so), jnp.int32(zo), out_dtype=_qdtype(out_dtype),
                   relu=relu, layout=layout)
    assert y.q_scale() == np.float32(so) and y.q_zero_point() == zo and y.dtype == _qdtype(out_dtype)
    return y.int_data
_choose = jax.jit(choose_qparams_from_min_max, static_argnums=(2, 3, 4))

SHAPES = [(1, 7, 5), (2, 33, 17), (3, 64, 1), (130, 100, 3)]


def acc_ref(x_u8_or_s8, zx, w, zw):
    return ((x_u8_or_s8.astype(np.int64) - zx)[:, :, None] * (w.astype(np.int64) - np.asarray(zw, np.int64))[None]).sum(1)


def _case(rng, m, k, n, x_dtype, per_channel, nonzero_zw):
    w = rng.integers(-128, 128, (k, n), dtype=np.int8)
    if x_dtype == np.uint8:
        x, zx = rng.integers(0, 256, (m, k)).astype(np.uint8), int(rng.integers(0, 256))
    else:
        x, zx = rng.integers(-128, 128, (m, k)).astype(np.int8), int(rng.integers(-128, 128))
    sw = rng.uniform(1e-3, 1e-2, n).astype(np.float32) if per_channel else np.float32(4e-3)
    if nonzero_zw:
        zw = rng.integers(-5, 6, n).astype(np.int32) if per_channel else np.int32(3)
    else:
        zw = np.int32(0)
    bias = rng.standard_normal(n).astype(np.float32)
    return x, zx, w, sw, zw, bias


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("x_dtype", [np.uint8, np.int8])
@pytest.mark.parametrize("per_channel,nonzero_zw", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("layout", ["weight_lhs", "act_lhs"])
def test_static_linear_exact(rng, m, k, n, x_dtype, per_channel, nonzero_zw, layout):
    x, zx, w, sw, zw, bias = _case(rng, m, k, n, x_dtype, per_channel, nonzero_zw)
    relu = bool(rng.integers(0, 2))
    out_dtype = [np.uint8, np.int8][int(rng.integers(0, 2))]
    zo = int(rng.integers(0, 256)) if out_dtype == np.uint8 else int(rng.integers(-128, 128))
    p = pack_linear(w, sw, zw, bias)
    got = _static(x, p, 0.02, zx, 0.5, zo, relu=relu, out_dtype=out_dtype, layout=layout)
    want = requantize_ref(acc_ref(x, zx, w, zw), 0.02, sw, 0.5, zo, bias, relu, out_dtype)
    assert got.dtype == out_dtype
    np.testing.assert_array_equal(np.asarray(got), want)


def test_static_linear_no_bias_batch_dims_auto_layout(rng):
    x, zx, w, sw, zw, _ = _case(rng, 24, 40, 12, np.uint8, True, False)
    p = pack_linear(w, sw, zw, None)
    got = _static(x.reshape(2, 3, 4, 40), p, 0.03, zx, 0.2, 7)
    want = requantize_ref(acc_ref(x, zx, w, zw), 0.03, sw, 0.2, 7).reshape(2, 3, 4, 12)
    np.testing.assert_array_equal(np.asarray(got), want)
    for layouts in ["weight_lhs", "act_lhs"]:
        p1 = pack_linear(w, sw, zw, None, layouts=layouts)
        np.testing.assert_array_equal(np.asarray(_static(x, p1, 0.03, zx, 0.2, 7)), want.reshape(24, 12))
        other = {"weight_lhs": "act_lhs", "act_lhs": "weight_lhs"}[layouts]
        with pytest.raises(ValueError, match="not stored"):
            _static(x, p1, 0.03, zx, 0.2, 7, layout=other)
    # the untransposed (K, N) act-LHS layout (weights packed inside a traced function) agrees
    p_kn = pack_linear(w, sw, zw, None, layouts="act_lhs", act_lhs_kn=True)
    np.testing.assert_array_equal(np.asarray(_static(x, p_kn, 0.03, zx, 0.2, 7)), want.reshape(24, 12))


def test_static_linear_vmap_over_params(rng):
    x, zx, w, sw, zw, bias = _case(rng, 5, 16, 8, np.uint8, False, False)
    ws = np.stack([w, -w.clip(-127)])
    ps = jax.vmap(lambda w: pack_linear(w, sw, zw, bias))(ws)
    got = jax.vmap(lambda p: _static(x, p, 0.02, zx, 0.5, 100))(ps)
    for i in range(2):
        want = requantize_ref(acc_ref(x, zx, ws[i], zw), 0.02, sw, 0.5, 100, bias)
        np.testing.assert_array_equal(np.asarray(got[i]), want)


@pytest.mark.parametrize("m", [1, 8, 256])
def test_static_linear_hlo_one_dot_one_epilogue(rng, m):
    x, zx, w, sw, zw, bias = _case(rng, m, 256, 128, np.uint8, True, False)
    p = pack_linear(w, sw, zw, bias)
    hlo = _static_op.lower(_xq(x, 0.02, zx), p, jnp.float32(0.5), jnp.int32(100), out_dtype=quint8,
                           relu=True).compile().as_text()
    fusions = entry_fusions(hlo)
    assert sum("__ynn_fusion" in l for l in fusions) == 1
    sig, = dot_signatures(hlo)
    assert "(param_0: u8[" in sig and "param_1: s8[" in sig and "-> s32[" in sig
    # the dot, then ONE loop fusion for offsets/bias/multiplier/round/clamp/cast
    # (small M adds the x -> x-128 shift/pad before the dot)
    # besides: at most two O(N) float32 fusions folding the per-call input scale into the
    # multiplier and bias (the input qparams travel with the input QTensor)
    per_column = [l for l in fusions if "= f32[128]{0} fusion" in l]
    assert len(per_column) <= 2
    after = [l for l in fusions[[i for i, l in enumerate(fusions) if "__ynn_fusion" in l][0] + 1:]
             if l not in per_column]
    assert len(after) == 1 and "u8[" in after[0].split("=")[1], fusions
    assert len(fusions) - len(per_column) <= (2 if m > 128 else 3), fusions


def dyn_ref(x, w, sw, zw, bias, reduce_range, per_token):
    """Dynamic linear in numpy: qparams from the lead's choose_qparams (PyTorch's formula),
    quantize with the float32 reciprocal, exact int64 accumulation, float dequantization."""
    if per_token:
        lo, hi = x.min(1, keepdims=True), x.max(1, keepdims=True)
    else:
        lo, hi = x.min(), x.max()
    s, z = (np.asarray(a) for a in _choose(lo, hi, 0, 255, reduce_range))
    qmax = 127 if reduce_range else 255
    q = np.clip(np.round(x * (np.float32(1) / s)) + z, 0, qmax).astype(np.int64)
    acc = ((q - z)[:, :, None] * (w.astype(np.int64) - np.asarray(zw, np.int64))[None]).sum(1)
    return acc.astype(np.float32) * (s * np.asarray(sw, np.float32)) + bias


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("layout", ["weight_lhs", "act_lhs"])
def test_dynamic_linear_matches_reference(rng, m, k, n, per_token, layout):
    x = (rng.standard_normal((m, k)) * 3 + 1).astype(np.float32)
    w = rng.integers(-127, 128, (k, n), dtype=np.int8)
    sw = rng.uniform(1e-3, 1e-2, n).astype(np.float32)
    zw = rng.integers(-2, 3, n).astype(np.int32)
    bias = rng.standard_normal(n).astype(np.float32)
    p = pack_linear(w, sw, zw, bias)
    got = np.asarray(_dyn(x, p, per_token=per_token, layout=layout))
    want = dyn_ref(x, w, sw, zw, bias, True, per_token)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4 * np.abs(want).max())


def test_dynamic_linear_per_token_more_accurate(rng):
    # rows with very different ranges: per-token quantization must be closer to float
    x = (rng.standard_normal((16, 256)) * np.logspace(-2, 1, 16)[:, None]).astype(np.float32)
    wf = rng.standard_normal((256, 64)).astype(np.float32)
    sw = np.abs(wf).max(0) / 127
    w = np.round(wf / sw).astype(np.int8)
    p = pack_linear(w, sw, 0, None)
    exact = x @ (w.astype(np.float32) * sw)
    err = lambda y: np.abs(np.asarray(y) - exact).mean()
    assert err(_dyn(x, p, per_token=True)) < 0.5 * err(_dyn(x, p))


def _torch_weight(torch, rng, k, n, per_channel):
    wf = (rng.standard_normal((n, k)) * 0.1).astype(np.float32)
    if per_channel:
        sw = (np.abs(wf).max(1) / 127).astype(np.float32)
        wq = torch.quantize_per_channel(torch.tensor(wf), torch.tensor(sw, dtype=torch.float64),
                                        torch.zeros(n, dtype=torch.int64), 0, torch.qint8)
    else:
        sw = np.float32(np.abs(wf).max() / 127)
        wq = torch.quantize_per_tensor(torch.tensor(wf), float(sw), 0, torch.qint8)
    return wq, wq.int_repr().numpy().T.copy(), sw


@pytest.mark.parametrize("m,k,n", [(1, 64, 32), (4, 768, 96), (300, 128, 64)])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("reduce_range", [True, False])
def test_dynamic_linear_vs_torch(rng, m, k, n, per_channel, reduce_range):
    torch = pytest.importorskip("torch")
    torch.backends.quantized.engine = "x86"
    wq, w, sw = _torch_weight(torch, rng, k, n, per_channel)
    b = rng.standard_normal(n).astype(np.float32)
    packed = torch.ops.quantized.linear_prepack(wq, torch.tensor(b))
    x = (rng.standard_normal((m, k)) * 2 + 0.5).astype(np.float32)
    want = torch.ops.quantized.linear_dynamic(torch.tensor(x), packed, reduce_range).numpy()
    p = pack_linear(w, sw, 0, b)
    qmax = 127 if reduce_range else 255
    x_step = (max(x.max(), 0) - min(x.min(), 0)) / qmax
    # one activation step moves each output by at most x_step * sum_k |w_kn| * w_scale
    tol = x_step * np.abs(w.astype(np.float32)).sum(0) * np.asarray(sw) + 1e-5
    for layout in ["weight_lhs", "act_lhs"]:
        got = np.asarray(_dyn(x, p, reduce_range=reduce_range, layout=layout))
        assert np.all(np.abs(got - want) <= tol)
        # in practice fbgemm and this kernel agree to float rounding
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("m,k,n", [(1, 64, 32), (37, 200, 50), (256, 128, 96)])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("relu", [False, True])
def test_static_linear_vs_torch(rng, m, k, n, per_channel, relu):
    torch = pytest.importorskip("torch")
    torch.backends.quantized.engine = "x86"
    import torch.ao.nn.quantized as nnq
    import torch.ao.nn.intrinsic.quantized as nniq
    wq, w, sw = _torch_weight(torch, rng, k, n, per_channel)
    b = rng.standard_normal(n).astype(np.float32)
    sx, zx, so, zo = 0.05, 60, 0.3, 70
    mod = (nniq.LinearReLU if relu else nnq.Linear)(k, n)
    mod.set_weight_bias(wq, torch.tensor(b))
    mod.scale, mod.zero_point = so, zo
    x = rng.integers(0, 256, (m, k)).astype(np.uint8)
    xq = torch._make_per_tensor_quantized_tensor(torch.tensor(x), sx, zx)
    want = mod(xq).int_repr().numpy().astype(np.int32)
    got = np.asarray(_static(x, pack_linear(w, sw, 0, b), sx, zx, so, zo, relu=relu)).astype(np.int32)
    diff = np.abs(got - want)
    assert diff.max() <= 1 and (diff == 0).mean() >= 0.99


def test_errors(rng):
    w = rng.integers(-128, 128, (8, 4), dtype=np.int8)
    with pytest.raises(TypeError, match="int8"):
        pack_linear(w.astype(np.int32), 1.0, 0, None)
    with pytest.raises(ValueError, match="bias must have shape"):
        pack_linear(w, 1.0, 0, np.zeros(5, np.float32))
    with pytest.raises(ValueError, match="act_lhs_kn"):
        pack_linear(w, 1.0, 0, None, act_lhs_kn=True)
    p = pack_linear(w, 1.0, 0, None)
    with pytest.raises(ValueError, match="features"):
        _static(np.zeros((2, 9), np.uint8), p, 1.0, 0, 1.0, 0)
    with pytest.raises(ValueError, match="per tensor"):
        quantized_linear(QTensor(jnp.zeros((2, 8), jnp.uint8), jnp.ones(8), jnp.zeros(8, jnp.int32), quint8,
                                 axis=1), p, 1.0, 0, out_dtype=quint8)
    with pytest.raises(TypeError, match="uint8 or int8"):
        quantized_linear(QTensor(jnp.zeros((2, 8), jnp.int32), jnp.float32(1), jnp.int32(0), quint8), p,
                         1.0, 0, out_dtype=quint8)
