"""The native batched int8 matmul (Linear above GEMV_MAX_M rows) and the native 8-bit max pool
(csrc/onednn_matmul_pool.cc) against int64/numpy references and the pure-XLA kernels, bit for bit; the
dispatch (size limits, jq.use_native(False)) and the compiled HLO of the Fashion CNN."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.dtypes import qint8, quint8
from jaxquant.kernels.linear import int8_matmul_acc, pack_linear, pack_weight, quantized_linear, quantized_linear_dynamic
from jaxquant.kernels.pooling import quantized_max_pool2d
from jaxquant.native import GEMV_MAX_M, native_backend_available, native_backend_reason, use_native
from jaxquant.nn import max_pool2d
from jaxquant.qtensor import QTensor

needs_native = pytest.mark.skipif(not native_backend_available(),
                                  reason=f"native backend unavailable: {native_backend_reason()}")


def _both(fn, *args):
    """(native result, pure-XLA result, native jaxpr text) of ``jax.jit(fn)(*args)``."""
    with use_native(True):
        native = np.asarray(jax.jit(fn)(*args))
        jaxpr = str(jax.make_jaxpr(fn)(*args))
    with use_native(False):
        xla = np.asarray(jax.jit(fn)(*args))
    return native, xla, jaxpr


# ----------------------------------------------------------------------------------- matmul

@needs_native
@pytest.mark.parametrize("m,k,n", [(5, 64, 64), (5, 100, 70), (64, 3136, 128), (64, 130, 10), (33, 257, 130)])
def test_matmul_raw_dot_exact(m, k, n):
    """Ragged K (not a multiple of 4, 16 or 64) and N (not a multiple of 64) included."""
    from jaxquant.native import ops
    rng = np.random.default_rng(m * k + n)
    x = rng.integers(0, 256, (m, k)).astype(np.uint8)
    w = rng.integers(-128, 128, (k, n), dtype=np.int8)
    with use_native(True):
        packed = ops.pack_gemv_weight(jnp.asarray(w))
        got = np.asarray(jax.jit(lambda x: ops.native_matmul(x, packed, n))(x))
    np.testing.assert_array_equal(got, x.astype(np.int64) @ w.astype(np.int64))


@needs_native
@pytest.mark.parametrize("m", [GEMV_MAX_M + 1, 64])
@pytest.mark.parametrize("per_channel_zw", [False, True])
def test_matmul_acc_native_equals_xla(m, per_channel_zw):
    rng = np.random.default_rng(m)
    k, n = 200, 96
    w = rng.integers(-128, 128, (k, n), dtype=np.int8)
    zw = rng.integers(-3, 4, n).astype(np.int32) if per_channel_zw else np.int32(0)
    x = rng.integers(0, 256, (m, k)).astype(np.uint8)
    zx = np.int32(rng.integers(0, 256))
    with use_native(True):
        pw = pack_weight(w, zw)
    native, xla, jaxpr = _both(lambda x: int8_matmul_acc(x, zx, pw), x)
    assert "jaxquant_matmul_u8s8" in jaxpr and "jaxquant_gemv" not in jaxpr
    want = (x.astype(np.int64) - zx) @ (w.astype(np.int64) - np.broadcast_to(zw, (n,)))
    np.testing.assert_array_equal(native, want)
    np.testing.assert_array_equal(xla, want)


@needs_native
@pytest.mark.parametrize("x_dtype", [np.uint8, np.int8])
def test_static_and_dynamic_linear_batched_native_equal_xla(x_dtype):
    rng = np.random.default_rng(12)
    k, n = 300, 80
    w = rng.integers(-127, 128, (k, n), dtype=np.int8)
    sw = rng.uniform(1e-3, 1e-2, n).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    lo = 0 if x_dtype == np.uint8 else -128
    xq = rng.integers(lo, lo + 256, (2, 32, k)).astype(x_dtype)  # 64 rows: the matmul
    with use_native(True):
        pl = pack_linear(w, sw, 0, bias)
    xq_t = QTensor(jnp.asarray(xq), jnp.float32(0.03), jnp.int32(lo + 101), quint8 if x_dtype == np.uint8 else qint8)
    native, xla, jaxpr = _both(
        lambda xq: quantized_linear(xq, pl, jnp.float32(0.2), jnp.int32(117), out_dtype=quint8, relu=True).int_data,
        xq_t)
    assert "jaxquant_matmul_u8s8" in jaxpr
    np.testing.assert_array_equal(native, xla)
    assert len(np.unique(native)) > 10
    for per_token in (False, True):
        xf = rng.standard_normal((64, k)).astype(np.float32)
        native, xla, jaxpr = _both(lambda x: quantized_linear_dynamic(x, pl, per_token=per_token), xf)
        assert "jaxquant_matmul_u8s8" in jaxpr
        np.testing.assert_array_equal(native, xla)


@needs_native
def test_large_weights_and_forced_fallback_stay_on_xla(monkeypatch):
    from jaxquant.native import ops
    rng = np.random.default_rng(0)
    w = rng.integers(-128, 128, (64, 32), dtype=np.int8)
    x = np.zeros((16, 64), np.uint8)
    with use_native(True):
        pw = pack_weight(w, 0)
        assert "jaxquant_matmul_u8s8" in str(jax.make_jaxpr(lambda x: int8_matmul_acc(x, 0, pw))(x))
        monkeypatch.setattr(ops, "MATMUL_MAX_WEIGHT", 64 * 32 - 1)
        assert "jaxquant_" not in str(jax.make_jaxpr(lambda x: int8_matmul_acc(x, 0, pw))(x))
    monkeypatch.undo()
    with use_native(False):
        assert "jaxquant_" not in str(jax.make_jaxpr(lambda x: int8_matmul_acc(x, 0, pw))(x))


@needs_native
def test_matmul_rejects_a_blob_of_the_wrong_size():
    from jaxquant.native import ops
    with pytest.raises(Exception, match="packed weight size does not match"):
        jax.block_until_ready(ops.native_matmul(np.zeros((8, 64), np.uint8), jnp.zeros((100,), jnp.int8), 64))


# ------------------------------------------------------------------------------------ pool

def _numpy_max_pool(x, kernel, stride, padding):
    """Max over each window's in-image taps, in numpy (the reference both paths must equal)."""
    n, h, w, c = x.shape
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    out = np.empty((n, oh, ow, c), x.dtype)
    for i in range(oh):
        for j in range(ow):
            y0, x0 = i * sh - ph, j * sw - pw
            win = x[:, max(y0, 0):y0 + kh, max(x0, 0):x0 + kw]
            out[:, i, j] = win.max(axis=(1, 2))
    return out


POOL_CASES = [  # shape (N, H, W, C), kernel, stride, padding
    ((2, 28, 28, 32), (2, 2), (2, 2), (0, 0)),
    ((3, 7, 9, 70), (2, 2), (2, 2), (0, 0)),     # odd H/W (last row/column dropped), C not a multiple of 64
    ((2, 9, 11, 5), (3, 3), (2, 2), (1, 1)),     # padded, overlapping windows
    ((1, 8, 8, 130), (3, 3), (2, 2), (1, 1)),
    ((2, 6, 10, 3), (2, 3), (1, 2), (1, 1)),     # rectangular window and stride
]


@needs_native
@pytest.mark.parametrize("shape,kernel,stride,padding", POOL_CASES)
@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
def test_max_pool_native_equals_xla_and_numpy(shape, kernel, stride, padding, dtype):
    info = np.iinfo(dtype)
    rng = np.random.default_rng(sum(shape))
    x = rng.integers(info.min, info.max + 1, shape).astype(dtype)
    x.reshape(-1)[::7] = info.min  # windows whose only maximum is the dtype's minimum
    native, xla, jaxpr = _both(lambda x: quantized_max_pool2d(x, kernel, stride, padding), x)
    assert "jaxquant_maxpool_u8" in jaxpr
    want = _numpy_max_pool(x, kernel, stride, padding)
    np.testing.assert_array_equal(native, want)
    np.testing.assert_array_equal(xla, want)


@needs_native
def test_max_pool_module_function_dispatch_and_fallback():
    """``jaxquant.nn.max_pool2d`` on a QTensor reaches the native pool; float input and
    ``use_native(False)`` stay on XLA's reduce_window (compiled HLO)."""
    rng = np.random.default_rng(3)
    xq = QTensor(jnp.asarray(rng.integers(0, 256, (2, 8, 8, 16)).astype(np.uint8)), jnp.float32(0.1),
                 jnp.int32(3), quint8)
    f = jax.jit(lambda xq: max_pool2d(xq, 2).int_data)
    with use_native(True):
        hlo = f.lower(xq).compile().as_text()
        assert "jaxquant_maxpool_u8" in hlo
        float_hlo = jax.jit(lambda x: max_pool2d(x, 2)).lower(jnp.zeros((2, 8, 8, 16))).compile().as_text()
        assert "jaxquant_" not in float_hlo
    with use_native(False):
        assert "jaxquant_" not in f.lower(xq).compile().as_text()


@needs_native
def test_max_pool_rejects_a_wrong_output_shape():
    x = jnp.zeros((1, 8, 8, 4), jnp.uint8)
    call = jax.ffi.ffi_call("jaxquant_maxpool_u8", jax.ShapeDtypeStruct((1, 5, 4, 4), jnp.uint8))
    with pytest.raises(Exception, match="output shape does not match"):
        jax.block_until_ready(call(x, cfg=np.asarray([2, 2, 2, 2, 0, 0, 0, 0], np.int64)))
    with pytest.raises(Exception, match="window, stride or padding out of range"):
        jax.block_until_ready(call(x, cfg=np.asarray([2, 2, 2, 2, 2, 2, 0, 0], np.int64)))

