"""Per-tensor running min/max observers: ``MinMaxObserver`` and ``MovingAverageMinMaxObserver``."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxquant.torch_numerics import rounded
from jaxquant.observers.base import (RunningMinMaxObserverBase, StatsState, finite_min_max, fresh_stats,
                                     refuse_moving_average_merge)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MinMaxObserver(RunningMinMaxObserverBase):
    """Running min and max of everything observed; qparams by PyTorch's formula.

    Per-tensor qschemes only (``per_tensor_affine``, ``per_tensor_symmetric``). State is a
    :class:`~jaxquant.observers.base.StatsState` with scalar ``min_val``/``max_val``.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.qscheme.is_per_channel:
            raise ValueError(
                f"{type(self).__name__}: qscheme {self.qscheme!r} is per channel; this observer supports only "
                "per_tensor_affine and per_tensor_symmetric (use PerChannelMinMaxObserver)"
            )
        self._reject_symmetric_reduced_quint8()

    def init(self, example_or_shape: Any = None) -> StatsState:
        """Scalar state: ``min_val = +inf``, ``max_val = -inf`` (nothing observed)."""
        return fresh_stats(())

    def batch_min_max(self, state: StatsState, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        return finite_min_max(x)

    def calculate_qparams(self, state: StatsState) -> tuple[jax.Array, jax.Array]:
        """``(scale, zero_point)`` of shape ``()``: float32 and int32.

        Raises :class:`~jaxquant.observers.base.NotCalibratedError` for a concrete state that
        saw no data or saw NaN/Inf; under ``jit`` returns PyTorch's defaults (1.0, 0) when empty.
        """
        self._checked(state)
        return self._calculate_qparams(state.min_val, state.max_val)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MovingAverageMinMaxObserver(MinMaxObserver):
    """Exponential moving average of per-batch min and max (PyTorch's, used for QAT activations).

    ``min <- min + averaging_constant * (min(x) - min)`` after the first batch, which sets it.
    """

    averaging_constant: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.is_dynamic and self.averaging_constant != 1:
            raise ValueError(
                f"{type(self).__name__}: dynamic quantization needs averaging_constant=1, got "
                f"{self.averaging_constant}"
            )
        if not 0 < self.averaging_constant <= 1:
            raise ValueError(
                f"{type(self).__name__}: averaging_constant must be in (0, 1], got {self.averaging_constant}"
            )

    def merge(self, *states: StatsState) -> StatsState:
        """Refused: an average of per-device moving averages is not the moving average of the global batches."""
        refuse_moving_average_merge(self)

    def fold(self, state: StatsState, lo: jax.Array, hi: jax.Array, bad: jax.Array) -> StatsState:
        """Moving-average step with the batch's finite min/max; a batch without finite values is skipped."""
        return fold_moving_average(self.averaging_constant, state, lo, hi, bad)

def moving_average(
    min_val: jax.Array, max_val: jax.Array, cur_min: jax.Array, cur_max: jax.Array, c: float
) -> tuple[jax.Array, jax.Array]:
    """PyTorch's update ``m + c * (cur - m)`` in float32, elementwise; the first observation
    (state still ``(inf, -inf)``) is taken as is, and entries whose current slice had no finite
    value (``cur_min > cur_max``) keep their old statistics."""
    c32 = jnp.float32(c)
    first = (min_val == jnp.inf) & (max_val == -jnp.inf)
    seen = cur_min <= cur_max
    # jnp.where keeps the inf arithmetic of the unselected branch out of the result
    safe_min = jnp.where(first, 0.0, min_val)
    safe_max = jnp.where(first, 0.0, max_val)
    # rounded(): keep XLA from fusing the product and the sum into one FMA (PyTorch rounds twice)
    avg_min = safe_min + rounded(c32 * (jnp.where(seen, cur_min, 0.0) - safe_min))
    avg_max = safe_max + rounded(c32 * (jnp.where(seen, cur_max, 0.0) - safe_max))
    new_min = jnp.where(seen, jnp.where(first, cur_min, avg_min), min_val)
    new_max = jnp.where(seen, jnp.where(first, cur_max, avg_max), max_val)
    return new_min, new_max

def fold_moving_average(c: float, state: StatsState, lo: jax.Array, hi: jax.Array, bad: jax.Array) -> StatsState:
    """:func:`moving_average` of the state with a batch's ``(lo, hi, bad)``, one more batch counted."""
    new_min, new_max = moving_average(state.min_val, state.max_val, lo, hi, c)
    return StatsState(new_min, new_max, state.num_batches + 1, state.nonfinite | bad)
