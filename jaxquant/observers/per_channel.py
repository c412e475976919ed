"""Per-channel running min/max observers (weights): ``PerChannelMinMaxObserver`` and its moving
average variant. The module layer feeds weights in PyTorch's layout (output channel first), so the
default ``ch_axis=0`` is the output channel."""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp

from jaxquant.observers.base import (RunningMinMaxObserverBase, StatsState, finite_min_max, fresh_stats,
                                     refuse_moving_average_merge)
from jaxquant.dtypes import QScheme, per_channel_affine
from jaxquant.observers.minmax import fold_moving_average
from jaxquant.qtensor import group_qparams_shape


def _shape_of(example_or_shape: Any, who: str) -> tuple[int, ...]:
    if example_or_shape is None:
        raise ValueError(f"{who}.init needs an example array or its shape to size the per-channel state; "
                         "call init(weight) or init(weight.shape)")
    if hasattr(example_or_shape, "shape"):
        return tuple(example_or_shape.shape)
    return tuple(int(d) for d in example_or_shape)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PerChannelMinMaxObserver(RunningMinMaxObserverBase):
    """Running min/max per slice along ``ch_axis``; qparams per channel by PyTorch's formula.

    State: :class:`~jaxquant.observers.base.StatsState` with ``min_val``/``max_val`` of shape ``(C,)``.

    ``block_size`` (one entry per axis of the observed tensor) makes it a per-group observer:
    min/max, and so the qparams, are kept per block, with the data's rank
    (``shape[i] // block_size[i]`` along axis ``i``; ``ch_axis`` is then unused), as
    :func:`jaxquant.qtensor.quantize_per_group` takes them. E.g. ``(1, 32)`` for a weight in
    PyTorch's ``(out, in)`` layout: one scale per output channel and group of 32 input features.
    """

    ch_axis: int = 0
    qscheme: QScheme = per_channel_affine
    block_size: Optional[tuple[int, ...]] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        me = type(self).__name__
        if not self.qscheme.is_per_channel:
            raise ValueError(
                f"{me}: qscheme {self.qscheme!r} is per tensor; this observer supports per_channel_affine, "
                "per_channel_symmetric and per_channel_affine_float_qparams (use MinMaxObserver)"
            )
        if self.is_dynamic:
            raise ValueError(f"{me} doesn't support dynamic quantization; use is_dynamic=False")
        self._reject_symmetric_reduced_quint8()
        if self.block_size is not None:
            object.__setattr__(self, "block_size", tuple(int(b) for b in self.block_size))

    def _channels(self, shape: tuple[int, ...]) -> int:
        if not -len(shape) <= self.ch_axis < len(shape):
            raise ValueError(f"{type(self).__name__}: ch_axis={self.ch_axis} is out of range for shape {shape}")
        return shape[self.ch_axis]

    def init(self, example_or_shape: Any = None) -> StatsState:
        """State with ``(C,)`` entries, ``C = shape[ch_axis]`` of the example (or shape) given."""
        shape = _shape_of(example_or_shape, type(self).__name__)
        if self.block_size is not None:
            return fresh_stats(group_qparams_shape(shape, self.block_size, type(self).__name__))
        return fresh_stats((self._channels(shape),))

    def batch_min_max(self, state: StatsState, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        if self.block_size is not None:
            qshape = group_qparams_shape(x.shape, self.block_size, type(self).__name__)
            if qshape != tuple(state.min_val.shape):
                raise ValueError(f"{type(self).__name__}: input of shape {x.shape} has blocks {qshape} but the state "
                                 f"was initialised for {tuple(state.min_val.shape)}; re-run init with this shape")
            # (q0, b0, q1, b1, ...): one reduction over every block axis
            y = x.reshape(tuple(d for q, b in zip(qshape, self.block_size) for d in (q, b)))
            return finite_min_max(y, axis=tuple(range(1, y.ndim, 2)))
        channels = self._channels(tuple(x.shape))
        if channels != state.min_val.shape[-1]:
            raise ValueError(
                f"{type(self).__name__}: input has {channels} channels on axis {self.ch_axis} (shape {x.shape}) "
                f"but the state was initialised for {state.min_val.shape[-1]}; re-run init with this shape"
            )
        y = jnp.moveaxis(x, self.ch_axis, 0).reshape(channels, -1)
        return finite_min_max(y, axis=1)

    def calculate_qparams(self, state: StatsState) -> tuple[jax.Array, jax.Array]:
        """``(scales (C,) float32, zero_points (C,) int32)``; float32 zero points for
        ``per_channel_affine_float_qparams``. Raises on a concrete state that saw no data or NaN/Inf."""
        self._checked(state)
        return self._calculate_qparams(state.min_val, state.max_val)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MovingAveragePerChannelMinMaxObserver(PerChannelMinMaxObserver):
    """Per-channel exponential moving average of min and max (PyTorch's, for QAT weights)."""

    averaging_constant: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.averaging_constant <= 1:
            raise ValueError(
                f"{type(self).__name__}: averaging_constant must be in (0, 1], got {self.averaging_constant}"
            )

    def fold(self, state: StatsState, lo: jax.Array, hi: jax.Array, bad: jax.Array) -> StatsState:
        """Per-channel moving-average step; channels without finite values in the batch keep theirs."""
        return fold_moving_average(self.averaging_constant, state, lo, hi, bad)

    def merge(self, *states: StatsState) -> StatsState:
        """Refused: an average of per-device moving averages is not the moving average of the global batches."""
        refuse_moving_average_merge(self)
