"""The native ops: packing (numpy/ctypes, at convert time) and the ``jax.ffi.ffi_call`` wrappers.

This is the one module the kernel ops call (``kernels/conv.py``, ``kernels/linear.py``); they decide
with :func:`conv_supported` / :func:`gemv_supported` at trace time and fall back to XLA otherwise.
"""
from __future__ import annotations

import ctypes
import os
import re
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.native import GEMV_MAX_M, MATMUL_MAX_WEIGHT, _lib, native_enabled

__all__ = ["CONV_CFG_FIELDS", "conv_cfg", "pack_conv_weight", "native_conv", "conv_impl_name",
           "pack_gemv_weight", "native_gemv", "native_gemv_dynamic", "gemv_supported", "conv_supported", "GEMV_COLS",
           "matmul_impl_name", "matmul_supported", "native_matmul", "pool_supported", "native_max_pool"]

# Must match CfgIndex in csrc/jaxquant_native.cc.
CONV_CFG_FIELDS = ("kh", "kw", "sh", "sw", "pt", "pb", "pl", "pr", "dh", "dw", "groups", "cin", "cout",
                   "relu", "has_bias", "dst_s8", "src_zp")
GEMV_COLS = 64  # output columns per packed group (csrc kCols)
# Conv sizes handed to oneDNN: every dim must fit the library's int64 dims and our checks.
_MAX_DIM = 1 << 24


def _concrete(*vals) -> bool:
    return all(isinstance(v, (int, np.integer)) for v in vals)


def conv_cfg(kernel_size: Sequence[int], strides: Sequence[int], pads: Sequence[tuple[int, int]],
             dilation: Sequence[int], groups: int, cin: int, cout: int, relu: bool, has_bias: bool,
             out_dtype: str) -> Optional[np.ndarray]:
    """int64 ``(17,)`` config for a 1-D or 2-D conv (1-D as a 1 x k 2-D conv), or None when the
    native kernel does not take it (3-D, negative padding).

    ``src_zp`` is set for depthwise convs (``groups == cin``): oneDNN's depthwise kernel is the same
    with its own input zero point, which pads in the kernel and saves the padded copy; for the
    other convs an input zero point would make oneDNN 3.2 leave its faster brgemm AMX kernels, so
    :func:`native_conv` pads in XLA and passes the compensation as the bias."""
    nd = len(kernel_size)
    if nd not in (1, 2) or not _concrete(*kernel_size, *strides, *dilation, groups, cin, cout):
        return None
    if nd == 1:
        kernel_size, strides, dilation, pads = (1, *kernel_size), (1, *strides), (1, *dilation), [(0, 0), *pads]
    (pt, pb), (pl, pr) = pads
    if min(pt, pb, pl, pr) < 0 or max(*kernel_size, *strides, *dilation, cin, cout) > _MAX_DIM:
        return None
    return np.asarray([kernel_size[0], kernel_size[1], strides[0], strides[1], pt, pb, pl, pr, dilation[0],
                       dilation[1], groups, cin, cout, int(relu), int(has_bias),
                       int(np.dtype(out_dtype) == np.int8), int(groups == cin and groups > 1)], np.int64)


def pack_conv_weight(w_int8, cfg: np.ndarray) -> Optional[np.ndarray]:
    """oneDNN's blocked layout of an int8 ``(k..., cin/groups, cout)`` weight as a uint8 blob, or None
    (backend off, weight traced, or oneDNN has no kernel for ``cfg``). Runs once, at convert time."""
    lib = _lib() if native_enabled() else None
    if lib is None or cfg is None:
        return None
    try:
        w = np.ascontiguousarray(np.asarray(w_int8), np.int8)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None
    if w.size != cfg[0] * cfg[1] * (cfg[11] // cfg[10]) * cfg[12]:
        raise ValueError(f"native conv pack: weight of shape {w.shape} does not match the conv config")
    cfg = np.ascontiguousarray(cfg, np.int64).copy()
    cfg[4:8] = 0  # native_conv pads in XLA and runs oneDNN unpadded
    size = lib.jq_conv_packed_size(cfg.ctypes.data)
    if size < 0:
        return None
    out = np.zeros(int(size), np.uint8)
    if lib.jq_conv_pack(cfg.ctypes.data, w.ctypes.data, out.ctypes.data, out.size) != 0:
        return None
    return out


def conv_impl_name(cfg: np.ndarray, n: int, h: int, w: int) -> str:
    """Name of the oneDNN implementation chosen for ``cfg`` on a ``(n, h, w)`` input (diagnostics)."""
    lib = _lib()
    cfg = np.ascontiguousarray(cfg, np.int64)
    buf = ctypes.create_string_buffer(256)
    if lib.jq_conv_impl_name(cfg.ctypes.data, n, h, w, buf, 256) != 0:
        raise RuntimeError(f"oneDNN has no convolution for this config: {lib.jq_last_error().decode()}")
    return buf.value.decode()


def conv_supported(x_shape: Sequence, packed: Optional[jax.Array], has_w_zero_point: bool) -> bool:
    """Trace-time switch for one conv call."""
    return packed is not None and not has_w_zero_point and _concrete(*x_shape) and native_enabled()


def native_conv(x_u8: jax.Array, packed: jax.Array, colsum: jax.Array, bias_over_scale: Optional[jax.Array],
                multiplier: jax.Array, x_zero_point: jax.Array, out_zero_point: jax.Array,
                cfg: np.ndarray, out_dtype: str, clamp: Optional[jax.Array] = None) -> jax.Array:
    """oneDNN int8 conv with jaxquant's (fbgemm's) requantization fused.

    The three per-channel vectors (``-zx * colsum``, ``bias_over_scale``, ``multiplier``) are stacked
    into one ``(3, cout)`` operand, which XLA computes in one small kernel; the call itself pads the
    input with its zero point (real 0), as the pure-XLA kernel does.

    Args:
      x_u8: uint8 ``(N, H, W, cin)`` or, for a 1-D conv, ``(N, W, cin)``, unpadded.
      packed: uint8 blob from :func:`pack_conv_weight` with the same ``cfg``.
      colsum: int32 ``(cout,)``, the weight's sums over taps and input channels.
      bias_over_scale: float32 ``(cout,)`` or None; multiplier float32 ``(cout,)``.
      x_zero_point, out_zero_point: int32 ``()``.
      cfg: from :func:`conv_cfg`; out_dtype: ``"uint8"`` or ``"int8"``.
      clamp: None, or int32 ``(2,)``: the lowest and highest output code. The saturated output is
        clipped to them (a following quantized ReLU6) inside the call, as an oneDNN ``eltwise_clip``
        post-op on the rounded value before the zero point is added, which gives the same codes.

    Returns:
      ``(N, OH, OW, cout)`` (``(N, OW, cout)`` for 1-D) of ``out_dtype``, equal to
      :func:`jaxquant.kernels.conv.static_conv`'s while ``|sum x w| < 2**24`` (always for
      ``taps * cin / groups <= 514``; beyond it a rare element can differ by one step).
    """
    one_d = x_u8.ndim == 3
    x4 = x_u8[:, None] if one_d else x_u8
    n, h, w, _ = x4.shape
    kh, kw, sh, sw = (int(v) for v in cfg[:4])
    pt, pb, pl, pr = (int(v) for v in cfg[4:8])
    dh, dw = int(cfg[8]), int(cfg[9])
    cout = int(cfg[12])
    oh = (h + pt + pb - ((kh - 1) * dh + 1)) // sh + 1
    ow = (w + pl + pr - ((kw - 1) * dw + 1)) // sw + 1
    zx = jnp.asarray(x_zero_point, jnp.int32).reshape(())
    comp = (-zx * colsum).astype(jnp.float32)  # exact: |zx * colsum| < 255 * 128 * K < 2**24 for K < 514
    bias = comp if bias_over_scale is None else jnp.broadcast_to(jnp.asarray(bias_over_scale, jnp.float32), (cout,))
    multiplier = jnp.broadcast_to(jnp.asarray(multiplier, jnp.float32), (cout,))
    args = [x4, packed, jnp.stack([comp, bias, multiplier]), zx,
            jnp.asarray(out_zero_point, jnp.int32).reshape(())]
    if clamp is not None:
        args.append(jnp.asarray(clamp, jnp.int32).reshape(2))
    y = jax.ffi.ffi_call("jaxquant_conv_u8s8" if clamp is None else "jaxquant_conv_u8s8_clamp",
                         jax.ShapeDtypeStruct((n, oh, ow, cout), np.dtype(out_dtype)),
                         vmap_method="sequential")(*args, cfg=np.asarray(cfg, np.int64), packed=np.int64(1))
    return y[:, 0] if one_d else y


def gemv_supported(m, pw_native: Optional[jax.Array]) -> bool:
    """Trace-time switch for one dense call with ``m`` rows."""
    return (pw_native is not None and _concrete(m) and 1 <= m <= GEMV_MAX_M and native_enabled()
            and bool(_lib().jq_gemv_supported()))


def pack_gemv_weight(w_int8: jax.Array) -> Optional[jax.Array]:
    """int8 ``(K, N)`` -> int8 ``(ceil(N/64), ceil(K/4), 64, 4)``: per group of 64 output columns, per
    4 inputs, the 4 bytes each VNNI lane multiplies. Zero padded. None when the GEMV is unavailable."""
    if not native_enabled() or not _lib().jq_gemv_supported():
        return None
    k, n = w_int8.shape
    kb, g = -(-k // 4), -(-n // GEMV_COLS)
    w = jnp.pad(jnp.asarray(w_int8, jnp.int8), ((0, kb * 4 - k), (0, g * GEMV_COLS - n)))
    return w.reshape(kb, 4, g, GEMV_COLS).transpose(2, 0, 3, 1)


def native_gemv(x_u8: jax.Array, w_packed: jax.Array, n: int) -> jax.Array:
    """``x_u8 @ w`` as int32 ``(M, n)`` for uint8 ``x_u8 (M, K)`` and a weight from
    :func:`pack_gemv_weight` (raw dot: zero-point terms are the caller's)."""
    m = x_u8.shape[0]
    return jax.ffi.ffi_call("jaxquant_gemv_u8s8", jax.ShapeDtypeStruct((m, n), jnp.int32),
                            vmap_method="sequential")(x_u8, w_packed)


def native_gemv_dynamic(x: jax.Array, w_packed: jax.Array, colsum: jax.Array, w_scale: jax.Array,
                        bias: Optional[jax.Array], *, reduce_range: bool, per_token: bool,
                        relu: bool) -> jax.Array:
    """fbgemm's dynamic linear in one custom call: float32 ``x (M, K)`` -> float32 ``(M, N)``.

    The activation's qparams (PyTorch's ``ChooseQuantizationParams``, one pair or one per row with
    ``per_token``), its uint8 quantization, the VNNI dot with the weight from :func:`pack_gemv_weight`
    and ``f32(acc - zx * colsum) * (x_scale * w_scale) + bias`` (then ReLU) run in the kernel, each
    float step rounded as :func:`jaxquant.kernels.linear.quantized_linear_dynamic` rounds it.
    ``colsum`` is int32 ``(N,)``, ``w_scale`` and ``bias`` float32 ``(N,)``; the weight's zero point
    must be 0.
    """
    m = x.shape[0]
    n = colsum.shape[0]
    return jax.ffi.ffi_call("jaxquant_gemv_dyn_f32", jax.ShapeDtypeStruct((m, n), jnp.float32),
                            vmap_method="sequential")(
        jnp.asarray(x, jnp.float32), w_packed, jnp.asarray(colsum, jnp.int32), jnp.asarray(w_scale, jnp.float32),
        jnp.asarray(w_scale if bias is None else bias, jnp.float32),
        reduce_range=np.int64(reduce_range), per_token=np.int64(per_token), relu=np.int64(relu),
        has_bias=np.int64(bias is not None), fma_epilogue=np.int64(_xla_contracts_fma()))


def _xla_contracts_fma() -> bool:
    """Whether XLA:CPU fuses the pure-XLA dynamic kernel's ``acc * scale + bias`` into one multiply-add:
    at its default backend optimization level it does, at ``--xla_backend_optimization_level=0``
    (read from ``XLA_FLAGS``, as XLA reads it) it does not. The native kernel follows, so both paths
    stay equal at either level."""
    levels = re.findall(r"--xla_backend_optimization_level=(\d+)", os.environ.get("XLA_FLAGS", ""))
    return not levels or int(levels[-1]) > 0


# ------------------------------------------------------------------ batched matmul and max-pool
# (csrc/onednn_matmul_pool.cc)


def matmul_impl_name(m: int, k: int, n: int) -> str:
    """Name of oneDNN's implementation of the ``(m, k) x (k, n)`` u8 x s8 matmul on the GEMV-packed
    weight (e.g. ``"brg:avx512_core_amx"``; diagnostics)."""
    buf = ctypes.create_string_buffer(256)
    if _lib().jq_matmul_impl_name(m, k, n, buf, 256) != 0:
        raise RuntimeError(f"oneDNN has no int8 matmul for ({m}, {k}) x ({k}, {n}): {buf.value.decode()}")
    return buf.value.decode()


def matmul_supported(m, k: int, n: int, pw_native: Optional[jax.Array]) -> bool:
    """Trace-time switch for a ``(m, k) x (k, n)`` dense call with more rows than the GEMV takes:
    weights of at most :data:`~jaxquant.native.MATMUL_MAX_WEIGHT` elements (larger ones stay on XLA's
    dot, measured faster or tied there)."""
    return (pw_native is not None and _concrete(m) and m > GEMV_MAX_M and k * n <= MATMUL_MAX_WEIGHT
            and m * k < (1 << 31) and native_enabled())


def native_matmul(x_u8: jax.Array, w_packed: jax.Array, n: int) -> jax.Array:
    """``x_u8 @ w`` as int32 ``(M, n)`` on oneDNN, for uint8 ``x_u8 (M, K)`` and the weight packed by
    :func:`pack_gemv_weight` (its layout is oneDNN's ``BA16a64b4a``). Raw dot, as :func:`native_gemv`."""
    m = x_u8.shape[0]
    return jax.ffi.ffi_call("jaxquant_matmul_u8s8", jax.ShapeDtypeStruct((m, n), jnp.int32),
                            vmap_method="sequential")(x_u8, w_packed)


def pool_supported(x_shape: Sequence, dtype, kernel: Sequence[int], stride: Sequence[int],
                   padding: Sequence[int]) -> bool:
    """Trace-time switch for a 2-D max pool of 8-bit NHWC data: concrete shapes, padding smaller
    than the window (PyTorch allows at most half of it), and the backend on."""
    return (len(x_shape) == 4 and _concrete(*x_shape, *kernel, *stride, *padding)
            and np.dtype(dtype) in (np.dtype(np.uint8), np.dtype(np.int8))
            and all(k >= 1 for k in kernel) and all(s >= 1 for s in stride)
            and all(0 <= p < k for p, k in zip(padding, kernel))
            and all(x_shape[1 + i] + 2 * padding[i] >= kernel[i] for i in range(2))
            and max(*x_shape, *kernel, *stride) <= _MAX_DIM and native_enabled())


def native_max_pool(x: jax.Array, kernel: Sequence[int], stride: Sequence[int],
                    padding: Sequence[int]) -> jax.Array:
    """2-D max pool of uint8/int8 ``x (N, H, W, C)`` with symmetric ``padding`` (padded taps ignored),
    on oneDNN; equal to ``lax.reduce_window(x, iinfo.min, max, ...)``. Returns ``(N, OH, OW, C)``."""
    n, h, w, c = x.shape
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    cfg = np.asarray([kh, kw, sh, sw, ph, ph, pw, pw], np.int64)
    return jax.ffi.ffi_call("jaxquant_maxpool_u8", jax.ShapeDtypeStruct((n, oh, ow, c), x.dtype),
                            vmap_method="sequential")(x, cfg=cfg)
