"""int32 accumulator -> quantized (uint8/int8) or float32 output.

We follow fbgemm's output pipeline, which is what PyTorch's x86 engine runs for
``quantized::linear`` / ``quantized::conv2d`` with a float bias
(``requantizeOutputProcessingAvx2`` / ``ReQuantizeOutput``), all in float32:

    act_times_w_scale[n] = x_scale * w_scale[n]
    multiplier[n]        = act_times_w_scale[n] / out_scale
    y = float32(acc) + bias[n] / act_times_w_scale[n]          (bias term only with a bias)
    y = round_half_to_even(y * multiplier[n]) + out_zero_point
    y = clamp(y, max(qmin, out_zero_point) if relu else qmin, qmax)

where ``acc = sum_k (x_k - x_zp) * (w_kn - w_zp[n])`` exactly in int32. The float bias is
divided, not pre-rounded to int32, because that is what fbgemm does (the older
``bias_q = round(bias / (x_scale*w_scale))`` would differ by up to half an accumulator unit).

For dynamic (float-output) ops fbgemm's ``ReQuantizeForFloat`` is
``y = float32(acc) * (x_scale * w_scale[n]) + bias[n]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["requantize", "dequantize_accumulator", "output_multiplier", "quant_range"]


def quant_range(dtype) -> tuple[int, int]:
    """(qmin, qmax) of an 8-bit output dtype (``jnp.uint8`` or ``jnp.int8``)."""
    dtype = np.dtype(dtype)
    if dtype == np.uint8:
        return 0, 255
    if dtype == np.int8:
        return -128, 127
    raise TypeError(f"quantized output dtype must be uint8 or int8, got {dtype}")


def output_multiplier(x_scale, w_scale, out_scale) -> tuple[jax.Array, jax.Array]:
    """(act_times_w_scale, multiplier), float32, with fbgemm's order of float32 operations.

    Shapes broadcast: ``w_scale`` is ``()`` per tensor or ``(N,)`` per channel.
    """
    act_times_w = jnp.asarray(x_scale, jnp.float32) * jnp.asarray(w_scale, jnp.float32)
    return act_times_w, act_times_w / jnp.asarray(out_scale, jnp.float32)


def requantize(
    acc: jax.Array,
    multiplier: jax.Array,
    out_zero_point: jax.Array | int,
    *,
    bias_over_scale: jax.Array | None = None,
    relu: bool = False,
    out_dtype=jnp.uint8,
) -> jax.Array:
    """int32 accumulator -> ``out_dtype`` with fbgemm's formula (module docstring).

    Args:
      acc: int32 ``(..., N)`` zero-point-corrected accumulator.
      multiplier: float32 ``()`` or ``(N,)``, ``x_scale * w_scale / out_scale``.
      out_zero_point: int32 scalar.
      bias_over_scale: optional float32 ``(N,)``, ``bias / (x_scale * w_scale)``.
      relu: clamp at the output zero point (fused ReLU).
      out_dtype: ``jnp.uint8`` or ``jnp.int8``.

    Returns:
      ``(..., N)`` array of ``out_dtype``.
    """
    qmin, qmax = quant_range(out_dtype)
    if acc.dtype != jnp.int32:
        raise TypeError(f"requantize expects an int32 accumulator, got {acc.dtype}")
    y = acc.astype(jnp.float32)
    if bias_over_scale is not None:
        y = y + bias_over_scale
    y = jnp.round(y * multiplier)
    zp = jnp.asarray(out_zero_point, jnp.int32)
    lo = jnp.maximum(qmin, zp) if relu else jnp.int32(qmin)
    # Clamp while still in float so values beyond int32 never hit an undefined conversion.
    y = jnp.clip(y, (lo - zp).astype(jnp.float32), (qmax - zp).astype(jnp.float32))
    return (y.astype(jnp.int32) + zp).astype(out_dtype)


def dequantize_accumulator(
    acc: jax.Array,
    act_times_w_scale: jax.Array,
    bias: jax.Array | None = None,
    *,
    relu: bool = False,
) -> jax.Array:
    """int32 accumulator -> float32, fbgemm's ``ReQuantizeForFloat``.

    ``acc`` is int32 ``(..., N)``; ``act_times_w_scale`` float32 broadcastable to it
    (``()``, ``(N,)``, or ``(..., 1)`` / ``(..., N)`` for per-row activation scales);
    ``bias`` float32 ``(N,)`` or None. Returns float32 ``(..., N)``.
    """
    y = acc.astype(jnp.float32) * act_times_w_scale
    if bias is not None:
        y = y + bias
    if relu:
        y = jnp.maximum(y, 0.0)
    return y
