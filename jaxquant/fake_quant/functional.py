"""Fake quantization with a straight-through gradient: ``torch.fake_quantize_per_{tensor,channel}_affine``.

Forward, exactly as PyTorch's CPU kernels (``_fake_quantize_tensor_helper`` and
``_fake_quant_per_channel_cachemask_cpu_helper``)::

    q    = round_half_even(x * float32(1 / scale)) + zero_point      # before clamping
    y    = (clamp(q, quant_min, quant_max) - zero_point) * scale
    mask = quant_min <= q <= quant_max

Backward: ``dx = dy * mask`` (straight through inside the range, zero outside); scale and zero point
get zero gradient. The mask is taken on the pre-clamp integer, so a value that rounds exactly onto a
bound still passes its gradient.

With a float zero point (``per_channel_affine_float_qparams``, embeddings) the zero point is added
before rounding: ``q = round(x * (1 / scale) + zero_point)``, as PyTorch does.

Divergence from PyTorch, on purpose: a NaN input gives a NaN output (PyTorch's ``fmax``/``fmin``
turn it into ``(quant_min - zero_point) * scale``, hiding it).
"""
from __future__ import annotations

from functools import partial
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np

ArrayLike = Union[jax.Array, np.ndarray, float, int]


# ---------------------------------------------------------------------------------------------
# argument checks (static ones always; array ones only when the arrays are concrete)


def _is_concrete(a) -> bool:
    return not isinstance(a, jax.core.Tracer)


def check_qrange(quant_min: int, quant_max: int, where: str) -> None:
    """Raise if the integer range is not a non-empty pair of Python ints."""
    if not isinstance(quant_min, (int, np.integer)) or not isinstance(quant_max, (int, np.integer)):
        raise TypeError(f"{where}: quant_min and quant_max must be Python ints (they are static), "
                        f"got {type(quant_min).__name__} and {type(quant_max).__name__}")
    if quant_min >= quant_max:
        raise ValueError(f"{where}: quant_min ({quant_min}) must be strictly less than quant_max ({quant_max})")


def check_scale(scale: jax.Array, where: str) -> None:
    """Raise on a concrete scale that is not finite and positive (a traced one is not checked)."""
    if _is_concrete(scale):
        s = np.asarray(scale, np.float32)
        if s.size and not (np.all(np.isfinite(s)) and np.all(s > 0)):
            raise ValueError(f"{where}: scale must be finite and > 0, got {s.tolist()}; "
                             "compute it with an observer or choose_qparams, or clamp it to eps")


def check_zero_point(zero_point: jax.Array, quant_min: int, quant_max: int, where: str) -> None:
    """Raise on a concrete integer zero point outside ``[quant_min, quant_max]``."""
    if _is_concrete(zero_point):
        z = np.asarray(zero_point)
        if z.size and (z.min() < quant_min or z.max() > quant_max):
            raise ValueError(f"{where}: zero_point must be between quant_min ({quant_min}) and quant_max "
                             f"({quant_max}), got {z.tolist()}")


def _check_scalar_qparams(scale: jax.Array, zero_point: jax.Array, where: str, per_channel_fn: str) -> None:
    """Raise unless ``scale`` and ``zero_point`` hold one element each, pointing to ``per_channel_fn``."""
    if scale.size != 1 or zero_point.size != 1:
        raise ValueError(f"{where}: scale and zero_point must be scalars, got shapes {scale.shape} and "
                         f"{zero_point.shape}; use {per_channel_fn}")


def _channel_qparams(
    x: jax.Array, scale: ArrayLike, zero_point: ArrayLike, axis: int, where: str
) -> tuple[int, jax.Array, jax.Array]:
    """Check a per-channel call's ``axis`` and qparam lengths against ``x``.

    Returns ``(axis in [0, x.ndim), scale float32 (C,), zero_point (C,) in its own dtype)`` with
    ``C = x.shape[axis]``.
    """
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"{where}: axis {axis} is out of range for an input of shape {x.shape}")
    axis = int(axis) % x.ndim
    scale = jnp.asarray(scale, jnp.float32).reshape(-1)
    zero_point = jnp.asarray(zero_point).reshape(-1)
    channels = x.shape[axis]
    if scale.shape[0] != channels or zero_point.shape[0] != channels:
        raise ValueError(f"{where}: expected {channels} scales and zero points for axis {axis} of an input of "
                         f"shape {x.shape}, got {scale.shape[0]} and {zero_point.shape[0]}")
    return axis, scale, zero_point


def _float_input(x: ArrayLike, where: str) -> jax.Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{where}: expected a floating-point input, got {x.dtype}; cast it with .astype(jnp.float32)")
    return x


def _zero_cotangent(a: jax.Array):
    # Integer primals take float0 cotangents; float ones take zeros of their own dtype.
    if jnp.issubdtype(a.dtype, jnp.integer) or a.dtype == jnp.bool_:
        return np.zeros(a.shape, dtype=jax.dtypes.float0)
    return jnp.zeros_like(a)


# ---------------------------------------------------------------------------------------------
# kernels (float32 in, float32 out, plus the gradient mask)


def _in_range(q: jax.Array, quant_min: int, quant_max: int) -> jax.Array:
    """The straight-through mask: bool, where the unclamped integer ``q`` (float32) lies in the range."""
    return (q >= quant_min) & (q <= quant_max)


def _clamped_dequantize(q: jax.Array, zp: jax.Array, scale: jax.Array, quant_min: int, quant_max: int) -> jax.Array:
    """``(clamp(q) - zp) * scale`` in float32, for an integral float32 ``zp`` (broadcasting)."""
    # (q - zp) is an exact small integer in float32, so one rounding happens, in the product.
    return (jnp.clip(q, quant_min, quant_max) - zp) * scale


def fake_quant_with_mask(
    x: jax.Array, scale: jax.Array, zero_point: jax.Array, quant_min: int, quant_max: int
) -> tuple[jax.Array, jax.Array]:
    """The forward kernel on already-broadcast operands; returns ``(y float32, mask bool)``.

    ``scale``, ``zero_point`` broadcast against ``x``. An integer ``zero_point`` is added after
    rounding, a float one before (PyTorch's two per-channel paths).
    """
    x = x.astype(jnp.float32)
    scale = scale.astype(jnp.float32)
    inv_scale = jnp.float32(1.0) / scale  # multiply by the reciprocal, as fbgemm does: it changes ties
    if jnp.issubdtype(zero_point.dtype, jnp.floating):
        zp = zero_point.astype(jnp.float32)
        q = jnp.round(zp + x * inv_scale)
        y = _exact_diff_times(jnp.clip(q, quant_min, quant_max), zp, scale)
        return y, _in_range(q, quant_min, quant_max)
    zp = zero_point.astype(jnp.int32).astype(jnp.float32)
    q = jnp.round(x * inv_scale) + zp
    return _clamped_dequantize(q, zp, scale, quant_min, quant_max), _in_range(q, quant_min, quant_max)


def _exact_diff_times(q: jax.Array, zp: jax.Array, scale: jax.Array) -> jax.Array:
    """float32((q - zp) * scale) with the difference and product carried as if in double.

    PyTorch's float-zero-point kernel promotes to double via ``std::fmin``/``fmax`` and rounds once;
    plain float32 would round ``q - zp`` first. TwoSum recovers the difference exactly; the
    residual of the product is added back, so the result is faithfully rounded.
    """
    hi = q - zp
    bb = hi - q
    lo = (q - (hi - bb)) + (-zp - bb)
    p = hi * scale
    # Dekker's product error of hi * scale
    c = jnp.float32(4097.0)
    h_hi = c * hi - (c * hi - hi)
    h_lo = hi - h_hi
    s_hi = c * scale - (c * scale - scale)
    s_lo = scale - s_hi
    err = ((h_hi * s_hi - p) + h_hi * s_lo + h_lo * s_hi) + h_lo * s_lo
    return p + (err + lo * scale)


# ---------------------------------------------------------------------------------------------
# straight-through custom VJP, and per tensor


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _fq_ste(x, scale, zero_point, quant_min, quant_max):
    """Straight-through fake quantization on operands that broadcast against ``x``.

    Per tensor and per channel differ only in that broadcast, so one custom VJP serves both.
    """
    y, _ = fake_quant_with_mask(x, scale, zero_point, quant_min, quant_max)
    return y.astype(x.dtype)


def _fq_ste_fwd(x, scale, zero_point, quant_min, quant_max):
    y, mask = fake_quant_with_mask(x, scale, zero_point, quant_min, quant_max)
    return y.astype(x.dtype), (mask, scale, zero_point)


def _fq_ste_bwd(quant_min, quant_max, res, g):
    mask, scale, zero_point = res
    return (jnp.where(mask, g, jnp.zeros_like(g)), _zero_cotangent(scale), _zero_cotangent(zero_point))


_fq_ste.defvjp(_fq_ste_fwd, _fq_ste_bwd)

_fq_per_tensor = _fq_ste  # scale and zero point of shape ()


def fake_quantize_per_tensor_affine(
    x: ArrayLike,
    scale: ArrayLike,
    zero_point: ArrayLike,
    quant_min: int,
    quant_max: int,
) -> jax.Array:
    """Quantize and dequantize ``x`` with one scale and zero point (``torch.fake_quantize_per_tensor_affine``).

    Args:
      x: float array of any shape (float32, or float16/bfloat16: computed in float32, cast back).
      scale: float32 scalar (shape ``()`` or ``(1,)``), finite and > 0.
      zero_point: int32 scalar in ``[quant_min, quant_max]``.
      quant_min, quant_max: the integer range (static Python ints, ``quant_min < quant_max``).
    Returns:
      An array like ``x``. Gradient: straight through where the unclamped ``q`` lies in the range,
      zero elsewhere; zero for ``scale`` and ``zero_point``. Works under ``jit``, ``vmap`` and ``grad``.
    """
    where = "fake_quantize_per_tensor_affine"
    check_qrange(quant_min, quant_max, where)
    x = _float_input(x, where)
    scale = jnp.asarray(scale, jnp.float32)
    zero_point = jnp.asarray(zero_point)
    _check_scalar_qparams(scale, zero_point, where, "fake_quantize_per_channel_affine for one per channel")
    if jnp.issubdtype(zero_point.dtype, jnp.floating):
        zero_point = jnp.round(zero_point)  # PyTorch converts the zero point with toInt()/nearbyint
    zero_point = zero_point.astype(jnp.int32)
    check_scale(scale, where)
    check_zero_point(zero_point, quant_min, quant_max, where)
    return _fq_per_tensor(x, scale.reshape(()), zero_point.reshape(()), int(quant_min), int(quant_max))


# ---------------------------------------------------------------------------------------------
# per channel


def _channel_view(a: jax.Array, ndim: int, axis: int) -> jax.Array:
    shape = [1] * ndim
    shape[axis] = -1
    return a.reshape(shape)


def _fq_per_channel(x, scale, zero_point, axis, quant_min, quant_max):
    # scale, zero_point (C,) viewed along axis; the reshape carries their (zero) cotangents back to (C,)
    return _fq_ste(x, _channel_view(scale, x.ndim, axis), _channel_view(zero_point, x.ndim, axis),
                   quant_min, quant_max)


def fake_quantize_per_channel_affine(
    x: ArrayLike,
    scale: ArrayLike,
    zero_point: ArrayLike,
    axis: int,
    quant_min: int,
    quant_max: int,
) -> jax.Array:
    """Fake quantization with one scale and zero point per slice along ``axis``
    (``torch.fake_quantize_per_channel_affine``).

    Args:
      x: float array; ``x.shape[axis] == C``.
      scale: float32 ``(C,)``, finite and > 0.
      zero_point: ``(C,)`` int32 in ``[quant_min, quant_max]``, or float32 for
        ``per_channel_affine_float_qparams`` (then added before rounding).
      axis: the channel axis (negative counts from the end; static).
      quant_min, quant_max: the integer range (static Python ints).
    Returns:
      An array like ``x``; gradient as in :func:`fake_quantize_per_tensor_affine`.
    """
    where = "fake_quantize_per_channel_affine"
    check_qrange(quant_min, quant_max, where)
    x = _float_input(x, where)
    axis, scale, zero_point = _channel_qparams(x, scale, zero_point, axis, where)
    check_scale(scale, where)
    if not jnp.issubdtype(zero_point.dtype, jnp.floating):
        zero_point = zero_point.astype(jnp.int32)
        check_zero_point(zero_point, quant_min, quant_max, where)
    else:
        zero_point = zero_point.astype(jnp.float32)
    return _fq_per_channel(x, scale, zero_point, axis, int(quant_min), int(quant_max))
