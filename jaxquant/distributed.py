"""Quantization across devices: observers over sharded batches, int8 weights sharded by output channel.

Three ways data gets split, and what each needs:

* ``jax.jit`` with ``NamedSharding`` inputs (data parallel, the simple way): nothing. Observers reduce
  over the *global* array (XLA inserts the cross-device min/max/histogram reductions), so calibration
  and QAT give the single-device result. Nothing in this module is needed for that path.
* ``jax.shard_map`` / ``jax.pmap`` (each device runs the program on its own shard): an observer's
  plain ``update`` would only see the local shard. Each observer says how it syncs: its
  ``sharded_update(state, x, axis_name)`` folds a batch split over a named axis into the state exactly
  as ``update`` would fold the whole batch, and its ``merge(*states)`` merges states updated per
  shard. :func:`sharded_update` and :func:`sync_observer_state` call them with a clear error for
  observers that have no rule; :class:`AxisSyncedObserver` and :func:`with_axis_name` put
  ``sharded_update`` into a prepared model.
* Tensor parallel int8 layers: :func:`shard_qtensor` (in :mod:`jaxquant.qtensor`) places int8 data and
  per-channel scales on a mesh; :func:`column_parallel_linear` / :func:`row_parallel_linear` run a
  converted ``jaxquant.nn.quantized.Linear`` through :mod:`jaxquant.kernels.linear_parallel`,
  bit-identical to one device.

See ``docs/distributed.md``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Hashable

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh

from jaxquant.kernels.linear_parallel import column_parallel_quantized_linear, row_parallel_quantized_linear
from jaxquant.module_paths import copy_model, named_modules
from jaxquant.nn.observer_module import ObserverModule
from jaxquant.nn.quantized.linear import Linear
from jaxquant.observers.base import ObserverBase
from jaxquant.qtensor import QTensor, shard_qtensor

__all__ = [
    "AxisSyncedObserver",
    "column_parallel_linear",
    "row_parallel_linear",
    "shard_qtensor",
    "sharded_update",
    "sync_observer_state",
    "with_axis_name",
    "without_axis_name",
]

AxisName = Hashable


def _unwrap(observer: Any) -> Any:
    return observer.observer if isinstance(observer, AxisSyncedObserver) else observer


def _unsupported(observer: Any, what: str) -> TypeError:
    return TypeError(
        f"{what}: {observer!r} has no cross-device rule. Supported: MinMaxObserver, PerChannelMinMaxObserver "
        "(and their moving-average variants), HistogramObserver and the counting observers (Placeholder, "
        "Noop, FixedQParams). For others, all-gather the batch (jax.lax.all_gather(x, axis_name, tiled=True)) "
        "and call observer.update on the gathered array, or use jax.jit with NamedSharding instead of shard_map"
    )


def _has_sharded_update(observer: Any) -> bool:
    rule = getattr(type(observer), "sharded_update", None)
    return rule is not None and rule is not ObserverBase.sharded_update


def sharded_update(observer: ObserverBase, state: Any, x: jax.Array, axis_name: AxisName) -> Any:
    """``observer.update(state, concat_over_axis(x))`` computed from each device's shard ``x``:
    ``observer.sharded_update(state, x, axis_name)``, with a clear error for observers without one.

    Call it inside ``jax.shard_map`` or ``jax.pmap`` (``axis_name`` is the mapped axis the batch is
    split over). The result is replicated (identical on every device) and equals, bit for bit, the
    state one device gets from the whole batch: min/max reduce with ``pmin``/``pmax`` before the
    observer's own update rule runs (so moving averages see the global batch min/max), histograms are
    binned into the global range on each device and summed with ``psum``.

    Args:
      observer: a MinMax/PerChannelMinMax/MovingAverage*/Histogram or counting observer
        (or an :class:`AxisSyncedObserver`, whose inner observer is used).
      state: the observer's state, replicated over ``axis_name``.
      x: this device's shard, float, any shape (per-channel observers: the channel axis must not be
        the split one).
      axis_name: the name of the mapped axis.
    Returns:
      The new state (same pytree structure and dtypes as ``state``).
    Raises:
      TypeError: the observer has no ``sharded_update`` rule.
    """
    observer = _unwrap(observer)
    if not _has_sharded_update(observer):
        raise _unsupported(observer, "sharded_update")
    return observer.sharded_update(state, x, axis_name)


def sync_observer_state(observer: ObserverBase, state: Any, axis_name: AxisName) -> Any:
    """Merge observer states that each device updated with its own shards (inside shard_map/pmap):
    every device's state is gathered and the observer's own ``merge`` runs on them in device order.

    Exact for running min/max (``MinMaxObserver``, ``PerChannelMinMaxObserver``: the min of the
    per-device mins is the global min) and counting observers. For ``HistogramObserver`` each
    device's histogram is re-binned into the global range (``HistogramObserver.merge``, PyTorch's
    ``_combine_histograms`` rule) and the results summed: exact when every device's range already is the global range,
    otherwise the same approximation PyTorch makes when a range grows. Moving-average observers
    cannot be merged after the fact (an average of per-device averages is not the average of the
    global min/max): use :func:`sharded_update` for them.

    ``num_batches`` is taken as the largest per-device count (data-parallel steps, not shards).
    Returns the merged state, replicated over ``axis_name``.
    """
    observer = _unwrap(observer)
    # every device's (small) state, in device order: each computes the same merge, so the result is
    # replicated and deterministic
    n = lax.psum(1, axis_name)
    gathered = jax.tree_util.tree_map(lambda a: _gather(a, axis_name), state)
    states = [jax.tree_util.tree_map(lambda a: a[i], gathered) for i in range(n)]
    try:
        return observer.merge(*states)
    except NotImplementedError:
        raise _unsupported(observer, "sync_observer_state") from None


def _gather(a: jax.Array, axis_name: AxisName) -> jax.Array:
    """all_gather whose result is typed as replicated: each device writes its slot, psum adds them
    (exact: every other slot is zero; inf stays inf since only one term per slot is non-zero)."""
    if a.dtype == jnp.bool_:  # collectives on bool are not supported everywhere
        return _gather(a.astype(jnp.int32), axis_name) > 0
    n = lax.psum(1, axis_name)
    slot = jnp.arange(n) == lax.axis_index(axis_name)
    placed = jnp.where(slot.reshape((n,) + (1,) * a.ndim), a[None], jnp.zeros_like(a)[None])
    return lax.psum(placed, axis_name)


@dataclasses.dataclass(frozen=True)
class AxisSyncedObserver:
    """An observer whose ``update`` is its ``sharded_update`` over ``axis_name``.

    Everything else (``init``, ``calculate_qparams``, ``dtype``, ``qscheme``, ...) is the inner
    observer's, so ``convert`` and ``check_observer_state`` treat it like the observer it wraps. Its
    ``update`` only works inside ``shard_map``/``pmap`` over ``axis_name``; take it back out with
    :func:`without_axis_name` before calibrating on one device.
    """

    observer: Any
    axis_name: AxisName

    def __post_init__(self) -> None:
        if isinstance(self.observer, AxisSyncedObserver):
            raise TypeError("AxisSyncedObserver: the observer is already wrapped")
        if not _has_sharded_update(self.observer):
            raise _unsupported(self.observer, "AxisSyncedObserver")

    def init(self, example_or_shape: Any = None) -> Any:
        return self.observer.init(example_or_shape)

    def update(self, state: Any, x: jax.Array) -> Any:
        return self.observer.sharded_update(state, x, self.axis_name)

    def calculate_qparams(self, state: Any) -> tuple[jax.Array, jax.Array]:
        return self.observer.calculate_qparams(state)

    def __getattr__(self, name: str) -> Any:
        if name in ("observer", "axis_name") or name.startswith("__"):
            raise AttributeError(name)  # copying/unpickling before the fields exist
        return getattr(self.observer, name)


def _swap_observers(model: Any, fn) -> Any:
    result = copy_model(model)
    found = False
    for _, module in named_modules(result):
        if isinstance(module, ObserverModule):
            module.observer = fn(module.observer)
            found = True
    if not found:
        raise ValueError("the model has no observers; call jaxquant.prepare(model, qconfig) first")
    return result


def with_axis_name(model: Any, axis_name: AxisName) -> Any:
    """A copy of a prepared model whose observers reduce over ``axis_name`` (see
    :class:`AxisSyncedObserver`); call the copy inside ``shard_map``/``pmap`` with the batch split over
    that axis. Observer state is unchanged and carries over. The input model is not modified."""
    return _swap_observers(model, lambda o: AxisSyncedObserver(_unwrap(o), axis_name))


def without_axis_name(model: Any) -> Any:
    """A copy of ``model`` with every :class:`AxisSyncedObserver` replaced by the observer it wraps."""
    return _swap_observers(model, _unwrap)


def _linear_args(linear: Any) -> tuple:
    if not isinstance(linear, Linear):
        raise TypeError(f"expected a converted jaxquant.nn.quantized.Linear, got {type(linear).__name__}; "
                        "convert the model first (jaxquant.convert)")
    return (linear.weight(), linear.bias.get_value(), linear.out_scale.get_value(),
            linear.out_zero_point.get_value())


def column_parallel_linear(x: QTensor, linear: Any, mesh: Mesh, axis_name: AxisName) -> QTensor:
    """A converted int8 ``Linear`` with its output features split over mesh axis ``axis_name``
    (:func:`~jaxquant.kernels.linear_parallel.column_parallel_quantized_linear`).

    Each device holds ``out_features / n`` columns of the int8 weight with their scales, zero points
    and bias, multiplies the full (replicated) input and requantizes its columns. Equal, bit for bit,
    to ``linear(x)`` on one device.

    Args:
      x: per-tensor QTensor ``(..., in_features)`` (uint8 or int8).
      linear: a ``jaxquant.nn.quantized.Linear`` (from ``convert``).
    Returns:
      QTensor ``(..., out_features)`` of ``linear.out_dtype``, data sharded as ``P(..., axis_name)``.
    """
    return column_parallel_quantized_linear(x, *_linear_args(linear), mesh, axis_name, out_dtype=linear.out_dtype,
                                            relu=linear.relu, name=linear.name or "Linear")


def row_parallel_linear(x: QTensor, linear: Any, mesh: Mesh, axis_name: AxisName) -> QTensor:
    """A converted int8 ``Linear`` with its input features (the contraction) split over ``axis_name``
    (:func:`~jaxquant.kernels.linear_parallel.row_parallel_quantized_linear`): the int32 partial
    accumulators are summed with ``psum`` (exact) and the requantization runs on the full sum. Equal,
    bit for bit, to ``linear(x)`` on one device. Pair it after :func:`column_parallel_linear` for a
    Megatron-style MLP.

    Args:
      x: per-tensor QTensor ``(..., in_features)``; its last axis may already be sharded over ``axis_name``.
      linear: a ``jaxquant.nn.quantized.Linear``.
    Returns:
      QTensor ``(..., out_features)``, replicated.
    """
    return row_parallel_quantized_linear(x, *_linear_args(linear), mesh, axis_name, out_dtype=linear.out_dtype,
                                         relu=linear.relu, name=linear.name or "Linear")
