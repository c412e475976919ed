"""Dynamic quantization parameters: PyTorch's ``ChooseQuantizationParams`` (``quant_utils.h``).

This is what ``torch._choose_qparams_per_tensor`` and fbgemm's dynamic linear use for activations.
It differs from the observers' ``calculate_qparams``: tiny scales are lifted to 6.1e-5 (widening the
range), a zero scale becomes 0.1, and the zero point comes from whichever end (min or max) has the
smaller rounding error. PyTorch computes the intermediate values in float64; here they are float32,
which can differ from PyTorch by one zero-point step in rare tie cases.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxquant import torch_numerics as tn
from jaxquant.dtypes import QDType, quint8

SMALL_SCALE_THRESHOLD = 6.1e-5


def _exact_difference_over(max_val: jax.Array, min_val: jax.Array, divisor: float) -> jax.Array:
    """float32((max - min) / divisor) with the difference and division done as if in float64.

    PyTorch computes this in double and rounds once; plain float32 rounds twice and is one ulp off
    for about one range in ten. Error-free transforms (TwoSum, Dekker's product) recover the exact
    difference and the residual of the first quotient, which is enough for a faithful result.
    """
    hi, lo = tn.two_sum(max_val, -min_val)
    d = jnp.float32(divisor)
    q1 = tn.true_divide(hi, d)
    p, p_err = tn.two_prod(q1, d)
    residual = ((hi - p) - p_err) + lo
    return q1, tn.true_divide(residual, d)


def _divide_by_double(a: jax.Array, s_hi: jax.Array, s_lo: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``a / (s_hi + s_lo)`` as a float32 pair ``(hi, lo)`` carrying about 46 bits."""
    q = tn.true_divide(a, s_hi)
    p, p_err = tn.two_prod(q, s_hi)
    remainder = ((a - p) - p_err) - tn.rounded(q * s_lo)
    return q, tn.true_divide(remainder, s_hi)


def _round_pair_half_even(hi: jax.Array, lo: jax.Array) -> jax.Array:
    """``nearbyint(hi + lo)`` of a float32 pair, ties to even, as C++ does on the double."""
    n = jnp.round(hi)
    frac = (hi - n) + lo  # hi - n is exact
    up = (frac > 0.5) | ((frac == 0.5) & (jnp.mod(n, 2.0) == 1.0))
    down = (frac < -0.5) | ((frac == -0.5) & (jnp.mod(n, 2.0) == 1.0))
    return n + jnp.where(up, 1.0, 0.0) - jnp.where(down, 1.0, 0.0)


def choose_qparams_from_min_max(
    min_val: jax.Array,
    max_val: jax.Array,
    quant_min: int = 0,
    quant_max: int = 255,
    reduce_range: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Scale and zero point for a float range, elementwise over ``min_val``/``max_val`` of any shape.

    Args:
      min_val, max_val: float32 arrays of the same shape (``()`` per tensor, ``(M,)`` per row).
      quant_min, quant_max: the integer range; ``reduce_range`` halves both (C++ integer division).
    Returns:
      ``(scale float32, zero_point int32)`` with the shape of ``min_val``.
    """
    if reduce_range:
        quant_min, quant_max = int(quant_min / 2), int(quant_max / 2)  # C++ truncation toward zero
    min_val = jnp.minimum(jnp.asarray(min_val, jnp.float32), 0.0)
    max_val = jnp.maximum(jnp.asarray(max_val, jnp.float32), 0.0)
    qrange = float(quant_max - quant_min)
    # PyTorch keeps the scale in double for the zero point and rounds it to float32 only for the
    # result; (scale_hi, scale_lo) is that double as a float32 pair.
    scale_hi, scale_lo = _exact_difference_over(max_val, min_val, qrange)
    scale = scale_hi + scale_lo
    # Near float32's max the error-free transforms overflow (a range wider than the max makes the
    # difference inf, Dekker's split of a quotient above ~8e34 makes inf - inf); PyTorch's double
    # does not. The same transforms on the ends scaled by 2**-8 (exact) stay in range; scaling the
    # quotient back is exact too, so the scale is still PyTorch's double rounded once.
    wide = ~jnp.isfinite(scale) & jnp.isfinite(max_val) & jnp.isfinite(min_val)
    down = jnp.float32(2.0**-8)
    w_hi, w_lo = _exact_difference_over(max_val * down, min_val * down, qrange)
    wide_scale = (w_hi + w_lo) * jnp.float32(2.0**8)
    scale = jnp.where(wide, wide_scale, scale)
    scale_hi = jnp.where(wide, wide_scale, scale_hi)
    scale_lo = jnp.where(wide, jnp.float32(0.0), scale_lo)
    bad = (scale == 0.0) | jnp.isinf(jnp.float32(1.0) / scale)
    scale = jnp.where(bad, jnp.float32(0.1), scale)
    scale_hi = jnp.where(bad, jnp.float32(0.1), scale_hi)
    scale_lo = jnp.where(bad, jnp.float32(0.0), scale_lo)

    small = scale < SMALL_SCALE_THRESHOLD
    amplifier = jnp.float32(SMALL_SCALE_THRESHOLD) / jnp.where(small, scale, 1.0)
    new_max = jnp.where(min_val == 0.0, jnp.float32(SMALL_SCALE_THRESHOLD * qrange), max_val * amplifier)
    new_min = jnp.where(
        min_val == 0.0, min_val,
        jnp.where(max_val == 0.0, jnp.float32(-SMALL_SCALE_THRESHOLD * qrange), min_val * amplifier),
    )
    new_max = jnp.where((min_val != 0.0) & (max_val == 0.0), max_val, new_max)
    min_val = jnp.where(small, new_min, min_val)
    max_val = jnp.where(small, new_max, max_val)
    scale = jnp.where(small, jnp.float32(SMALL_SCALE_THRESHOLD), scale)
    scale_hi = jnp.where(small, jnp.float32(SMALL_SCALE_THRESHOLD), scale_hi)
    scale_lo = jnp.where(small, jnp.float32(0.0), scale_lo)

    min_hi, min_lo = _divide_by_double(min_val, scale_hi, scale_lo)
    max_hi, max_lo = _divide_by_double(max_val, scale_hi, scale_lo)
    # Dekker's product overflows for scales above ~8e34 (ranges near float32's max): there the
    # plain float32 quotient decides (the zero point then is at worst one step off PyTorch's)
    min_ok = jnp.isfinite(min_hi) & jnp.isfinite(min_lo)
    max_ok = jnp.isfinite(max_hi) & jnp.isfinite(max_lo)
    min_hi, min_lo = jnp.where(min_ok, min_hi, min_val / scale), jnp.where(min_ok, min_lo, 0.0)
    max_hi, max_lo = jnp.where(max_ok, max_hi, max_val / scale), jnp.where(max_ok, max_lo, 0.0)
    # zero point from whichever end rounds with the smaller error (quant_utils.h), kept as pairs
    zp_min_hi, zp_min_err = tn.two_sum(jnp.float32(quant_min), -min_hi)
    zp_max_hi, zp_max_err = tn.two_sum(jnp.float32(quant_max), -max_hi)
    err_min = abs(quant_min) - jnp.abs(min_hi + min_lo)
    err_max = abs(quant_max) - jnp.abs(max_hi + max_lo)
    use_min = err_min < err_max
    initial_hi = jnp.where(use_min, zp_min_hi, zp_max_hi)
    initial_lo = jnp.where(use_min, zp_min_err - min_lo, zp_max_err - max_lo)
    initial = initial_hi + initial_lo
    nudged = jnp.where(initial < quant_min, jnp.float32(quant_min),
                       jnp.where(initial > quant_max, jnp.float32(quant_max),
                                 _round_pair_half_even(initial_hi, initial_lo)))
    zero_point = jnp.clip(nudged, quant_min, quant_max).astype(jnp.int32)
    return scale, zero_point


def choose_qparams(
    x: jax.Array,
    dtype: QDType = quint8,
    reduce_range: bool = False,
    axis: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Dynamic qparams of ``x`` (``torch._choose_qparams_per_tensor`` when ``axis`` is None).

    Args:
      x: float array of any shape, not empty. Must be finite: an eager call raises ``ValueError`` on
        NaN/Inf; under ``jit`` (no check) they give a NaN scale, as in PyTorch.
      dtype: ``quint8`` (range [0, 255]) or ``qint8`` ([-128, 127]).
      reduce_range: use 7 bits (what PyTorch's x86/fbgemm dynamic ops do to avoid overflow).
      axis: ``None`` for one scale per tensor; an int to reduce over every other axis
        (``axis=0`` of an ``(M, K)`` input gives per-row (per-token) qparams of shape ``(M,)``).
    Returns:
      ``(scale float32, zero_point int32)``, shape ``()`` or ``(x.shape[axis],)``.
    """
    x = jnp.asarray(x, jnp.float32)
    if x.size == 0:
        raise ValueError(f"choose_qparams: the input is empty (shape {x.shape}); there is no range to "
                         "quantize. Skip empty batches, or pass the qparams explicitly")
    if not isinstance(x, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(x))):
        # eager only: under jit the host cannot read x, and NaN/Inf give a NaN scale as in PyTorch
        raise ValueError("choose_qparams: the input contains NaN or Inf; qparams need a finite range. "
                         "Clean the data (jnp.nan_to_num) or find where the non-finite values come from")
    if axis is None:
        lo, hi = jnp.min(x), jnp.max(x)
    else:
        axes = tuple(a for a in range(x.ndim) if a != axis % x.ndim)
        lo, hi = jnp.min(x, axis=axes), jnp.max(x, axis=axes)
    return choose_qparams_from_min_max(lo, hi, dtype.min, dtype.max, reduce_range)
