"""The weight-only matmul: float ``x (..., K)`` times a :class:`BlockQuantizedWeight` ``(K, N)``.

The one place this package touches the kernels (``jaxquant.kernels.mixed_dot``), so switching to
the core seam's ops is a one-file change.

Three formulations, chosen at trace time from the static number of rows ``M`` of ``x``:

* **Decode, native (M <= decode_rows, default 8, where** ``jaxquant.native`` **is enabled and the CPU
  has AVX-512): true weight-only.** ``jaxquant.native.weight_only_ops.weight_only_gemv`` reads the
  stored codes (int8 rows, or int4 two rows per byte) in place, converts them to float32 in registers
  and accumulates ``y[m, n] = sum_g scale[n, g] sum_{k in g} (code[n, k] - zero_point[n, g]) x[m, k]``
  in float32: activations are never quantized and no float copy of the weight exists.
* **Decode, pure-XLA fallback (same M; native off, e.g.** ``jq.use_native(False)`` **or**
  ``jq.export``**, or no AVX-512): integer path, NOT weight-only.** ``x`` is quantized per token (row) and
  per block of 64 inputs to int8 (symmetric, ``s_x = max|x| / 127``) and multiplied by the stored uint8 codes with the
  u8 x s8 -> s32 VNNI dot, weight on the LHS (``(N, Kp)`` rows read in place; YNNPACK repacks only
  the small RHS). Per-group partial sums come out of the *same* dot by expanding ``x`` block
  diagonally: RHS row ``(m, g)`` holds only group ``g``'s inputs of token ``m``, so the result
  ``acc[n, m, g] = sum_{k in g} code[n, k] x_q[m, k]``. Then
  ``y[m, n] = s_x[m] sum_g scale[n, g] (acc[n, m, g] - zero_point[n, g] * sum_{k in g} x_q[m, k])``.
  The weight is never converted to float; int4 codes are unpacked with a mask and a shift (one
  uint8 temporary per half) and each half goes to its own dot. XLA does not fuse a
  ``convert(u8 -> f32)`` into a dot, so pure XLA has no fast true weight-only GEMV.
* **Prefill / batched (M > decode_rows): float path.** ``x @ dequantize(w)``; compute-bound, so
  dequantizing once per call costs little next to the dot, and activations stay exactly float.

Measured on this machine (see docs/llm_quantization.md): a ``convert(u8 -> f32)`` feeding a dot
is not fused by XLA, so the float path at M = 1 reads the weight three times and is never faster
than f32; the integer path is 2-3x faster than f32 for int8.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.kernels.mixed_dot import dot_general_u8s8
from jaxquant.native.weight_only_ops import weight_only_gemv_multi, weight_only_gemv_supported
from jaxquant.weight_only.blockwise import BlockQuantizedWeight, dequantize_blockwise

__all__ = ["weight_only_matmul", "weight_only_matmul_multi", "int8_activation_matmul", "float_matmul", "native_matmul", "quantize_rows_int8",
           "activation_block"]

_ROWS_DOT = (((1,), (1,)), ((), ()))  # (N, K) x (R, K) -> (N, R)
ACT_BLOCK = 64  # inputs per activation scale on the integer path


def quantize_rows_int8(x2: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Symmetric int8 over the last axis: ``(x_q int8, s_x float32 (..., 1))``; an all-zero row gets scale 1."""
    x32 = x2.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x32), axis=-1, keepdims=True)
    s = jnp.where(amax > 0, amax / 127.0, 1.0)
    return jnp.clip(jnp.round(x32 / s), -127, 127).astype(jnp.int8), s


def activation_block(group_size: int, act_block: int = ACT_BLOCK) -> int:
    """Inputs per activation scale on the integer path: ``act_block`` if it divides the weight's group
    size, else the largest of 32 / 16 that does, else the whole group."""
    for b in (act_block, 32, 16):
        if b <= group_size and group_size % b == 0:
            return b
    return group_size


def int8_activation_matmul(x2: jax.Array, w: BlockQuantizedWeight, act_block: int = ACT_BLOCK) -> jax.Array:
    """Decode path: float ``(M, K)`` -> float32 ``(M, N)`` through u8 x s8 dots (see module doc).

    Activations get one int8 scale per token and per ``activation_block(group_size)`` inputs, so a
    channel outlier only coarsens its own block; the block partial sums come out of the same dot.
    """
    m, k = x2.shape
    g, gs, n = w.n_groups, w.group_size, w.out_features
    kp = g * gs
    ga = activation_block(gs, act_block)
    na = kp // ga  # activation blocks
    x32 = x2.astype(jnp.float32)
    if kp != k:
        x32 = jnp.pad(x32, ((0, 0), (0, kp - k)))
    xq, sx = quantize_rows_int8(x32.reshape(m, na, ga))  # (m, na, ga), (m, na, 1)
    if na == 1:
        rhs = xq.reshape(m, kp)
    else:
        # Row (m, j) keeps only block j of token m: one dot yields every block's partial sum.
        eye = jnp.eye(na, dtype=jnp.int8)
        rhs = (xq[:, None, :, :] * eye[None, :, :, None]).reshape(m * na, kp)
    if w.bits == 4:
        acc = jnp.concatenate([dot_general_u8s8(w.data & 15, rhs, _ROWS_DOT),
                               dot_general_u8s8(w.data >> 4, rhs, _ROWS_DOT)], axis=0)[:n]
    else:
        acc = dot_general_u8s8(w.data, rhs, _ROWS_DOT)
    acc = acc.reshape(n, m, na)
    rep = gs // ga
    scale = jnp.repeat(w.scale, rep, axis=1) if rep > 1 else w.scale  # (n, na)
    zp = jnp.repeat(w.zero_point, rep, axis=1) if rep > 1 else w.zero_point
    xsum = jnp.sum(xq.astype(jnp.int32), axis=-1)  # (m, na)
    corrected = (acc - zp[:, None, :] * xsum[None]).astype(jnp.float32)
    y = jnp.sum(corrected * scale[:, None, :] * sx[None, :, :, 0], axis=-1)  # (n, m)
    return y.T


@jax.custom_vjp
def _native_multi(x2: jax.Array, ws: tuple) -> list:
    return weight_only_gemv_multi(x2, [(w.data, w.scale, w.zero_point, w.out_features) for w in ws],
                                  bits=ws[0].bits, group_size=ws[0].group_size)


def _native_fwd(x2, ws):
    return _native_multi(x2, ws), ws


def _native_bwd(ws, gs):
    # y_i = x @ W_i, so dx = sum_i g_i @ W_i^T, with W_i dequantized (the backward pass is not the hot
    # path). The codes and qparams are constants of a converted model: their cotangents are zero.
    dx = sum(jnp.dot(g, dequantize_blockwise(w).T, preferred_element_type=jnp.float32) for g, w in zip(gs, ws))
    zero = lambda a: (np.zeros(a.shape, jax.dtypes.float0) if jnp.issubdtype(a.dtype, jnp.integer)
                      else jnp.zeros_like(a))
    return dx, jax.tree.map(zero, ws)


_native_multi.defvjp(_native_fwd, _native_bwd)


def native_matmul(x2: jax.Array, w: BlockQuantizedWeight) -> jax.Array:
    """Native decode path: float ``(M, K)`` -> float32 ``(M, N)``, weight-only (float activations).
    Differentiable in ``x`` (``dx = dy @ dequantize(w).T``)."""
    return _native_multi(x2, (w,))[0]


def float_matmul(x2: jax.Array, w: BlockQuantizedWeight) -> jax.Array:
    """Prefill path: ``x @ dequantize(w)`` in float32 ``(M, N)``."""
    return jnp.dot(x2.astype(jnp.float32), dequantize_blockwise(w), preferred_element_type=jnp.float32)


def weight_only_matmul(x: jax.Array, w: BlockQuantizedWeight, *, decode_rows: int = 8) -> jax.Array:
    """``x (..., K)`` float -> ``(..., N)`` in ``x``'s dtype.

    Rows ``<= decode_rows``: the native weight-only kernel when :func:`weight_only_gemv_supported`,
    else the pure-XLA int8-activation path; more rows: dequantize and a float dot.
    """
    lead = x.shape[:-1]
    m = 1
    for d in lead:
        m *= int(d)
    x2 = x.reshape(m, x.shape[-1])
    if m > decode_rows:
        y = float_matmul(x2, w)
    elif weight_only_gemv_supported(m):
        y = native_matmul(x2, w)
    else:
        y = int8_activation_matmul(x2, w)
    return y.reshape(lead + (w.out_features,)).astype(x.dtype)


def weight_only_matmul_multi(x: jax.Array, ws: Sequence[BlockQuantizedWeight], *, decode_rows: int = 8) -> list:
    """``[weight_only_matmul(x, w) for w in ws]``, in one native call when the rows take the native
    kernel and the weights share ``bits``, ``group_size`` and ``in_features`` (Q/K/V, gate/up: the
    call overhead and the helper threads' start-up are paid once per group of projections)."""
    lead = x.shape[:-1]
    m = 1
    for d in lead:
        m *= int(d)
    same = len({(w.bits, w.group_size, w.in_features) for w in ws}) == 1
    if not (ws and same and m <= decode_rows and weight_only_gemv_supported(m)):
        return [weight_only_matmul(x, w, decode_rows=decode_rows) for w in ws]
    ys = _native_multi(x.reshape(m, x.shape[-1]), tuple(ws))
    return [y.reshape(lead + (w.out_features,)).astype(x.dtype) for y, w in zip(ys, ws)]
