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
from typing import Callable, Literal, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxquant.choose_qparams import choose_qparams_from_min_max
from jaxquant.dtypes import QDType
from jaxquant.kernels.mixed_dot import dot_general_u8s8
from jaxquant.kernels.requantize import dequantize_accumulator, output_multiplier, requantize
from jaxquant.native import ops as native_ops
from jaxquant.qtensor import QTensor

__all__ = [
    "PackedWeight", "PackedLinear", "pack_weight", "pack_linear", "quantized_linear",
    "quantized_linear_dynamic", "choose_activation_qparams", "WEIGHT_LHS_MAX_M", "int8_matmul_acc",
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

    ``w_act_lhs``: int8 ``(N, K)`` (or ``(K, N)`` when ``act_lhs_kn``) or None; ``w_weight_lhs``:
    uint8 ``(N + 1, K)`` holding ``w + 128`` and a last row of ones, or None. ``colsum``: int32
    ``(N,)`` = ``sum_k w[k, n]``; ``w_zero_point``: int32 ``(N,)``. ``has_w_zero_point`` is static:
    False skips the ``zw * rowsum(x)`` term. ``act_lhs_kn`` is static: the act-LHS weight kept in the
    flax ``(K, N)`` layout, for weights packed inside a traced function (Linen's ``apply``), where a
    transpose would be folded into the dot by XLA, which then upcasts both operands to s32.
    """

    w_act_lhs: Optional[jax.Array]
    w_weight_lhs: Optional[jax.Array]
    colsum: jax.Array
    w_zero_point: jax.Array
    in_features: int = _field(static=True)
    out_features: int = _field(static=True)
    has_w_zero_point: bool = _field(static=True)
    act_lhs_kn: bool = dataclasses.field(default=False, metadata={"static": True})
    # int8 (ceil(N/64), ceil(K/4), 64, 4) for the native VNNI GEMV (rows <= GEMV_MAX_M), or None.
    w_native: Optional[jax.Array] = dataclasses.field(default=None, metadata={"static": False})

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


def pack_weight(w_int8: jax.Array, w_zero_point, layouts: Layouts = "both", *,
                act_lhs_kn: bool = False, w_native: Optional[jax.Array] = None) -> PackedWeight:
    """Pack an int8 ``(K, N)`` weight (flax layout) for :func:`int8_matmul_acc`.

    ``w_zero_point`` is int32 ``()`` or ``(N,)``. ``layouts`` picks which stored copies to
    keep: ``"both"`` (fastest at every M, 2 bytes per weight), or one of them (1 byte per
    weight; ``"weight_lhs"`` alone costs ~15 % at M >= 256, ``"act_lhs"`` alone ~2x at M = 1).
    ``act_lhs_kn`` keeps the act-LHS copy untransposed (see :class:`PackedWeight`); it needs
    ``layouts="act_lhs"``. ``w_native``: the GEMV weight packed earlier by
    :func:`jaxquant.native.ops.pack_gemv_weight` (Linen packs it at convert time, outside the trace).
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
    if act_lhs_kn and layouts != "act_lhs":
        raise ValueError("act_lhs_kn=True packs only the act-LHS layout; pass layouts='act_lhs'")
    zw = jnp.broadcast_to(jnp.asarray(w_zero_point, jnp.int32), (n,))
    has_zw = True
    try:
        has_zw = bool(np.any(np.asarray(zw) != 0))
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        pass  # traced zero point: keep the general path
    if act_lhs_kn:
        return PackedWeight(w_act_lhs=w, w_weight_lhs=None, colsum=jnp.sum(w, axis=0, dtype=jnp.int32),
                            w_zero_point=zw, in_features=int(k), out_features=int(n),
                            has_w_zero_point=has_zw, act_lhs_kn=True, w_native=w_native)
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
        w_native=native_ops.pack_gemv_weight(w) if w_native is None else w_native,
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
      layout: force a layout (default: chosen from M; where :mod:`jaxquant.native` is enabled, up to
        ``GEMV_MAX_M`` rows the native VNNI GEMV runs instead, and above it oneDNN's int8 matmul for
        weights of at most ``MATMUL_MAX_WEIGHT`` elements; both return the same exact int32 sums).
    """
    m, k = x_u8.shape
    native = layout is None and native_ops.gemv_supported(m, pw.w_native)
    # More rows than the GEMV takes: oneDNN's matmul on the same packed weight, where it is faster.
    native_mm = (layout is None and not native
                 and native_ops.matmul_supported(m, k, pw.out_features, pw.w_native))
    layout = pw.choose_layout(m, layout)
    zx = jnp.asarray(x_zero_point, jnp.int32)
    if offset is None:
        offset = k * zx * pw.w_zero_point - zx * pw.colsum
    row_coeff = pw.w_zero_point if pw.has_w_zero_point else None
    if native or native_mm:
        acc = (native_ops.native_gemv if native else native_ops.native_matmul)(x_u8, pw.w_native, pw.out_features)
        rowsum = None if row_coeff is None else jnp.sum(x_u8.astype(jnp.int32), axis=1, keepdims=True)
    elif layout == "weight_lhs":
        xs = lax.bitcast_convert_type(x_u8 ^ jnp.uint8(128), jnp.int8)
        acc_t = dot_general_u8s8(pw.w_weight_lhs, xs, (((1,), (1,)), ((), ())))  # (N+1, M)
        # Barrier: otherwise XLA folds the transpose into the dot by swapping operands,
        # which puts the int8 operand on the LHS and fails to compile.
        acc_t = lax.optimization_barrier(acc_t).T
        acc, rowsum = acc_t[:, :-1], acc_t[:, -1:] + 128 * k  # rowsum(x) from the ones row
        offset = offset + (128 * pw.colsum + 16384 * k)
        row_coeff = 128 if row_coeff is None else row_coeff + 128
    else:
        acc = dot_general_u8s8(x_u8, pw.w_act_lhs, (((1,), (0 if pw.act_lhs_kn else 1,)), ((), ())))
        rowsum = None
        if row_coeff is not None:
            rowsum = jnp.sum(x_u8, axis=1, keepdims=True, dtype=jnp.int32)
    acc = acc + offset
    if row_coeff is not None:
        acc = acc - row_coeff * rowsum
    return acc


# ------------------------------------------------------------------------ the linear ops


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedLinear:
    """An int8 linear layer's weight, packed once: :class:`PackedWeight`, float32 ``w_scale (N,)``
    and float32 ``bias (N,)`` or None. Nothing in it depends on the input or output qparams."""

    weight: PackedWeight
    w_scale: jax.Array
    bias: Optional[jax.Array]

    @property
    def in_features(self) -> int:
        return self.weight.in_features

    @property
    def out_features(self) -> int:
        return self.weight.out_features


def pack_linear(w_int8: jax.Array, w_scale: jax.Array, w_zero_point: jax.Array,
                bias: Optional[jax.Array] = None, *, layouts: Layouts = "both",
                act_lhs_kn: bool = False, w_native: Optional[jax.Array] = None) -> PackedLinear:
    """Pack an int8 linear weight once (at convert time) for :func:`quantized_linear` and
    :func:`quantized_linear_dynamic`.

    Args:
      w_int8: int8 ``(K, N)`` (flax ``nnx.Linear`` kernel layout).
      w_scale: float32 ``()`` per tensor or ``(N,)`` per output channel.
      w_zero_point: int32 ``()`` or ``(N,)`` (usually 0).
      bias: float32 ``(N,)`` or None.
      layouts, act_lhs_kn, w_native: which weight copies to store (see :func:`pack_weight`).
    """
    pw = pack_weight(w_int8, w_zero_point, layouts, act_lhs_kn=act_lhs_kn, w_native=w_native)
    n = pw.out_features
    if bias is not None:
        bias = jnp.asarray(bias, jnp.float32)
        if bias.shape != (n,):
            raise ValueError(f"bias must have shape ({n},), got {bias.shape}")
    return PackedLinear(weight=pw, w_scale=jnp.broadcast_to(jnp.asarray(w_scale, jnp.float32), (n,)),
                        bias=bias)


def _flat_input(x: jax.Array, packed: PackedLinear, op: str) -> jax.Array:
    if x.shape[-1] != packed.in_features:
        raise ValueError(f"{op}: input has {x.shape[-1]} features, the weight expects {packed.in_features}")
    return x.reshape(-1, packed.in_features)


def quantized_linear(x: QTensor, packed: PackedLinear, out_scale: jax.Array, out_zero_point: jax.Array, *,
                     out_dtype: QDType, relu: bool = False, layout: Optional[Layout] = None,
                     reduce_accumulator: Optional[Callable[[jax.Array], jax.Array]] = None) -> QTensor:
    """Static int8 linear, PyTorch's x86 ``quantized::linear`` (fbgemm's output pipeline).

    The input's qparams come with ``x`` per call; the zero-point terms and the output multiplier
    that depend on them are folded here, inside the fused epilogue (O(N) work).

    Args:
      x: per-tensor QTensor ``(..., K)``, uint8 or int8 data.
      packed: from :func:`pack_linear`.
      out_scale, out_zero_point: float32 ``()`` / int32 ``()`` output qparams.
      out_dtype: ``quint8`` or ``qint8``.
      relu: fuse a ReLU (clamp at the output zero point).
      layout: force ``"weight_lhs"`` or ``"act_lhs"`` (default: by row count).
      reduce_accumulator: applied to the exact int32 accumulator ``(M, N)`` before the epilogue, e.g.
        ``lambda acc: lax.psum(acc, axis)`` for a contraction split over devices.

    Returns:
      QTensor ``(..., N)`` of ``out_dtype`` with the given output qparams.
    """
    if x.axis is not None:
        raise ValueError("quantized_linear: activations must be quantized per tensor, got a per-channel QTensor")
    x_u8, zx = to_uint8_activation(_flat_input(x.int_data, packed, "quantized_linear"), x.q_zero_point())
    acc = int8_matmul_acc(x_u8, zx, packed.weight, layout=layout)
    if reduce_accumulator is not None:
        acc = reduce_accumulator(acc)
    act_times_w, multiplier = output_multiplier(x.q_scale(), packed.w_scale, out_scale)
    y = requantize(acc, multiplier, out_zero_point,
                   bias_over_scale=None if packed.bias is None else packed.bias / act_times_w,
                   relu=relu, out_dtype=out_dtype.storage)
    return QTensor(y.reshape(*x.shape[:-1], packed.out_features), out_scale, out_zero_point, out_dtype)


def choose_activation_qparams(x2: jax.Array, *, reduce_range: bool, per_token: bool):
    """fbgemm's dynamic activation qparams: min/max (with 0) -> ChooseQuantizationParams over
    ``[0, 255]`` (``[0, 127]`` with ``reduce_range``). ``x2`` is float32 ``(M, K)``; returns
    float32 scale and int32 zero point of shape ``()`` or, per token, ``(M, 1)``."""
    axis = 1 if per_token else None
    lo = jnp.min(x2, axis=axis, keepdims=per_token)
    hi = jnp.max(x2, axis=axis, keepdims=per_token)
    return choose_qparams_from_min_max(lo, hi, 0, 255, reduce_range)


def quantized_linear_dynamic(x: jax.Array, packed: PackedLinear, *, reduce_range: bool = True,
                             per_token: bool = False, relu: bool = False,
                             layout: Optional[Layout] = None,
                             x_min_max: Optional[tuple[jax.Array, jax.Array]] = None) -> jax.Array:
    """Dynamically quantized linear, PyTorch's fbgemm ``quantized::linear_dynamic``.

    The activation is quantized per call to uint8 with qparams from its own min/max (one
    pair for the whole tensor, or per row with ``per_token``), the dot runs u8 x s8 -> s32,
    and the result is dequantized with ``x_scale * w_scale[n]`` plus the float bias.

    Args:
      x: float32 ``(..., K)`` (other float dtypes are cast).
      packed: from :func:`pack_linear`.
      reduce_range: quantize to ``[0, 127]`` as PyTorch's x86 engine does by default.
      per_token: one scale/zero point per row of ``x`` (not in PyTorch; more accurate).
      relu: fused ReLU on the float output.
      layout: force a layout (default: by row count).
      x_min_max: float32 scalars ``(min, max)`` to choose the activation qparams from instead of
        ``x``'s own range (a recurrent layer's whole input sequence, as PyTorch's dynamic LSTM);
        ignored with ``per_token``.

    Returns:
      float32 ``(..., N)``.
    """
    x2 = _flat_input(jnp.asarray(x, jnp.float32), packed, "quantized_linear_dynamic")
    pw = packed.weight
    if (layout is None and x_min_max is None and not pw.has_w_zero_point and x2.shape[0] > 0
            and native_ops.gemv_supported(x2.shape[0], pw.w_native)):
        # Native: the qparams, the quantization, the dot and the epilogue in one custom call.
        y = native_ops.native_gemv_dynamic(x2, pw.w_native, pw.colsum, packed.w_scale, packed.bias,
                                           reduce_range=reduce_range, per_token=per_token, relu=relu)
        return y.reshape(*x.shape[:-1], packed.out_features)
    if x_min_max is not None and not per_token:
        scale, zp = choose_qparams_from_min_max(x_min_max[0], x_min_max[1], 0, 255, reduce_range)
    else:
        scale, zp = choose_activation_qparams(x2, reduce_range=reduce_range, per_token=per_token)
    qmax = 127 if reduce_range else 255
    # fbgemm's Quantize: the zero point is added before the one rounding (ties to even), as in
    # quantize_per_tensor; rounding x/scale first and adding zp after differs at exact .5 ties.
    q = jnp.clip(jnp.round(x2 * (jnp.float32(1.0) / scale) + zp.astype(jnp.float32)), 0, qmax)
    acc = int8_matmul_acc(q.astype(jnp.uint8), zp, packed.weight, layout=layout)
    y = dequantize_accumulator(acc, scale * packed.w_scale, packed.bias, relu=relu)
    return y.reshape(*x.shape[:-1], packed.out_features)
