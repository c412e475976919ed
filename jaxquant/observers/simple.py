"""Observers that compute no statistics: ``PlaceholderObserver``, ``NoopObserver``,
``ReuseInputObserver``, ``RecordingObserver`` (debug) and ``FixedQParamsObserver``."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Hashable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from jaxquant.dtypes import (
    FLOAT_DTYPES,
    QUANTIZED_DTYPES,
    QDType,
    QScheme,
    float16,
    float32,
    per_tensor_affine,
    per_tensor_symmetric,
    quint8,
    validate_qrange,
)
from jaxquant.observers.base import ObserverBase, any_over_axis, as_float32


class CountState(NamedTuple):
    """``num_batches`` int32 (updates seen) and ``nonfinite`` bool; nothing else is tracked."""

    num_batches: jax.Array
    nonfinite: jax.Array


def _count_state() -> CountState:
    return CountState(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.bool_))


def _count(state: CountState, x: jax.Array) -> CountState:
    x = jnp.asarray(x)
    bad = ~jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) and x.size else jnp.bool_(False)
    return CountState(state.num_batches + 1, state.nonfinite | bad)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _CountingObserver(ObserverBase):
    """State: how many batches were seen and whether any held NaN/Inf."""

    def init(self, example_or_shape: Any = None) -> CountState:
        return _count_state()

    def update(self, state: CountState, x: jax.Array) -> CountState:
        return _count(state, x)

    def sharded_update(self, state: CountState, x: jax.Array, axis_name: Optional[Hashable]) -> CountState:
        """One more batch; non-finite if any device's shard held NaN/Inf."""
        new = _count(state, x)
        if axis_name is None:
            return new
        return new._replace(nonfinite=state.nonfinite | any_over_axis(new.nonfinite, axis_name))

    def merge(self, *states: CountState) -> CountState:
        """The largest count; non-finite if any device saw non-finite values."""
        return CountState(functools.reduce(jnp.maximum, [s.num_batches for s in states]),
                          functools.reduce(jnp.logical_or, [s.nonfinite for s in states]))


@dataclasses.dataclass(frozen=True, kw_only=True)
class _PassThroughObserver(_CountingObserver):
    """Counts calls; ``calculate_qparams`` raises as PyTorch's does."""

    def calculate_qparams(self, state: Any) -> tuple[jax.Array, jax.Array]:
        raise NotImplementedError(
            f"calculate_qparams should not be called for {type(self).__name__}: it only carries configuration "
            "(dtype, is_dynamic) to convert"
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class PlaceholderObserver(_PassThroughObserver):
    """Carries ``dtype``/``is_dynamic``/range to convert without observing (float16 targets,
    dynamic quantization where qparams are chosen per call). PyTorch's arguments and defaults;
    ``compute_dtype`` is accepted for compatibility and, as in PyTorch, has no effect."""

    dtype: Any = float32
    custom_op_name: str = ""
    compute_dtype: Any = None
    quant_min: Optional[int] = None
    quant_max: Optional[int] = None
    qscheme: Optional[QScheme] = None
    eps: Optional[float] = None
    is_dynamic: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in QUANTIZED_DTYPES + FLOAT_DTYPES:
            raise ValueError(f"PlaceholderObserver: dtype {self.dtype!r} is neither a quantized dtype (qint8, "
                             "quint8, ...) nor a float dtype (float16, bfloat16, float32)")
        if (self.quant_min is None) != (self.quant_max is None):
            raise ValueError("PlaceholderObserver: give both quant_min and quant_max, or neither")
        if self.quant_min is not None and isinstance(self.dtype, QDType):
            validate_qrange(self.quant_min, self.quant_max, self.dtype, where="PlaceholderObserver")  # type: ignore[arg-type]


@dataclasses.dataclass(frozen=True, kw_only=True)
class NoopObserver(_PassThroughObserver):
    """Observes nothing; PyTorch's float16 placeholder (``dtype=float16``)."""

    dtype: Any = float16
    custom_op_name: str = ""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReuseInputObserver(_PassThroughObserver):
    """Marks an op whose output reuses its input's observer (reshape-like ops)."""

    dtype: Any = quint8


class RecordingState(NamedTuple):
    """``buffer`` float32 ``(capacity, *shape)``: the most recent ``capacity`` inputs, in a ring
    (slot ``i % capacity`` holds call ``i``); ``num_batches`` int32 calls seen; ``nonfinite`` bool."""

    buffer: jax.Array
    num_batches: jax.Array
    nonfinite: jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class RecordingObserver(ObserverBase):
    """Debug observer recording the tensors it sees (PyTorch keeps an unbounded Python list).

    Jittable state needs a static size, so this keeps the last ``capacity`` inputs of one fixed
    shape (given to :meth:`init`) in a ring buffer; :meth:`get_tensor_value` returns them oldest
    first, on the host.
    """

    dtype: Any = quint8
    capacity: int = 16

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise ValueError(f"RecordingObserver: capacity must be >= 1, got {self.capacity}")

    def init(self, example_or_shape: Any = None) -> RecordingState:
        if example_or_shape is None:
            raise ValueError("RecordingObserver.init needs an example array or the shape of what it will record")
        shape = tuple(example_or_shape.shape) if hasattr(example_or_shape, "shape") else tuple(example_or_shape)
        return RecordingState(jnp.zeros((self.capacity, *shape), jnp.float32), jnp.zeros((), jnp.int32),
                              jnp.zeros((), jnp.bool_))

    def update(self, state: RecordingState, x: jax.Array) -> RecordingState:
        """Store ``x`` (float, the shape given to init) in slot ``num_batches % capacity``."""
        x = as_float32(x, "RecordingObserver")
        if tuple(x.shape) != tuple(state.buffer.shape[1:]):
            raise ValueError(f"RecordingObserver: input shape {x.shape} differs from the recorded shape "
                             f"{state.buffer.shape[1:]}; init with the right shape")
        slot = state.num_batches % self.capacity
        buffer = jax.lax.dynamic_update_index_in_dim(state.buffer, x, slot, axis=0)
        return RecordingState(buffer, state.num_batches + 1, state.nonfinite | ~jnp.all(jnp.isfinite(x)))

    def get_tensor_value(self, state: RecordingState) -> list[jax.Array]:
        """The recorded inputs, oldest first (at most ``capacity``)."""
        n = int(state.num_batches)
        kept = min(n, self.capacity)
        return [state.buffer[i % self.capacity] for i in range(n - kept, n)]

    def calculate_qparams(self, state: Any) -> tuple[jax.Array, jax.Array]:
        raise NotImplementedError("calculate_qparams should not be called for RecordingObserver (debug only)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class FixedQParamsObserver(_CountingObserver):
    """Always gives the configured ``scale``/``zero_point`` (ops with a known output range such as
    sigmoid, tanh). Per-tensor only, as in PyTorch."""

    scale: float
    zero_point: int
    dtype: QDType = quint8
    qscheme: QScheme = per_tensor_affine
    quant_min: int = 0
    quant_max: int = 255
    is_dynamic: bool = False

    def __post_init__(self) -> None:
        if self.is_dynamic:
            raise ValueError("FixedQParamsObserver doesn't support dynamic quantization; use is_dynamic=False")
        if self.qscheme not in (per_tensor_affine, per_tensor_symmetric):
            raise ValueError(f"FixedQParamsObserver: qscheme {self.qscheme!r} is not per tensor; only "
                             "per_tensor_affine and per_tensor_symmetric are supported")
        if self.dtype not in QUANTIZED_DTYPES:
            raise ValueError(f"FixedQParamsObserver: dtype {self.dtype!r} is not a quantized dtype")
        validate_qrange(self.quant_min, self.quant_max, self.dtype, where="FixedQParamsObserver")
        if not self.scale > 0:
            raise ValueError(f"FixedQParamsObserver: scale must be positive, got {self.scale}")
        if not self.quant_min <= self.zero_point <= self.quant_max:
            raise ValueError(f"FixedQParamsObserver: zero_point {self.zero_point} is outside "
                             f"[{self.quant_min}, {self.quant_max}]")

    @property
    def computes_qparams(self) -> bool:
        # qparams exist without data, so there is nothing for check_observer_state to check
        return False

    @property
    def quant_range(self) -> tuple[int, int]:
        return self.quant_min, self.quant_max

    def calculate_qparams(self, state: Any = None) -> tuple[jax.Array, jax.Array]:
        """The fixed ``(scale float32 (), zero_point int32 ())``."""
        return jnp.asarray(self.scale, jnp.float32), jnp.asarray(self.zero_point, jnp.int32)
