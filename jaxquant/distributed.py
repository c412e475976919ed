"""Quantization across devices: observers over sharded batches, int8 weights sharded by output channel.

Three ways data gets split, and what each needs:

* ``jax.jit`` with ``NamedSharding`` inputs (data parallel, the simple way): nothing. Observers reduce
  over the *global* array (XLA inserts the cross-device min/max/histogram reductions), so calibration
  and QAT give the single-device result. Nothing in this module is needed for that path.
* ``jax.shard_map`` / ``jax.pmap`` (each device runs the program on its own shard): an observer's
  plain ``update`` would only see the local shard. :func:`sharded_update` folds a batch split over a
  named axis into the state exactly as ``update`` would fold the whole batch (global min/max via
  ``pmin``/``pmax``; histograms binned into the global range and summed with ``psum``, which is exact
  because the bin counts are small integers). :class:`AxisSyncedObserver` and
  :func:`with_axis_name` put that into a prepared model, and :func:`sync_observer_state` merges
  states that were updated per shard.
* Tensor parallel int8 layers: :func:`shard_qtensor` places int8 data and per-channel scales on a
  mesh, sharded together along the channel axis; :func:`column_parallel_linear` /
  :func:`row_parallel_linear` run a converted ``jaxquant.nn.quantized.Linear`` with its weight split
  along output / input features. Both give bit-identical results to one device: every output column
  runs the same float32 epilogue, and row-parallel partial accumulators are summed in int32 (exact)
  before requantization.

See ``docs/distributed.md``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Hashable, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxquant.kernels.linear import pack_linear, quantized_linear
from jaxquant.module_paths import copy_model, named_modules
from jaxquant.nn.observer_module import ObserverModule
from jaxquant.nn.quantized.linear import Linear
from jaxquant.observers.base import ObserverBase, StatsState, as_float32, finite_min_max
from jaxquant.observers.histogram import HistogramObserver, HistogramState, histogram_update
from jaxquant.observers.minmax import MinMaxObserver
from jaxquant.observers.per_channel import PerChannelMinMaxObserver
from jaxquant.observers.simple import CountState
from jaxquant.qtensor import QTensor

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


def _por(flag: jax.Array, axis_name: AxisName) -> jax.Array:
    # collectives on bool are not supported everywhere; int32 max is a logical or
    return lax.pmax(jnp.asarray(flag).astype(jnp.int32), axis_name) > 0


def _unwrap(observer: Any) -> Any:
    return observer.observer if isinstance(observer, AxisSyncedObserver) else observer


def _unsupported(observer: Any, what: str) -> TypeError:
    return TypeError(
        f"{what}: {observer!r} has no cross-device rule. Supported: MinMaxObserver, PerChannelMinMaxObserver "
        "(and their moving-average variants), HistogramObserver and the counting observers (Placeholder, "
        "Noop, FixedQParams). For others, all-gather the batch (jax.lax.all_gather(x, axis_name, tiled=True)) "
        "and call observer.update on the gathered array, or use jax.jit with NamedSharding instead of shard_map"
    )


# ----------------------------------------------------------------------------------------------
# observers over a named axis
# ----------------------------------------------------------------------------------------------


def _min_max_proxy(observer: Any, lo: jax.Array, hi: jax.Array, ndim: int) -> jax.Array:
    """A tiny array whose (per-channel) min and max are ``lo`` and ``hi``, shaped so that the
    observer's own ``update`` accepts it; feeding it reuses the observer's exact state transition
    (running min/max or moving average) with the global batch statistics."""
    if not isinstance(observer, PerChannelMinMaxObserver):
        return jnp.stack([lo, hi])
    a = observer.ch_axis % ndim
    b = 0 if a != 0 else 1
    p = jnp.stack([lo, hi], axis=-1).reshape((lo.shape[0], 2) + (1,) * (ndim - 2))
    return jnp.moveaxis(p, (0, 1), (a, b))


def sharded_update(observer: ObserverBase, state: Any, x: jax.Array, axis_name: AxisName) -> Any:
    """``observer.update(state, concat_over_axis(x))`` computed from each device's shard ``x``.

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
        the split one, and ``x.ndim >= 2``).
      axis_name: the name of the mapped axis.
    Returns:
      The new state (same pytree structure and dtypes as ``state``).
    """
    observer = _unwrap(observer)
    if isinstance(observer, HistogramObserver):
        return histogram_update(observer, state, x, axis_name)
    if isinstance(state, CountState):
        new = observer.update(state, x)
        return new._replace(nonfinite=state.nonfinite | _por(new.nonfinite, axis_name))
    if not isinstance(observer, (MinMaxObserver, PerChannelMinMaxObserver)):
        raise _unsupported(observer, "sharded_update")
    x = as_float32(x, type(observer).__name__)
    if x.size == 0:
        return state
    if isinstance(observer, PerChannelMinMaxObserver):
        if x.ndim < 2:
            raise ValueError(f"sharded_update: {type(observer).__name__} needs an input with at least 2 dims "
                             f"(channels and data), got shape {x.shape}")
        c = x.shape[observer.ch_axis]
        if c != state.min_val.shape[-1]:
            raise ValueError(f"sharded_update: input has {c} channels on axis {observer.ch_axis} (shape {x.shape}), "
                             f"the state has {state.min_val.shape[-1]}; re-run init with this shape")
        lo, hi, bad = finite_min_max(jnp.moveaxis(x, observer.ch_axis, 0).reshape(c, -1), axis=1)
    else:
        lo, hi, bad = finite_min_max(x)
    lo, hi = lax.pmin(lo, axis_name), lax.pmax(hi, axis_name)
    new = observer.update(state, _min_max_proxy(observer, lo, hi, x.ndim))
    # the proxy of a channel that saw no finite value holds +-inf and would be flagged by update
    return new._replace(nonfinite=state.nonfinite | _por(bad, axis_name))


def sync_observer_state(observer: ObserverBase, state: Any, axis_name: AxisName) -> Any:
    """Merge observer states that each device updated with its own shards (inside shard_map/pmap).

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
    """An observer whose ``update`` is :func:`sharded_update` over ``axis_name``.

    Everything else (``init``, ``calculate_qparams``, ``dtype``, ``qscheme``, ...) is the inner
    observer's, so ``convert`` and ``check_observer_state`` treat it like the observer it wraps. Its
    ``update`` only works inside ``shard_map``/``pmap`` over ``axis_name``; take it back out with
    :func:`without_axis_name` before calibrating on one device.
    """

    observer: Any
    axis_name: AxisName

    def __post_init__(self) -> None:
        inner = self.observer
        if isinstance(inner, AxisSyncedObserver):
            raise TypeError("AxisSyncedObserver: the observer is already wrapped")
        supported = (MinMaxObserver, PerChannelMinMaxObserver, HistogramObserver)
        if not isinstance(inner, supported) and not isinstance(inner.init(), CountState):
            raise _unsupported(inner, "AxisSyncedObserver")

    def init(self, example_or_shape: Any = None) -> Any:
        return self.observer.init(example_or_shape)

    def update(self, state: Any, x: jax.Array) -> Any:
        return sharded_update(self.observer, state, x, self.axis_name)

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


# ----------------------------------------------------------------------------------------------
# sharded int8 weights
# ----------------------------------------------------------------------------------------------


def shard_qtensor(q: QTensor, mesh: Mesh, axis_name: AxisName, axis: Optional[int] = None) -> QTensor:
    """Place a QTensor on ``mesh`` with its int data split along ``axis`` over mesh axis ``axis_name``.

    ``axis`` defaults to the QTensor's channel axis (output channels of a per-channel weight, the last
    axis in flax layout). Per-channel scales and zero points are split the same way when ``axis`` is
    the channel axis, so each device holds its channels' integers together with their scales;
    otherwise (per tensor, or splitting another axis) they are replicated.

    Args:
      q: a QTensor; ``q.shape[axis]`` must be divisible by the size of mesh axis ``axis_name``.
    Returns:
      The same QTensor (values unchanged) whose leaves are ``jax.Array``s with ``NamedSharding``.
    """
    if axis is None:
        if q.axis is None:
            raise ValueError(f"shard_qtensor: {q!r} is per tensor; pass axis= (e.g. axis=-1 for output "
                             "features of a flax kernel)")
        axis = q.axis
    axis = axis % q.ndim
    n = mesh.shape[axis_name]
    if q.shape[axis] % n:
        raise ValueError(f"shard_qtensor: axis {axis} of {q!r} has {q.shape[axis]} entries, not divisible by the "
                         f"{n} devices of mesh axis {axis_name!r}; pad the layer or use a mesh axis that divides it")
    spec = [None] * q.ndim
    spec[axis] = axis_name
    data = jax.device_put(q.int_data, NamedSharding(mesh, P(*spec)))
    qp_spec = P(axis_name) if q.axis == axis else P()
    scale = jax.device_put(q.scale, NamedSharding(mesh, qp_spec))
    zero_point = jax.device_put(q.zero_point, NamedSharding(mesh, qp_spec))
    return QTensor(data, scale, zero_point, q.dtype, q.qscheme, q.axis)


def _linear_parts(linear: Any) -> tuple[QTensor, Optional[jax.Array], jax.Array, jax.Array]:
    if not isinstance(linear, Linear):
        raise TypeError(f"expected a converted jaxquant.nn.quantized.Linear, got {type(linear).__name__}; "
                        "convert the model first (jaxquant.convert)")
    w = linear.weight()
    scale = jnp.broadcast_to(w.scale, (linear.out_features,))
    zp = jnp.broadcast_to(w.zero_point, (linear.out_features,))
    return (QTensor(w.int_data, scale, zp, w.dtype, w.qscheme, 1), linear.bias.get_value(),
            linear.out_scale.get_value(), linear.out_zero_point.get_value())


def _check_divisible(size: int, mesh: Mesh, axis_name: AxisName, what: str) -> None:
    n = mesh.shape[axis_name]
    if size % n:
        raise ValueError(f"{what} ({size}) is not divisible by the {n} devices of mesh axis {axis_name!r}")


def _placed(mesh: Mesh, specs: tuple, args: tuple) -> tuple:
    # shard_map wants its inputs already laid out as in_specs say; device_put is a no-op for arrays
    # that are (shard_qtensor), and a sharding constraint under jit
    def put(spec: Any, arg: Any) -> Any:
        if arg is None:
            return None
        return jax.tree.map(lambda s, a: jax.device_put(a, NamedSharding(mesh, s)), spec, arg,
                            is_leaf=lambda v: isinstance(v, P))

    return tuple(put(s, a) for s, a in zip(specs, args))


def column_parallel_linear(x: QTensor, linear: Any, mesh: Mesh, axis_name: AxisName) -> QTensor:
    """A converted int8 ``Linear`` with its output features split over mesh axis ``axis_name``.

    Each device holds ``out_features / n`` columns of the int8 weight with their scales, zero points
    and bias (see :func:`shard_qtensor`), multiplies the full (replicated) input and requantizes its
    columns; the output is sharded along its last axis. Equal, bit for bit, to ``linear(x)`` on one
    device.

    Args:
      x: per-tensor QTensor ``(..., in_features)`` (uint8 or int8).
      linear: a ``jaxquant.nn.quantized.Linear`` (from ``convert``).
    Returns:
      QTensor ``(..., out_features)`` of ``linear.out_dtype``, data sharded as ``P(..., axis_name)``.
    """
    w, bias, out_scale, out_zp = _linear_parts(linear)
    _check_divisible(linear.out_features, mesh, axis_name, f"out_features of {linear.name or 'Linear'}")
    if x.shape[-1] != linear.in_features:
        raise ValueError(f"column_parallel_linear: input has {x.shape[-1]} features, "
                         f"'{linear.name}' expects {linear.in_features}")
    lead = x.shape[:-1]
    x2 = QTensor(x.int_data.reshape(-1, linear.in_features), x.scale, x.zero_point, x.dtype, x.qscheme, None)
    col = P(axis_name)
    in_specs = (P(), P(None, axis_name), col, col, None if bias is None else col, P(), P())

    def body(x2: QTensor, w_data, w_scale, w_zp, bias, out_scale, out_zp):
        return quantized_linear(x2, pack_linear(w_data, w_scale, w_zp, bias), out_scale, out_zp,
                                out_dtype=linear.out_dtype, relu=linear.relu).int_data

    args = _placed(mesh, in_specs, (x2, w.int_data, w.scale, w.zero_point, bias, out_scale, out_zp))
    y = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=P(None, axis_name))(*args)
    return QTensor(y.reshape(*lead, linear.out_features), out_scale, out_zp, linear.out_dtype)


def row_parallel_linear(x: QTensor, linear: Any, mesh: Mesh, axis_name: AxisName) -> QTensor:
    """A converted int8 ``Linear`` with its input features (the contraction) split over ``axis_name``.

    Each device multiplies its slice of the input features by its rows of the int8 weight; the int32
    partial accumulators (zero-point terms included, they are linear in the split) are summed with
    ``psum`` (exact in integers) and the requantization runs on the full sum. Equal, bit for bit, to
    ``linear(x)`` on one device. Pair it after :func:`column_parallel_linear` for a Megatron-style MLP.

    Args:
      x: per-tensor QTensor ``(..., in_features)``; its last axis may already be sharded over ``axis_name``.
      linear: a ``jaxquant.nn.quantized.Linear``.
    Returns:
      QTensor ``(..., out_features)``, replicated.
    """
    w, bias, out_scale, out_zp = _linear_parts(linear)
    _check_divisible(linear.in_features, mesh, axis_name, f"in_features of {linear.name or 'Linear'}")
    if x.shape[-1] != linear.in_features:
        raise ValueError(f"row_parallel_linear: input has {x.shape[-1]} features, "
                         f"'{linear.name}' expects {linear.in_features}")
    lead = x.shape[:-1]
    x2 = QTensor(x.int_data.reshape(-1, linear.in_features), x.scale, x.zero_point, x.dtype, x.qscheme, None)
    x_spec = QTensor(P(None, axis_name), P(), P(), x.dtype, x.qscheme, None)
    in_specs = (x_spec, P(axis_name, None), P(), P(), None if bias is None else P(), P(), P())

    def body(x2: QTensor, w_data, w_scale, w_zp, bias, out_scale, out_zp):
        # the int32 partial accumulators (zero-point terms included) are summed before the epilogue
        return quantized_linear(x2, pack_linear(w_data, w_scale, w_zp, bias), out_scale, out_zp,
                                out_dtype=linear.out_dtype, relu=linear.relu,
                                reduce_accumulator=lambda acc: lax.psum(acc, axis_name)).int_data

    args = _placed(mesh, in_specs, (x2, w.int_data, w.scale, w.zero_point, bias, out_scale, out_zp))
    y = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=P())(*args)
    return QTensor(y.reshape(*lead, linear.out_features), out_scale, out_zp, linear.out_dtype)
