"""Quantized linear (dense) kernels: static int8 and dynamic int8, u8 x s8 -> s32 on VNNI.

Two layouts of the same dot, chosen from the static row count ``M`` at trace time
(PERF_NOTES; crossover measured in ``benchmarks/bench_ops.py`` and docs/cpu_performance.md):

* ``"weight_lhs"`` (small M, decode): the weight, stored as uint8 ``W + 128`` of shape
  ``(N, K)``, is the dot's LHS (YNNPACK reads the LHS in place but repacks the RHS every
  call, so the big operand goes left); activations become int8 ``x - 128`` on the RHS.
  ``sum_k (w+128)(x-128) = sum_k w x - 128 colsum(W) + 128 rowsum(x) - 128^2 K`` is undone
  with terms folded at prepack time plus one per-row ``rowsum(x)``.
* ``"act_lhs"`` (large M): uint8 activations ``(M, K)`` on the LHS, the int8 weight
  ``(N, K)`` on the RHS (contracting its last dim is as fast as ``(K, N)``).

For both, with ``x`` the uint8 activation and ``zx``/``zw`` the zero points,
``acc = sum_k (x - zx)(w - zw) = dot(x, w) - zx colsum(W) - zw rowsum(x) + K zx zw``; every
term but the dot and ``rowsum(x)`` is a per-column int32 vector computed at prepack time, and
``rowsum(x)`` is only computed when it is needed (weight_lhs layout or a nonzero weight zero
point). Everything after the dot fuses into one XLA loop. int8 activations are shifted to
uint8 (``x ^ 0x80``, zero point + 128) so the VNNI path is always used.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxquant.kernels.mixed_dot import dot_general_u8s8
from jaxquant.kernels.requantize import (dequantize_accumulator, output_multiplier, quant_range,
                                         requantize)

__all__ = [
    "StaticLinearParams", "DynamicLinearParams", "prepack_static_linear", "static_linear",
    "prepack_dynamic_linear", "dynamic_linear", "WEIGHT_LHS_MAX_M", "int8_matmul_acc",
    "to_uint8_activation",
]

Layout = Literal["weight_lhs", "act_lhs"]
Layouts = Literal["both", "weight_lhs", "act_lhs"]

# Largest row count that uses the weight-as-LHS layout. Measured on Zen 4 (2 cores): the
# weight-LHS layout wins up to M = 128 for 4096x4096 and 768x3072 and loses at M >= 256.
WEIGHT_LHS_MAX_M = 128
# acc terms reach 255 * 128 * K (plus 128^2 K for the weight-LHS shift): stay below 2**31.
MAX_K = 1 << 16


def _field(static: bool = False):
    return dataclasses.field(metadata={"static": static})


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedWeight:
    """An int8 weight of logical shape (K, N) in the layouts the dot kernels want.

    ``w_act_lhs``: int8 ``(N, K)`` or None; ``w_weight_lhs``: uint8 ``(N + 1, K)`` holding
    ``w + 128`` and a last row of ones, or None. ``colsum``: int32 ``(N,)`` = ``sum_k w[k, n]``;
    ``w_zero_point``: int32 ``(N,)``. ``has_w_zero_point`` is static: False skips the
    ``zw * rowsum(x)`` term.
    """

    w_act_lhs: Optional[jax.Array]
    w_weight_lhs: Optional[jax.Array]
    colsum: jax.Array
    w_zero_point: jax.Array
    in_features: int = _field(static=True)
    out_features: int = _field(static=True)
    has_w_zero_point: bool = _field(static=True)

    def choose_layout(self, m: int, layout: Optional[Layout] = None) -> Layout:
        if layout is None:
            if self.w_act_lhs is None:
                return "weight_lhs"
            if self.w_weight_lhs is None:
                return "act_lhs"
            if not isinstance(m, (int, np.integer)):
                return "act_lhs"  # symbolic row count (jax.export): assume a batch
            return "weight_lhs" if m <= WEIGHT_LHS_MAX_M else "act_lhs"
        if layout == "weight_lhs" and self.w_weight_lhs is None or (
                layout == "act_lhs" and self.w_act_lhs is None):
            raise ValueError(f"layout {layout!r} was not stored at prepack time; "
                             f"prepack with layouts='both' or layouts={layout!r}")
        return layout


def pack_weight(w_int8: jax.Array, w_zero_point, layouts: Layouts = "both") -> PackedWeight:
    """Pack an int8 ``(K, N)`` weight (flax layout) for :func:`int8_matmul_acc`.

    ``w_zero_point`` is int32 ``()`` or ``(N,)``. ``layouts`` picks which stored copies to
    keep: ``"both"`` (fastest at every M, 2 bytes per weight), or one of them (1 byte per
    weight; ``"weight_lhs"`` alone costs ~15 % at M >= 256, ``"act_lhs"`` alone ~2x at M = 1).
    """
    w = jnp.asarray(w_int8)
    if w.dtype != jnp.int8 or w.ndim != 2:
        raise TypeError(f"weight must be int8 of shape (in_features, out_features), got "
                        f"{w.dtype}{tuple(w.shape)}")
    k, n = w.shape
    if k > MAX_K:
        raise ValueError(f"in_features {k} > {MAX_K} may overflow the int32 accumulator; "
                         f"split the contraction into chunks of at most {MAX_K}")
    if layouts not in ("both", "weight_lhs", "act_lhs"):
        raise ValueError(f"layouts must be 'both', 'weight_lhs' or 'act_lhs', got {layouts!r}")
    zw = jnp.broadcast_to(jnp.asarray(w_zero_point, jnp.int32), (n,))
    has_zw = True
    try:
        has_zw = bool(np.any(np.asarray(zw) != 0))
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        pass  # traced zero point: keep the general path
    wt = w.T
    return PackedWeight(
        w_act_lhs=wt if layouts in ("both", "act_lhs") else None,
        # An extra all-ones row makes the dot also return rowsum(x - 128), which saves
        # the 3-kernel reduction XLA:CPU would otherwise emit for rowsum(x).
        w_weight_lhs=(jnp.concatenate([lax.bitcast_convert_type(wt ^ jnp.int8(-128), jnp.uint8),
                                       jnp.ones((1, k), jnp.uint8)])
                      if layouts in ("both", "weight_lhs") else None),
        colsum=jnp.sum(w, axis=0, dtype=jnp.int32),
        w_zero_point=zw,
        in_features=int(k), out_features=int(n), has_w_zero_point=has_zw,
    )


def to_uint8_activation(x_q: jax.Array, x_zero_point) -> tuple[jax.Array, jax.Array]:
    """Shift int8 activations to uint8 (``x ^ 0x80`` = ``x + 128``), zero point + 128.

    uint8 input is returned as is. Returns ``(x_u8, zero_point int32)``.
    """
    zx = jnp.asarray(x_zero_point, jnp.int32)
    if x_q.dtype == jnp.uint8:
        return x_q, zx
    if x_q.dtype == jnp.int8:
        return lax.bitcast_convert_type(x_q ^ jnp.int8(-128), jnp.uint8), zx + 128
    raise TypeError(f"quantized activations must be uint8 or int8, got {x_q.dtype}")


def int8_matmul_acc(x_u8: jax.Array, x_zero_point: jax.Array, pw: PackedWeight, *,
                    offset: Optional[jax.Array] = None,
                    layout: Optional[Layout] = None) -> jax.Array:
    """``acc[m, n] = sum_k (x[m, k] - zx) * (w[k, n] - zw[n])`` as int32 ``(M, N)``.

    Args:
      x_u8: uint8 ``(M, K)``.
      x_zero_point: int32 ``()`` (per tensor) or ``(M, 1)`` (per row).
      pw: packed weight.
      offset: optional int32 ``(N,)`` replacing ``-zx colsum + K zx zw`` when it was
        folded at prepack time (static activation qparams).
      layout: force a layout (default: chosen from M).
    """
    m, k = x_u8.shape
    layout = pw.choose_layout(m, layout)
    zx = jnp.asarray(x_zero_point, jnp.int32)
    if offset is None:
        offset = k * zx * pw.w_zero_point - zx * pw.colsum
    row_coeff = pw.w_zero_point if pw.has_w_zero_point else None
    if layout == "weight_lhs":
        xs = lax.bitcast_convert_type(x_u8 ^ jnp.uint8(128), jnp.int8)
        acc_t = dot_general_u8s8(pw.w_weight_lhs, xs, (((1,), (1,)), ((), ())))  # (N+1, M)
        # Barrier: otherwise XLA folds the transpose into the dot by swapping operands,
        # which puts the int8 operand on the LHS and fails to compile.
        acc_t = lax.optimization_barrier(acc_t).T
        acc, rowsum = acc_t[:, :-1], acc_t[:, -1:] + 128 * k  # rowsum(x) from the ones row
        offset = offset + (128 * pw.colsum + 16384 * k)
        row_coeff = 128 if row_coeff is None else row_coeff + 128
    else:
        acc = dot_general_u8s8(x_u8, pw.w_act_lhs, (((1,), (1,)), ((), ())))
        rowsum = None
        if row_coeff is not None:
            rowsum = jnp.sum(x_u8, axis=1, keepdims=True, dtype=jnp.int32)
    acc = acc + offset
    if row_coeff is not None:
        acc = acc - row_coeff * rowsum
    return acc


# ----------------------------------------------------------------------------- static


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StaticLinearParams:
    """Prepacked static int8 linear. Arrays are leaves; flags are static metadata.

    ``offset``: int32 ``(N,)`` = ``K zx zw - zx colsum(W)`` for a uint8 input with zero
    point ``x_zero_point``; ``bias_over_scale``: float32 ``(N,)`` = ``bias / (x_scale w_scale)``
    or None; ``multiplier``: float32 ``(N,)``; ``out_zero_point``: int32 ``()``.
    """

    weight: PackedWeight
    offset: jax.Array
    bias_over_scale: Optional[jax.Array]
    multiplier: jax.Array
    x_zero_point: jax.Array
    out_zero_point: jax.Array
    relu: bool = _field(static=True)
    out_dtype: str = _field(static=True)


def prepack_static_linear(
    w_int8: jax.Array,
    w_scale: jax.Array,
    w_zero_point: jax.Array,
    bias: Optional[jax.Array],
    x_scale: jax.Array,
    x_zero_point: jax.Array,
    out_scale: jax.Array,
    out_zero_point: jax.Array,
    *,
    relu: bool = False,
    out_dtype=jnp.uint8,
    layouts: Layouts = "both",
) -> StaticLinearParams:
    """Fold everything that does not depend on the activations, once, at convert time.

    Args:
      w_int8: int8 ``(K, N)`` (flax ``nnx.Linear`` kernel layout).
      w_scale: float32 ``()`` per tensor or ``(N,)`` per output channel.
      w_zero_point: int32 ``()`` or ``(N,)`` (usually 0).
      bias: float32 ``(N,)`` or None.
      x_scale, x_zero_point: the input's static qparams (``x_zero_point`` in the input's own
        dtype: ``[0, 255]`` for uint8 input, ``[-128, 127]`` for int8 input).
      out_scale, out_zero_point: the output's qparams.
      relu: fuse a ReLU (clamp at the output zero point).
      out_dtype: ``jnp.uint8`` or ``jnp.int8``.
      layouts: which weight copies to store (see :func:`pack_weight`).
    """
    quant_range(out_dtype)  # validates
    pw = pack_weight(w_int8, w_zero_point, layouts)
    k, n = pw.in_features, pw.out_features
    zx = jnp.asarray(x_zero_point, jnp.int32)
    if zx.ndim != 0:
        raise ValueError(f"x_zero_point must be a scalar for a static linear, got shape {zx.shape}")
    act_times_w, mult = output_multiplier(x_scale, w_scale, out_scale)
    bias_over_scale = None
    if bias is not None:
        bias = jnp.asarray(bias, jnp.float32)
        if bias.shape != (n,):
            raise ValueError(f"bias must have shape ({n},), got {bias.shape}")
        bias_over_scale = jnp.broadcast_to(bias / act_times_w, (n,))
    return StaticLinearParams(
        weight=pw,
        offset=k * zx * pw.w_zero_point - zx * pw.colsum,
        bias_over_scale=bias_over_scale,
        multiplier=jnp.broadcast_to(mult, (n,)).astype(jnp.float32),
        x_zero_point=zx,
        out_zero_point=jnp.asarray(out_zero_point, jnp.int32),
        relu=bool(relu), out_dtype=np.dtype(out_dtype).name,
    )


def static_linear(x_q: jax.Array, params: StaticLinearParams, *,
                  layout: Optional[Layout] = None) -> jax.Array:
    """Quantized linear with static activation qparams.

    Args:
      x_q: uint8 or int8 ``(..., K)`` quantized with the ``x_scale``/``x_zero_point`` given
        to :func:`prepack_static_linear`.
      params: from :func:`prepack_static_linear`.
      layout: force ``"weight_lhs"`` or ``"act_lhs"`` (default: by row count).

    Returns:
      ``(..., N)`` of ``params.out_dtype``.
    """
    pw = params.weight
    if x_q.shape[-1] != pw.in_features:
        raise ValueError(f"static_linear: input has {x_q.shape[-1]} features, the weight "
                         f"expects {pw.in_features}")
    lead = x_q.shape[:-1]
    x2 = x_q.reshape(-1, pw.in_features)
    offset = params.offset
    if x2.dtype == jnp.int8:
        # zero point was given in the int8 domain: the uint8 shift adds 128 to it
        offset = offset + 128 * (pw.in_features * pw.w_zero_point - pw.colsum)
    x_u8, zx = to_uint8_activation(x2, params.x_zero_point)
    acc = int8_matmul_acc(x_u8, zx, pw, offset=offset, layout=layout)
    y = requantize(acc, params.multiplier, params.out_zero_point,
                   bias_over_scale=params.bias_over_scale, relu=params.relu,
                   out_dtype=params.out_dtype)
    return y.reshape(*lead, pw.out_features)


# ---------------------------------------------------------------------------- dynamic


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DynamicLinearParams:
    """Prepacked dynamic int8 linear: packed weight, float32 ``w_scale (N,)``, ``bias (N,)``."""

    weight: PackedWeight
    w_scale: jax.Array
    bias: Optional[jax.Array]


def prepack_dynamic_linear(
    w_int8: jax.Array,
    w_scale: jax.Array,
    w_zero_point: jax.Array,
    bias: Optional[jax.Array],
    *,
    layouts: Layouts = "both",
) -> DynamicLinearParams:
    """Prepack an int8 ``(K, N)`` weight with float32 ``w_scale`` / int32 ``w_zero_point``
    (``()`` or ``(N,)``) and float32 ``bias (N,)`` or None for :func:`dynamic_linear`."""
    pw = pack_weight(w_int8, w_zero_point, layouts)
    n = pw.out_features
    if bias is not None:
        bias = jnp.asarray(bias, jnp.float32)
        if bias.shape != (n,):
            raise ValueError(f"bias must have shape ({n},), got {bias.shape}")
    return DynamicLinearParams(
        weight=pw, w_scale=jnp.broadcast_to(jnp.asarray(w_scale, jnp.float32), (n,)), bias=bias)


def choose_activation_qparams(x2: jax.Array, *, reduce_range: bool, per_token: bool):
    """fbgemm's dynamic activation qparams: min/max (with 0) -> ChooseQuantizationParams over
    ``[0, 255]`` (``[0, 127]`` with ``reduce_range``). ``x2`` is float32 ``(M, K)``; returns
    float32 scale and int32 zero point of shape ``()`` or, per token, ``(M, 1)``."""
    from jaxquant.choose_qparams import choose_qparams_from_min_max
    axis = 1 if per_token else None
    lo = jnp.min(x2, axis=axis, keepdims=per_token)
    hi = jnp.max(x2, axis=axis, keepdims=per_token)
    return choose_qparams_from_min_max(lo, hi, 0, 255, reduce_range)


def dynamic_linear(x: jax.Array, params: DynamicLinearParams, *, reduce_range: bool = True,
                   per_token: bool = False, relu: bool = False,
                   layout: Optional[Layout] = None) -> jax.Array:
    """Dynamically quantized linear, PyTorch's fbgemm ``quantized::linear_dynamic``.

    The activation is quantized per call to uint8 with qparams from its own min/max (one
    pair for the whole tensor, or per row with ``per_token``), the dot runs u8 x s8 -> s32,
    and the result is dequantized with ``x_scale * w_scale[n]`` plus the float bias.

    Args:
      x: float32 ``(..., K)`` (other float dtypes are cast).
      params: from :func:`prepack_dynamic_linear`.
      reduce_range: quantize to ``[0, 127]`` as PyTorch's x86 engine does by default.
      per_token: one scale/zero point per row of ``x`` (not in PyTorch; more accurate).
      relu: fused ReLU on the float output.
      layout: force a layout (default: by row count).

    Returns:
      float32 ``(..., N)``.
    """
    pw = params.weight
    if x.shape[-1] != pw.in_features:
        raise ValueError(f"dynamic_linear: input has {x.shape[-1]} features, the weight "
                         f"expects {pw.in_features}")
    lead = x.shape[:-1]
    x2 = jnp.asarray(x, jnp.float32).reshape(-1, pw.in_features)
    scale, zp = choose_activation_qparams(x2, reduce_range=reduce_range, per_token=per_token)
    qmax = 127 if reduce_range else 255
    q = jnp.clip(jnp.round(x2 * (jnp.float32(1.0) / scale)) + zp.astype(jnp.float32), 0, qmax)
    x_u8 = q.astype(jnp.uint8)
    acc = int8_matmul_acc(x_u8, zp, pw, layout=layout)
    act_times_w = scale * params.w_scale
    y = dequantize_accumulator(acc, act_times_w, params.bias, relu=relu)
    return y.reshape(*lead, pw.out_features)
