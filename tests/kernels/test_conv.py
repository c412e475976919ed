import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxquant.kernels.conv as conv_mod
from kernel_refs import dot_signatures, entry_fusions, requantize_ref
from jaxquant.dtypes import qint8, quint8
from jaxquant.kernels.conv import pack_conv, pack_conv_transpose, quantized_conv, quantized_conv_transpose
from jaxquant.qtensor import QTensor

_conv_op = jax.jit(quantized_conv, static_argnames=("out_dtype", "relu"))


def _qdtype(dtype):
    return {np.dtype(np.uint8): quint8, np.dtype(np.int8): qint8}[np.dtype(dtype)]


def _conv(x, packed, sx, zx, so, zo, *, relu=False, out_dtype=np.uint8, op=_conv_op):
    """quantized_conv on integer data ``x`` with input qparams (sx, zx): its output's integers."""
    x = jnp.asarray(x)
    y = op(QTensor(x, jnp.float32(sx), jnp.int32(zx), _qdtype(x.dtype)), packed, jnp.float32(so),
           jnp.int32(zo), out_dtype=_qdtype(out_dtype), relu=relu)
    assert y.dtype == _qdtype(out_dtype) and y.int_data.dtype == np.dtype(out_dtype)
    return y.int_data


def acc_ref(x, zx, w, zw, strides, padding, dilation, groups):
    """sum (x - zx)(w - zw) by XLA's int32 convolution; padding the *difference* with 0 is
    padding x with its zero point."""
    nd = x.ndim - 2
    sp = "DHW"[-nd:]
    xd = jnp.asarray(x.astype(np.int32) - zx)
    wd = jnp.asarray(w.astype(np.int32) - np.broadcast_to(zw, w.shape[-1:]))
    return np.asarray(lax.conv_general_dilated(
        xd, wd, strides, padding, rhs_dilation=dilation, feature_group_count=groups,
        dimension_numbers=("N" + sp + "C", sp + "IO", "N" + sp + "C"),
        preferred_element_type=jnp.int32))


CASES = [  # N, spatial, cin, cout, kernel, strides, padding, dilation, groups -> kind
    (2, (9,), 3, 5, (3,), (1,), "SAME", (1,), 1),
    (2, (9, 11), 3, 5, (3, 3), (1, 1), "SAME", (1, 1), 1),
    (3, (8, 7), 4, 6, (3, 3), (2, 2), ((1, 2), (0, 1)), (1, 1), 1),
    (1, (10, 10), 4, 8, (3, 3), (1, 1), "VALID", (2, 2), 1),
    (2, (6, 6), 16, 8, (1, 1), (1, 1), "VALID", (1, 1), 1),
    (2, (6, 6), 16, 8, (1, 1), (2, 2), "VALID", (1, 1), 1),
    (2, (7, 7), 8, 8, (3, 3), (1, 1), "SAME", (1, 1), 8),
    (2, (7, 7), 8, 16, (3, 3), (2, 2), "SAME", (1, 1), 8),
    (2, (7, 7), 8, 12, (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), 4),
    (1, (5, 6, 7), 4, 6, (3, 2, 3), (1, 2, 1), "SAME", (1, 1, 2), 2),
    (2, (9, 11), 1, 5, (3, 3), (1, 1), "SAME", (1, 1), 1),  # one input channel (K = taps)
    (3, (8, 7), 1, 6, (3, 3), (2, 2), ((1, 2), (0, 1)), (2, 1), 1),
    (2, (9,), 1, 4, (5,), (1,), "VALID", (1,), 1),
]


@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
@pytest.mark.parametrize("x_dtype,per_channel", [(np.uint8, False), (np.int8, True)])
def test_static_conv_exact(rng, case, x_dtype, per_channel):
    n, sp, cin, cout, ks, st, pad, dil, g = case
    w = rng.integers(-128, 128, ks + (cin // g, cout), dtype=np.int8)
    x = rng.integers(0, 256, (n,) + sp + (cin,)).astype(np.uint8)
    zx = int(rng.integers(0, 256))
    sw = rng.uniform(1e-3, 1e-2, cout).astype(np.float32) if per_channel else np.float32(4e-3)
    zw = rng.integers(-3, 4, cout).astype(np.int32) if per_channel else np.int32(0)
    bias = rng.standard_normal(cout).astype(np.float32)
    relu = bool(rng.integers(0, 2))
    x_in, zx_in = (x, zx) if x_dtype == np.uint8 else ((x.astype(np.int16) - 128).astype(np.int8), zx - 128)
    p = pack_conv(w, sw, zw, bias, strides=st, padding=pad, dilation=dil, groups=g)
    got = np.asarray(_conv(x_in, p, 0.02, zx_in, 0.7, 90, relu=relu))
    want = requantize_ref(acc_ref(x, zx, w, zw, st, pad, dil, g), 0.02, sw, 0.7, 90, bias, relu)
    np.testing.assert_array_equal(got, want)


def test_kinds(rng):
    w = lambda *s: np.zeros(s, np.int8)
    kind = lambda wt, **kw: pack_conv(wt, 1.0, 0, None, **kw).kind
    assert kind(w(1, 1, 8, 4)) == "dot"
    assert kind(w(3, 3, 8, 4), padding="SAME") == "im2col"
    assert kind(w(1, 1, 1, 8)) == "dot"
    assert kind(w(3, 3, 1, 8), groups=8) == "depthwise"
    assert kind(w(3, 3, 2, 8), groups=4) == "grouped"


def test_batch_tiling_and_int8_output(rng, monkeypatch):
    monkeypatch.setattr(conv_mod, "IM2COL_TILE_BYTES", 3000)  # forces lax.map over batch tiles
    x = rng.integers(0, 256, (6, 8, 8, 4)).astype(np.uint8)
    w = rng.integers(-128, 128, (3, 3, 4, 5), dtype=np.int8)
    p = pack_conv(w, 0.01, 0, None, padding="SAME")
    jaxpr = str(jax.make_jaxpr(lambda x: _conv(x, p, 0.05, 17, 0.4, -3, out_dtype=np.int8, op=quantized_conv))(x))
    assert "while" in jaxpr or "scan" in jaxpr
    want = requantize_ref(acc_ref(x, 17, w, 0, (1, 1), "SAME", (1, 1), 1), 0.05, 0.01, 0.4, -3, out_dtype=np.int8)
    np.testing.assert_array_equal(np.asarray(_conv(x, p, 0.05, 17, 0.4, -3, out_dtype=np.int8)), want)


def test_vmap(rng):
    x = rng.integers(0, 256, (3, 2, 6, 6, 4)).astype(np.uint8)
    w = rng.integers(-128, 128, (3, 3, 4, 5), dtype=np.int8)
    p = pack_conv(w, 0.01, 0, None, padding="SAME")
    got = jax.jit(jax.vmap(lambda xi: _conv(xi, p, 0.05, 17, 0.4, 3, op=quantized_conv)))(x)
    want = requantize_ref(acc_ref(x.reshape(6, 6, 6, 4), 17, w, 0, (1, 1), "SAME", (1, 1), 1), 0.05, 0.01, 0.4, 3)
    np.testing.assert_array_equal(np.asarray(got).reshape(6, 6, 6, 5), want)


@pytest.mark.parametrize("ks,groups,cin", [((1, 1), 1, 32), ((3, 3), 1, 32), ((3, 3), 32, 32)])
def test_hlo(rng, ks, groups, cin):
    x = rng.integers(0, 256, (2, 14, 14, cin)).astype(np.uint8)
    w = rng.integers(-128, 128, ks + (cin // groups, 32), dtype=np.int8)
    p = pack_conv(w, 0.01, 0, np.zeros(32, np.float32), padding="SAME", groups=groups)
    xq = QTensor(jnp.asarray(x), jnp.float32(0.05), jnp.int32(17), quint8)
    hlo = _conv_op.lower(xq, p, jnp.float32(0.4), jnp.int32(3), out_dtype=quint8, relu=True).compile().as_text()
    assert "convolution(" not in hlo  # never XLA's int8 conv (no VNNI there)
    if groups == 1:
        sig, = dot_signatures(hlo)
        assert "(param_0: u8[" in sig and "param_1: s8[" in sig and "-> s32[" in sig
        # O(cout) float32 fusions fold the per-call input scale into the multiplier and bias
        fusions = [l for l in entry_fusions(hlo) if "= f32[32]{0} fusion" not in l]
        ynn = [i for i, l in enumerate(fusions) if "__ynn_fusion" in l]
        assert len(ynn) == 1 and len(fusions) - ynn[0] - 1 == 1  # one epilogue loop
    else:
        assert " dot(" not in hlo and len([l for l in entry_fusions(hlo) if "= f32[32]{0} fusion" not in l]) <= 2


def _torch_conv_case(torch, rng, cin, cout, k, stride, pad, dil, groups, per_channel, transpose=False):
    shape = (cin, cout // groups, k, k) if transpose else (cout, cin // groups, k, k)
    wf = (rng.standard_normal(shape) * 0.1).astype(np.float32)
    ch_axis = 1 if transpose else 0
    if per_channel and not transpose:
        sw = (np.abs(wf).reshape(cout, -1).max(1) / 127).astype(np.float32)
        wq = torch.quantize_per_channel(torch.tensor(wf), torch.tensor(sw, dtype=torch.float64),
                                        torch.zeros(cout, dtype=torch.int64), ch_axis, torch.qint8)
    else:
        sw = np.float32(np.abs(wf).max() / 127)
        wq = torch.quantize_per_tensor(torch.tensor(wf), float(sw), 0, torch.qint8)
    return wq, sw


@pytest.mark.parametrize("cin,cout,k,stride,pad,dil,groups", [
    (8, 16, 3, 1, 1, 1, 1), (8, 16, 3, 2, 0, 1, 1), (16, 16, 3, 1, 1, 1, 16), (8, 12, 3, 1, 2, 2, 2),
    (16, 8, 1, 1, 0, 1, 1)])
@pytest.mark.parametrize("per_channel", [False, True])
def test_static_conv2d_vs_torch(rng, cin, cout, k, stride, pad, dil, groups, per_channel):
    torch = pytest.importorskip("torch")
    torch.backends.quantized.engine = "x86"
    import torch.ao.nn.quantized as nnq
    wq, sw = _torch_conv_case(torch, rng, cin, cout, k, stride, pad, dil, groups, per_channel)
    b = rng.standard_normal(cout).astype(np.float32) * 0.3
    sx, zx, so, zo = 0.04, 70, 0.2, 60
    mod = nnq.Conv2d(cin, cout, k, stride=stride, padding=pad, dilation=dil, groups=groups)
    mod.set_weight_bias(wq, torch.tensor(b))
    mod.scale, mod.zero_point = so, zo
    x = rng.integers(0, 256, (2, 11, 10, cin)).astype(np.uint8)
    xq = torch._make_per_tensor_quantized_tensor(torch.tensor(x).permute(0, 3, 1, 2).contiguous(), sx, zx)
    want = mod(xq).int_repr().permute(0, 2, 3, 1).numpy().astype(np.int32)
    w = wq.int_repr().permute(2, 3, 1, 0).numpy()  # (kh, kw, cin/g, cout)
    p = pack_conv(w, sw, 0, b, strides=stride, padding=((pad, pad),) * 2, dilation=dil, groups=groups)
    got = np.asarray(_conv(x, p, sx, zx, so, zo)).astype(np.int32)
    assert got.shape == want.shape
    diff = np.abs(got - want)
    assert diff.max() <= 1 and (diff == 0).mean() >= 0.99


@pytest.mark.parametrize("cin,cout,k,stride,pad,opad,dil,groups", [
    (8, 6, 3, 2, 1, 1, 1, 1), (4, 4, 2, 2, 0, 0, 1, 1), (8, 8, 3, 1, 1, 0, 2, 2), (6, 4, 3, 3, 4, 2, 1, 1)])
def test_static_conv_transpose2d_vs_torch(rng, cin, cout, k, stride, pad, opad, dil, groups):
    torch = pytest.importorskip("torch")
    torch.backends.quantized.engine = "x86"
    import torch.ao.nn.quantized as nnq
    wq, sw = _torch_conv_case(torch, rng, cin, cout, k, stride, pad, dil, groups, False, transpose=True)
    b = rng.standard_normal(cout).astype(np.float32) * 0.3
    sx, zx, so, zo = 0.04, 70, 0.2, 60
    mod = nnq.ConvTranspose2d(cin, cout, k, stride=stride, padding=pad, output_padding=opad,
                              groups=groups, dilation=dil)
    mod.set_weight_bias(wq, torch.tensor(b))
    mod.scale, mod.zero_point = so, zo
    x = rng.integers(0, 256, (2, 5, 6, cin)).astype(np.uint8)
    xq = torch._make_per_tensor_quantized_tensor(torch.tensor(x).permute(0, 3, 1, 2).contiguous(), sx, zx)
    want = mod(xq).int_repr().permute(0, 2, 3, 1).numpy().astype(np.int32)
    w = wq.int_repr().permute(2, 3, 0, 1).numpy()  # (kh, kw, cin, cout/g)
    p = pack_conv_transpose(w, sw, 0, b, strides=stride, padding=pad, output_padding=opad, dilation=dil,
                            groups=groups)
    got = np.asarray(_conv(x, p, sx, zx, so, zo, op=jax.jit(quantized_conv_transpose,
                                                             static_argnames=("out_dtype", "relu")))).astype(np.int32)
    assert got.shape == want.shape
    diff = np.abs(got - want)
    assert diff.max() <= 1 and (diff == 0).mean() >= 0.99


def test_errors():
    with pytest.raises(TypeError, match="int8"):
        pack_conv(np.zeros((3, 3, 4, 4), np.float32), 1.0, 0, None)
    with pytest.raises(ValueError, match="padding"):
        pack_conv(np.zeros((3, 3, 4, 4), np.int8), 1.0, 0, None, padding="FULL")
    with pytest.raises(ValueError, match="input_dilation"):
        pack_conv(np.zeros((3, 3, 4, 4), np.int8), 1.0, 0, None, padding="SAME", input_dilation=2)
    p = pack_conv(np.zeros((3, 3, 4, 4), np.int8), 1.0, 0, None)
    with pytest.raises(ValueError, match="expects"):
        _conv(np.zeros((1, 5, 5, 3), np.uint8), p, 1.0, 0, 1.0, 0)
    with pytest.raises(ValueError, match="smaller than"):
        _conv(np.zeros((1, 2, 2, 4), np.uint8), p, 1.0, 0, 1.0, 0)
