"""``MSEObserver``: pick the clipping range that minimises the quantization MSE of the data seen.

The state holds the running min/max and, for a fixed grid of shrink factors
``a_k = linspace(0.5, 1.0, grid)``, the running sum of squared quantize-dequantize errors of
every observed value under the range ``[a_k * min, a_k * max]``. ``calculate_qparams`` takes the
factor with the smallest sum (ties go to the larger factor, i.e. towards plain min/max) and
returns PyTorch's qparams of ``[a * min_val, a * max_val]`` for the final running min/max.

Streaming caveat: the error of a batch is measured with the running min/max *at that batch*
(after folding the batch in), not with the final one, because the data itself is not kept. When
later batches widen the range, the early errors were measured on a narrower grid; for a
stationary calibration stream the range settles after a few batches and this does not matter.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.dtypes import QScheme, per_channel_affine_float_qparams, per_tensor_affine
from jaxquant.observers.base import UniformQuantizationObserverBase, as_float32, finite_min_max, fresh_stats


class MSEState(NamedTuple):
    """``min_val``/``max_val`` float32 (``()`` per tensor, ``(C,)`` per channel; ``(inf, -inf)`` until
    data arrives), ``sq_err`` float32 ``(grid,)`` or ``(grid, C)`` running squared-error sums per
    shrink factor, ``num_batches`` int32 and ``nonfinite`` bool."""

    min_val: jax.Array
    max_val: jax.Array
    sq_err: jax.Array
    num_batches: jax.Array
    nonfinite: jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class MSEObserver(UniformQuantizationObserverBase):
    """Min/max shrunk by the factor (of ``grid`` candidates in ``[0.5, 1]``) with the least MSE.

    Per tensor (``per_tensor_affine``/``per_tensor_symmetric``) or per channel along ``ch_axis``
    (``per_channel_affine``/``per_channel_symmetric``; not ``per_channel_affine_float_qparams``).
    ``update`` costs ``grid`` quantize-dequantize passes over the batch.
    """

    qscheme: QScheme = per_tensor_affine
    ch_axis: int = 0
    grid: int = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        me = type(self).__name__
        if self.qscheme == per_channel_affine_float_qparams:
            raise ValueError(f"{me}: per_channel_affine_float_qparams is not supported; use per_channel_affine, "
                             "per_channel_symmetric or PerChannelMinMaxObserver")
        if self.grid < 1:
            raise ValueError(f"{me}: grid must be >= 1 candidate shrink factors, got {self.grid}")
        self._reject_symmetric_reduced_quint8()

    @property
    def shrink_factors(self) -> np.ndarray:
        """The candidate factors, float32 ``(grid,)``, ``linspace(0.5, 1.0, grid)`` (just 1.0 if grid is 1)."""
        if self.grid == 1:
            return np.ones((1,), np.float32)
        return np.linspace(0.5, 1.0, self.grid).astype(np.float32)

    def _channels(self, shape: tuple[int, ...]) -> int:
        if not -len(shape) <= self.ch_axis < len(shape):
            raise ValueError(f"{type(self).__name__}: ch_axis={self.ch_axis} is out of range for shape {shape}")
        return shape[self.ch_axis]

    def init(self, example_or_shape: Any = None) -> MSEState:
        """Fresh state; per channel needs an example array or its shape (``C = shape[ch_axis]``)."""
        if self.qscheme.is_per_channel:
            if example_or_shape is None:
                raise ValueError(f"{type(self).__name__}.init needs an example array or its shape for per-channel "
                                 "qschemes; call init(weight) or init(weight.shape)")
            shape = tuple(example_or_shape.shape) if hasattr(example_or_shape, "shape") else tuple(example_or_shape)
            stat_shape: tuple[int, ...] = (self._channels(shape),)
        else:
            stat_shape = ()
        s = fresh_stats(stat_shape)
        return MSEState(s.min_val, s.max_val, jnp.zeros((self.grid, *stat_shape), jnp.float32),
                        s.num_batches, s.nonfinite)

    def _candidate_qparams(self, min_val: jax.Array, max_val: jax.Array) -> tuple[jax.Array, jax.Array]:
        a = jnp.asarray(self.shrink_factors).reshape((self.grid,) + (1,) * min_val.ndim)
        return self._calculate_qparams(a * min_val, a * max_val)

    def update(self, state: MSEState, x: jax.Array) -> MSEState:
        """Fold ``x`` into min/max, then add each candidate's squared error on ``x``'s finite entries.

        Args:
          state: from :meth:`init` or a previous update.
          x: float array; per channel, ``x.shape[ch_axis] == C``.
        """
        me = type(self).__name__
        x = as_float32(x, me)
        if x.size == 0:
            return state
        if self.qscheme.is_per_channel:
            channels = self._channels(tuple(x.shape))
            if channels != state.min_val.shape[-1]:
                raise ValueError(f"{me}: input has {channels} channels on axis {self.ch_axis} (shape {x.shape}) but "
                                 f"the state was initialised for {state.min_val.shape[-1]}; re-run init with this shape")
            y = jnp.moveaxis(x, self.ch_axis, 0).reshape(channels, -1)  # (C, M)
            lo, hi, bad = finite_min_max(y, axis=1)
        else:
            y = x.reshape(-1)
            lo, hi, bad = finite_min_max(y)
        new_min = jnp.minimum(lo, state.min_val)
        new_max = jnp.maximum(hi, state.max_val)
        seen = new_min <= new_max
        scale, zp = self._candidate_qparams(jnp.where(seen, new_min, 0.0), jnp.where(seen, new_max, 0.0))
        # scale/zp: (grid,) or (grid, C) -> broadcast against y's trailing sample axis
        scale, zp = scale[..., None], zp.astype(jnp.float32)[..., None]
        finite = jnp.isfinite(y)
        yf = jnp.where(finite, y, 0.0)
        # the library's quantize: float32 reciprocal multiply, round half to even, clamp
        q = jnp.clip(jnp.round(yf * (jnp.float32(1.0) / scale)) + zp, self.qmin, self.qmax)
        err = jnp.where(finite, (q - zp) * scale - yf, 0.0)
        sq = jnp.sum(err * err, axis=-1)
        return MSEState(new_min, new_max, state.sq_err + jnp.where(seen, sq, 0.0),
                        state.num_batches + 1, state.nonfinite | bad)

    def best_shrink(self, state: MSEState) -> jax.Array:
        """The chosen factor, float32 ``()`` or ``(C,)``: smallest error sum, ties to the larger factor."""
        rev = state.sq_err[::-1]
        k = self.grid - 1 - jnp.argmin(rev, axis=0)
        return jnp.asarray(self.shrink_factors)[k]

    def calculate_qparams(self, state: MSEState) -> tuple[jax.Array, jax.Array]:
        """``(scale float32, zero_point int32)`` of shape ``()`` or ``(C,)`` for the chosen range.

        Raises :class:`~jaxquant.observers.base.NotCalibratedError` for a concrete state that saw
        no data or saw NaN/Inf; under ``jit`` an empty state gives PyTorch's (1.0, 0).
        """
        self._checked(state)
        a = self.best_shrink(state)
        seen = state.min_val <= state.max_val
        return self._calculate_qparams(jnp.where(seen, a * state.min_val, state.min_val),
                                       jnp.where(seen, a * state.max_val, state.max_val))


__all__ = ["MSEObserver", "MSEState"]
