"""Observer contract: immutable configs with pure ``init`` / ``update`` / ``calculate_qparams``.

An observer is a frozen (hashable) dataclass holding only static configuration; its statistics
live in a separate, small pytree ``state`` that the caller threads through ``update``. This is
what lets a whole calibration loop run under one ``jax.jit`` and lets ``jax.vmap`` observe a batch
of independent tensors with one compiled program.

PyTorch parity: field names and defaults are ``torch.ao.quantization.observer``'s constructor
arguments, and ``_calculate_qparams`` is PyTorch's formula computed in float32 op by op, so scale
and zero point agree bit for bit. Differences (documented in ``docs/observers.md``): per-tensor
qparams have shape ``()`` (PyTorch: ``(1,)``), zero points are int32 (PyTorch: int64), NaN/Inf in
observed data are ignored and flagged in the state instead of poisoning min/max, and asking a
concrete state that never saw data for qparams raises instead of warning.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Hashable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.torch_numerics import true_divide
from jaxquant.dtypes import (
    QDType,
    QScheme,
    QSCHEMES,
    QUANTIZED_DTYPES,
    calculate_qmin_qmax,
    per_channel_affine_float_qparams,
    per_tensor_affine,
    quint8,
    validate_qrange,
)

# torch.finfo(torch.float32).eps, PyTorch's default ``eps`` for every uniform observer.
FLOAT32_EPS = float(np.finfo(np.float32).eps)

State = Any  # a pytree of arrays (NamedTuple per observer family)


# XLA:CPU flushes denormal float32 to zero, so a smaller eps does not keep scales positive.
_FLOAT32_TINY = float(np.finfo(np.float32).tiny)

class NotCalibratedError(ValueError):
    """An observer's state cannot give qparams: it saw no data, or saw NaN/Inf."""


# ----------------------------------------------------------------------------------------------
# with_args factories
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ObserverFactory:
    """A hashable partial constructor, PyTorch's ``_PartialWrapper`` for ``with_args``.

    ``factory(**more)`` builds an observer with the stored keyword arguments overridden by
    ``more``; ``factory.with_args(**more)`` returns a new factory with the arguments merged.
    Stored as a sorted tuple of items so that two factories with equal arguments are equal and
    hash the same (QConfig objects are compared and used as dict keys).
    """

    cls: type
    kwargs: tuple[tuple[str, Any], ...] = ()

    def __call__(self, **kwargs: Any) -> "ObserverBase":
        return self.cls(**{**dict(self.kwargs), **kwargs})

    def with_args(self, **kwargs: Any) -> "ObserverFactory":
        return ObserverFactory(self.cls, tuple(sorted({**dict(self.kwargs), **kwargs}.items())))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs)
        return f"{self.cls.__name__}.with_args({args})"


ObserverLike = Union["ObserverBase", ObserverFactory, type]


def as_observer(spec: ObserverLike, **kwargs: Any) -> "ObserverBase":
    """Build an observer instance from a class, a ``with_args`` factory or an instance.

    QConfig entries may be any of the three (as in PyTorch, where they are classes or partials).
    ``kwargs`` override the stored arguments; they are not allowed with an instance.
    """
    if isinstance(spec, ObserverBase):
        if kwargs:
            return dataclasses.replace(spec, **kwargs)
        return spec
    if isinstance(spec, ObserverFactory) or (isinstance(spec, type) and issubclass(spec, ObserverBase)):
        return spec(**kwargs)
    raise TypeError(
        f"expected an observer class, an Observer.with_args(...) factory or an observer instance, got {spec!r}"
    )


# ----------------------------------------------------------------------------------------------
# Base classes
# ----------------------------------------------------------------------------------------------


def _is_traced(tree: Any) -> bool:
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(tree))


@dataclasses.dataclass(frozen=True, kw_only=True)
class ObserverBase:
    """Base of every observer: ``dtype`` and ``is_dynamic`` as in PyTorch's ``ObserverBase``.

    Subclasses implement ``init``, ``update`` and ``calculate_qparams``. Configuration is
    keyword-only (frozen dataclass fields cannot follow PyTorch's positional order across the
    class hierarchy).
    """

    dtype: Any = quint8
    is_dynamic: bool = False

    @classmethod
    def with_args(cls, **kwargs: Any) -> ObserverFactory:
        """A hashable factory building ``cls(**kwargs)``; chain with ``.with_args`` (PyTorch's idiom)."""
        return ObserverFactory(cls, tuple(sorted(kwargs.items())))

    # -- the pure API ---------------------------------------------------------------------------
    def init(self, example_or_shape: Any = None) -> State:
        """Fresh state. Per-channel observers need an example array or its shape."""
        raise NotImplementedError

    def update(self, state: State, x: jax.Array) -> State:
        """Fold the statistics of ``x`` into ``state`` (pure, jittable, vmappable)."""
        raise NotImplementedError

    def calculate_qparams(self, state: State) -> tuple[jax.Array, jax.Array]:
        """``(scale float32, zero_point int32)`` from the state."""
        raise NotImplementedError(f"calculate_qparams should not be called for {type(self).__name__}")

    def sharded_update(self, state: State, x: jax.Array, axis_name: Optional[Hashable]) -> State:
        """``update(state, concat_over_axis(x))`` computed from this device's shard ``x`` inside
        ``shard_map``/``pmap`` over ``axis_name`` (``None``: ``x`` is the whole batch, i.e. ``update``).

        Each observer family says how its batch statistics cross devices (min/max with
        ``pmin``/``pmax``, histogram counts with ``psum``) before its own state transition runs, so
        the result is replicated and equals one device's update on the whole batch bit for bit.
        Observers with no such rule raise ``NotImplementedError``.
        """
        raise NotImplementedError(f"{type(self).__name__} has no sharded_update rule")

    def merge(self, *states: State) -> State:
        """One state from states that saw different data (each device's shards, in device order), as
        if one observer had seen it all: what ``jaxquant.distributed.sync_observer_state`` computes.
        ``num_batches`` is the largest count (data-parallel steps, not shards). Observers with no
        merge rule raise ``NotImplementedError``."""
        raise NotImplementedError(f"{type(self).__name__} has no merge rule")

    # -- helpers ---------------------------------------------------------------------------------
    @property
    def computes_qparams(self) -> bool:
        """Whether ``calculate_qparams`` gives qparams (False for placeholder-like observers)."""
        return False

    def _check_dtype(self, allowed: tuple) -> None:
        if self.dtype not in allowed:
            names = ", ".join(repr(d) for d in allowed)
            raise ValueError(f"{type(self).__name__}: dtype {self.dtype!r} is not supported; use one of {names}")


class StatsState(NamedTuple):
    """Min/max statistics: ``min_val``/``max_val`` float32 (``()`` or ``(C,)``), ``num_batches`` int32
    (updates seen), ``nonfinite`` bool (some observed value was NaN or +-Inf and was ignored)."""

    min_val: jax.Array
    max_val: jax.Array
    num_batches: jax.Array
    nonfinite: jax.Array


def check_observer_state(observer: ObserverBase, state: State, name: Optional[str] = None) -> None:
    """Host-side check that ``state`` can give qparams; raise :class:`NotCalibratedError` otherwise.

    The convert step calls this with the module path as ``name`` so that the message points at
    the layer to fix. Observers that never compute qparams (placeholders, fixed qparams) pass.
    """
    if not observer.computes_qparams or not isinstance(state, tuple) or not hasattr(state, "num_batches"):
        return
    where = f" at {name}" if name else ""
    if bool(np.any(np.asarray(state.nonfinite))):
        raise NotCalibratedError(
            f"{observer!r}{where} found NaN/Inf in the data it observed; clean the calibration data "
            "(or clip the float model's activations) before convert"
        )
    seen = np.asarray(state.num_batches)
    empty = not bool(np.all(seen > 0))
    if not empty and hasattr(state, "min_val"):
        # a per-channel entry stays (inf, -inf) only if that channel never saw a finite value
        empty = bool(np.any(np.asarray(state.min_val) > np.asarray(state.max_val)))
    if empty:
        raise NotCalibratedError(
            f"{observer!r}{where} has not observed any data; call it on representative data before convert"
        )


def merge_stats_states(*states: StatsState) -> StatsState:
    """Running min/max states merged exactly: the min of the mins, the max of the maxes."""
    def fold(op, field):
        return functools.reduce(op, [getattr(st, field) for st in states])
    return StatsState(fold(jnp.minimum, "min_val"), fold(jnp.maximum, "max_val"), fold(jnp.maximum, "num_batches"),
                      fold(jnp.logical_or, "nonfinite"))


def any_over_axis(flag: jax.Array, axis_name: Hashable) -> jax.Array:
    """Logical or of ``flag`` over the mapped axis (an int32 ``pmax``: bool collectives are not portable)."""
    return jax.lax.pmax(jnp.asarray(flag).astype(jnp.int32), axis_name) > 0


def all_reduce_min_max(lo: jax.Array, hi: jax.Array, bad: jax.Array,
                       axis_name: Optional[Hashable]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The global batch ``(min, max, nonfinite flag)`` from each device's (``axis_name`` None: unchanged)."""
    if axis_name is None:
        return lo, hi, bad
    return jax.lax.pmin(lo, axis_name), jax.lax.pmax(hi, axis_name), any_over_axis(bad, axis_name)


def refuse_moving_average_merge(observer: Any) -> None:
    raise ValueError(
        f"sync_observer_state: {observer!r} keeps a moving average, and averages of per-device averages "
        "are not the average of the global batches; update it with sharded_update(observer, state, x, "
        "axis_name) inside the mapped function instead")


@dataclasses.dataclass(frozen=True, kw_only=True)
class UniformQuantizationObserverBase(ObserverBase):
    """Shared configuration and qparams formula of the uniform (affine/symmetric) observers.

    ``quant_min``/``quant_max`` hold what the user passed (``None`` = the dtype's 8-bit default);
    the effective range PyTorch would store in ``observer.quant_min`` is :attr:`qmin`/:attr:`qmax`.
    """

    dtype: QDType = quint8
    qscheme: QScheme = per_tensor_affine
    reduce_range: bool = False
    quant_min: Optional[int] = None
    quant_max: Optional[int] = None
    eps: float = FLOAT32_EPS
    is_dynamic: bool = False

    def __post_init__(self) -> None:
        me = type(self).__name__
        if self.qscheme not in QSCHEMES:
            raise ValueError(
                f"{me}: qscheme {self.qscheme!r} is not supported; use per_tensor_affine, per_tensor_symmetric, "
                "per_channel_affine, per_channel_symmetric or per_channel_affine_float_qparams"
            )
        if not isinstance(self.dtype, QDType) or self.dtype not in QUANTIZED_DTYPES:
            raise ValueError(
                f"{me}: dtype {self.dtype!r} is not a quantized dtype; use qint8, quint8, qint32, qint4 or quint4 "
                "(float16/bfloat16 targets use PlaceholderObserver)"
            )
        if (self.quant_min is None) != (self.quant_max is None):
            raise ValueError(
                f"{me}: give both quant_min and quant_max for a custom range (got quant_min={self.quant_min}, "
                f"quant_max={self.quant_max}); PyTorch silently ignores a single bound"
            )
        if self.has_customized_qrange:
            validate_qrange(self.quant_min, self.quant_max, self.dtype, where=me)  # type: ignore[arg-type]
        try:
            qmin, qmax = calculate_qmin_qmax(self.quant_min, self.quant_max, self.has_customized_qrange,
                                             self.dtype, self.reduce_range)
        except ValueError as e:
            raise ValueError(f"{me}: {e}") from None
        if not qmin < qmax:
            # e.g. quant_min=0, quant_max=1 with reduce_range: 1 // 2 == 0 leaves a single level
            raise ValueError(
                f"{me}: the quantization range [{self.quant_min}, {self.quant_max}] with reduce_range="
                f"{self.reduce_range} collapses to [{qmin}, {qmax}], a single level; widen the range "
                "or set reduce_range=False")
        if not self.eps > 0:
            raise ValueError(f"{me}: eps must be positive, got {self.eps}")
        if not self.eps >= _FLOAT32_TINY:
            raise ValueError(
                f"{me}: eps={self.eps!r} is below float32's smallest normal ({_FLOAT32_TINY:.4g}); scales that "
                "small are flushed to zero by XLA:CPU and give inf/NaN. Leave the default "
                "(float32 machine epsilon) or use a value >= 1.2e-38")

    @property
    def computes_qparams(self) -> bool:
        return True

    @property
    def has_customized_qrange(self) -> bool:
        return self.quant_min is not None and self.quant_max is not None

    @property
    def quant_range(self) -> tuple[int, int]:
        """The effective ``(quant_min, quant_max)`` after ``reduce_range`` (PyTorch's ``obs.quant_min/max``)."""
        return calculate_qmin_qmax(self.quant_min, self.quant_max, self.has_customized_qrange, self.dtype,
                                   self.reduce_range)

    @property
    def qmin(self) -> int:
        return self.quant_range[0]

    @property
    def qmax(self) -> int:
        return self.quant_range[1]

    def _reject_symmetric_reduced_quint8(self) -> None:
        if self.qscheme.is_symmetric and self.reduce_range and self.dtype == quint8:
            raise ValueError(
                f"{type(self).__name__}: cannot reduce range for symmetric quantization with quint8; "
                "use reduce_range=False or dtype=qint8"
            )

    def _calculate_qparams(self, min_val: jax.Array, max_val: jax.Array) -> tuple[jax.Array, jax.Array]:
        """PyTorch's ``UniformQuantizationObserverBase._calculate_qparams``, elementwise, in float32.

        Args:
          min_val, max_val: float32, shape ``()`` per tensor or ``(C,)`` per channel.
        Returns:
          ``scale`` float32 and ``zero_point`` int32 (float32 for ``per_channel_affine_float_qparams``),
          both of ``min_val``'s shape. Entries with ``min_val > max_val`` (never observed) get
          PyTorch's defaults, scale 1 and zero point 0, never NaN.
        """
        qmin, qmax = self.quant_range
        min_val = jnp.asarray(min_val, jnp.float32)
        max_val = jnp.asarray(max_val, jnp.float32)
        valid = min_val <= max_val
        # Keep invalid entries finite so no inf/NaN flows through the arithmetic below (true_divide
        # needs finite numerators). Divisions are true float32 divisions, as PyTorch's.
        min_val = jnp.where(valid, min_val, 0.0)
        max_val = jnp.where(valid, max_val, 0.0)
        eps = jnp.float32(self.eps)
        min_neg = jnp.minimum(min_val, 0.0)
        max_pos = jnp.maximum(max_val, 0.0)
        float_zp = self.qscheme == per_channel_affine_float_qparams
        if self.qscheme.is_symmetric:
            max_pos = jnp.maximum(-min_neg, max_pos)
            # PyTorch divides by the Python float (qmax - qmin) / 2, rounded once to float32.
            scale = jnp.maximum(true_divide(max_pos, jnp.float32(float(qmax - qmin) / 2)), eps)
            if self.dtype == quint8:
                mid = (qmin + qmax) // 2 if self.has_customized_qrange else 128
            else:
                mid = 0
            zero_point = jnp.full(min_val.shape, mid, jnp.float32)
        elif float_zp:
            scale = true_divide(max_val - min_val, jnp.float32(float(qmax - qmin)))
            scale = jnp.where(scale > eps, scale, jnp.float32(1.0))
            zero_point = true_divide(-min_val, scale)
        else:
            scale = jnp.maximum(true_divide(max_pos - min_neg, jnp.float32(float(qmax - qmin))), eps)
            zero_point = jnp.clip(qmin - jnp.round(true_divide(min_neg, scale)), qmin, qmax)
        scale = jnp.where(valid, scale, jnp.float32(1.0))
        zero_point = jnp.where(valid, zero_point, 0.0)
        if not _is_traced(scale) and not bool(jnp.all(jnp.isfinite(scale))):
            raise ValueError(f"{self!r}: the observed range [{float(jnp.min(min_val))}, {float(jnp.max(max_val))}] "
                             "is too wide for float32 (max - min overflows), so no finite scale exists; "
                             "clip or rescale the data before observing it")
        if float_zp:
            return scale, zero_point.astype(jnp.float32)
        return scale, zero_point.astype(jnp.int32)

    def _checked(self, state: State) -> None:
        # Only a concrete state can be inspected; under jit the flags stay in the state for convert.
        if not _is_traced(state):
            check_observer_state(self, state)


# ----------------------------------------------------------------------------------------------
# Shared reductions
# ----------------------------------------------------------------------------------------------


def finite_min_max(x: jax.Array, axis: Optional[Union[int, tuple[int, ...]]] = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Min and max of the finite entries of ``x`` (over all of it, or over ``axis``) and a bool
    "some entry was NaN/Inf" flag.

    NaN propagates through min/max and +-Inf shows up in them, so a plain reduction detects any
    non-finite input; only then is the masked (second) pass taken. Slices with no finite value give
    ``(inf, -inf)``, the "not observed" value.
    """
    lo = jnp.min(x, axis=axis)
    hi = jnp.max(x, axis=axis)
    bad = ~(jnp.isfinite(lo) & jnp.isfinite(hi))
    any_bad = jnp.any(bad)

    def masked(_: Any) -> tuple[jax.Array, jax.Array]:
        fin = jnp.isfinite(x)
        return (jnp.min(jnp.where(fin, x, jnp.inf), axis=axis),
                jnp.max(jnp.where(fin, x, -jnp.inf), axis=axis))

    lo, hi = jax.lax.cond(any_bad, masked, lambda _: (lo, hi), None)
    return lo, hi, any_bad


def as_float32(x: Any, where: str) -> jax.Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{where}: observers expect floating-point inputs, got {x.dtype}")
    return x.astype(jnp.float32)


def fresh_stats(shape: tuple[int, ...] = ()) -> StatsState:
    return StatsState(
        min_val=jnp.full(shape, jnp.inf, jnp.float32),
        max_val=jnp.full(shape, -jnp.inf, jnp.float32),
        num_batches=jnp.zeros((), jnp.int32),
        nonfinite=jnp.zeros((), jnp.bool_),
    )


__all__ = [
    "FLOAT32_EPS",
    "NotCalibratedError",
    "ObserverBase",
    "ObserverFactory",
    "ObserverLike",
    "StatsState",
    "UniformQuantizationObserverBase",
    "as_observer",
    "check_observer_state",
    "finite_min_max",
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunningMinMaxObserverBase(UniformQuantizationObserverBase):
    """``update``/``sharded_update``/``merge`` of the min/max observer families, written once: the
    batch's finite min/max (:meth:`batch_min_max`: per tensor, per channel or per block), reduced
    over the mapped axis when sharded, folded into the state by :meth:`fold` (running min/max here;
    moving-average subclasses override ``fold`` and refuse ``merge``)."""

    def batch_min_max(self, state: StatsState, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(min, max, nonfinite)`` of the finite entries of float32 ``x``, shaped as the state's."""
        raise NotImplementedError

    def fold(self, state: StatsState, lo: jax.Array, hi: jax.Array, bad: jax.Array) -> StatsState:
        """Running min/max: the batch's min/max folded in with ``minimum``/``maximum``."""
        return StatsState(jnp.minimum(lo, state.min_val), jnp.maximum(hi, state.max_val),
                          state.num_batches + 1, state.nonfinite | bad)

    def update(self, state: StatsState, x: jax.Array) -> StatsState:
        """Fold the finite min/max of ``x`` (float, any dtype: converted to float32 as PyTorch does)
        into ``state``; NaN/Inf entries are left out and flagged."""
        return self.sharded_update(state, x, None)

    def sharded_update(self, state: StatsState, x: jax.Array, axis_name: Optional[Hashable]) -> StatsState:
        """As :meth:`update` on the whole batch split over ``axis_name``: the global min/max
        (``pmin``/``pmax``) go through this observer's own ``fold`` (so moving averages see the
        global batch's min/max)."""
        x = as_float32(x, type(self).__name__)
        if x.size == 0:
            return state
        return self.fold(state, *all_reduce_min_max(*self.batch_min_max(state, x), axis_name))

    def merge(self, *states: StatsState) -> StatsState:
        """Exact: the min of the per-device mins and the max of the maxes."""
        return merge_stats_states(*states)

