"""The one place graph mode calls the library's int8 kernels (switching to ``core``'s per-primitive ops
is a change to this file only).

Every function takes and returns plain arrays / prepacked pytrees; layouts are flax's (weight ``(K, N)``,
conv kernel ``(*k, cin/groups, cout)``, activations NHWC).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxquant.kernels import (pack_conv as _pack_conv, pack_linear as _pack_linear, quantized_conv,
                              quantized_linear, quantized_linear_dynamic)
from jaxquant.kernels.linear import choose_activation_qparams, to_uint8_activation
from jaxquant.kernels.mixed_dot import dot_general_u8s8
from jaxquant.qtensor import QTensor

__all__ = ["pack_linear", "run_linear", "pack_conv", "run_conv", "run_dynamic_linear", "int8_dot_general",
           "dynamic_qparams"]


def pack_linear(w_q, w_scale, w_zp, bias):
    """int8 ``(K, N)`` weight, float32 ``(N,)`` scales, int32 ``(N,)`` zero points, float32 bias -> packed
    (once, at convert; static and dynamic linears share the packing)."""
    return _pack_linear(w_q, w_scale, w_zp, bias)


def run_linear(x: QTensor, packed, out_scale, out_zp, *, out_dtype, relu: bool) -> QTensor:
    """Static int8 linear: per-tensor QTensor ``(M, K)`` -> QTensor ``(M, N)`` with the given qparams."""
    return quantized_linear(x, packed, out_scale, out_zp, out_dtype=out_dtype, relu=relu)


def pack_conv(w_q, w_scale, w_zp, bias, *, strides, padding, dilation, groups: int, input_dilation):
    """int8 conv kernel ``(*k, cin/groups, cout)`` -> packed (once, at convert)."""
    return _pack_conv(w_q, w_scale, w_zp, bias, strides=strides, padding=padding, dilation=dilation,
                      groups=groups, input_dilation=input_dilation)


def run_conv(x: QTensor, packed, out_scale, out_zp, *, out_dtype, relu: bool, clamp=None) -> QTensor:
    """Static int8 conv: NHWC QTensor ``(N, *spatial, cin)`` -> QTensor ``(N, *out_spatial, cout)``;
    ``clamp``: None or int32 ``(2,)`` output codes a following ReLU6 / clamp clips to."""
    return quantized_conv(x, packed, out_scale, out_zp, out_dtype=out_dtype, relu=relu, clamp=clamp)


def run_dynamic_linear(x: jax.Array, packed, *, reduce_range: bool, per_token: bool, relu: bool) -> jax.Array:
    """float ``(M, K)`` -> float32 ``(M, N)``, activation qparams chosen per call."""
    return quantized_linear_dynamic(x, packed, reduce_range=reduce_range, per_token=per_token, relu=relu)


def dynamic_qparams(x: jax.Array, reduce_range: bool = False):
    """Per-tensor uint8 qparams of ``x`` from its min/max (fbgemm's choice): float32 and int32 scalars."""
    return choose_activation_qparams(jnp.asarray(x, jnp.float32).reshape(1, -1), reduce_range=reduce_range,
                                     per_token=False)


def _to_s8(q: jax.Array, zp: jax.Array):
    if q.dtype == jnp.int8:
        return q, jnp.asarray(zp, jnp.int32)
    return lax.bitcast_convert_type(q ^ jnp.uint8(128), jnp.int8), jnp.asarray(zp, jnp.int32) - 128


def int8_dot_general(lq, lzp, rq, rzp, dimension_numbers) -> jax.Array:
    """``sum (l - zl)(r - zr)`` over the contracting dims as int32, ``lax.dot_general`` layout, for two
    quantized activations (uint8 or int8 each): the dot itself runs u8 x s8."""
    lu, zl = to_uint8_activation(lq, lzp)
    rs, zr = _to_s8(rq, rzp)
    (lc, rc), (lb, rb) = dimension_numbers
    acc = dot_general_u8s8(lu, rs, dimension_numbers)
    k = int(np.prod([lu.shape[d] for d in lc])) if lc else 1
    lfree = [d for d in range(lu.ndim) if d not in lc and d not in lb]
    rfree = [d for d in range(rs.ndim) if d not in rc and d not in rb]
    # sum_l over the contracting dims, laid out as (batch, lhs_free, 1 x rhs_free)
    suml = jnp.sum(lu.astype(jnp.int32), axis=tuple(lc))
    rest = [d for d in range(lu.ndim) if d not in lc]
    suml = jnp.transpose(suml, [rest.index(d) for d in list(lb) + lfree])
    suml = suml.reshape(suml.shape + (1,) * len(rfree))
    sumr = jnp.sum(rs.astype(jnp.int32), axis=tuple(rc))
    rest = [d for d in range(rs.ndim) if d not in rc]
    sumr = jnp.transpose(sumr, [rest.index(d) for d in list(rb) + rfree])
    sumr = sumr.reshape(sumr.shape[:len(rb)] + (1,) * len(lfree) + sumr.shape[len(rb):])
    return acc - zr * suml - zl * sumr + k * zl * zr
