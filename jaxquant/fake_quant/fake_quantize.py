"""FakeQuantize configs: an observer plus fake quantization, as pure ``init``/``apply`` over a state pytree.

PyTorch's ``FakeQuantize`` modules keep their observer, ``scale``, ``zero_point`` and the two enable
flags in buffers and mutate them in ``forward``. Here the config object is frozen and hashable (it
can be a static argument of ``jax.jit``) and everything that changes lives in a state pytree::

    fq = FakeQuantize(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255)
    state = fq.init(x.shape)
    y, state = fq.apply(state, x)          # observe, recompute qparams, fake-quantize
    state = disable_observer(state)        # flags are int32 arrays: toggling never retraces

``apply`` branches on the flags with ``lax.cond``, so a jitted step is traced once whatever the
flags are. The observer sees ``stop_gradient(x)``; the input gradient is straight-through.
"""
from __future__ import annotations

import abc
import dataclasses
import inspect
from functools import partial
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from jax import lax

from jaxquant.choose_qparams import choose_qparams_from_min_max
from jaxquant.dtypes import (
    QDType,
    per_channel_affine,
    per_channel_affine_float_qparams,
    per_channel_symmetric,
    per_tensor_affine,
    per_tensor_symmetric,
    quint8,
)
from jaxquant.fake_quant.functional import _fq_per_channel, _fq_per_tensor
from jaxquant.observers.base import ObserverFactory, StatsState, finite_min_max
from jaxquant.observers.minmax import MovingAverageMinMaxObserver, moving_average
from jaxquant.observers.per_channel import MovingAveragePerChannelMinMaxObserver
from jaxquant.observers.protocols import Observer
from jaxquant.observers.simple import FixedQParamsObserver

# ---------------------------------------------------------------------------------------------
# factories (``with_args``), hashable so that QConfigs can be compared and used as static args


def with_args(cls: Any, **kwargs: Any) -> ObserverFactory:
    """A hashable factory for ``cls`` with ``kwargs`` bound (``cls.with_args(**kwargs)``, PyTorch's
    ``_with_args``); the same factory type the observers use, so QConfigs compare by value."""
    return ObserverFactory(cls, tuple(sorted(kwargs.items())))


def factory_class(factory: Any) -> Any:
    """The class a factory (or a class) builds, following nested ``with_args`` wrappers."""
    while True:
        func = getattr(factory, "cls", None) if isinstance(factory, ObserverFactory) else None
        if func is None:
            func = getattr(factory, "func", None)
        if func is None:
            func = getattr(getattr(factory, "p", None), "func", None)
        if func is None:
            return factory
        factory = func


def factory_keywords(factory: Any) -> dict[str, Any]:
    """The keyword arguments bound in a factory (empty for a plain class)."""
    if isinstance(factory, ObserverFactory):
        return dict(factory.kwargs)
    kw = getattr(factory, "keywords", None)
    if kw is None:
        kw = getattr(getattr(factory, "p", None), "keywords", None)
    return dict(kw or {})


def _accepts(cls: Any, name: str) -> bool:
    cls = factory_class(cls)
    if dataclasses.is_dataclass(cls) and name in {f.name for f in dataclasses.fields(cls)}:
        return True
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


def instantiate_observer(observer: Any, where: str, **kwargs: Any) -> Any:
    """Build an observer from a class or factory; refuse an already-built instance with a clear message."""
    if not callable(observer) or (not isinstance(observer, type) and isinstance(observer, Observer)):
        raise TypeError(f"{where}: observer must be an observer class or a factory from .with_args(...), "
                        f"got the instance {observer!r}; pass {type(observer).__name__}.with_args(...) instead")
    return observer(**kwargs)


# ---------------------------------------------------------------------------------------------
# state


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FakeQuantizeState:
    """State of a :class:`FakeQuantize`: observer state, current qparams and the two enable flags.

    ``scale`` float32 ``()`` per tensor or ``(C,)`` per channel; ``zero_point`` int32 of the same
    shape (float32 for ``per_channel_affine_float_qparams``); ``observer_enabled`` and
    ``fake_quant_enabled`` int32 ``()`` (1 on, 0 off).
    """

    observer: Any
    scale: jax.Array
    zero_point: jax.Array
    observer_enabled: jax.Array
    fake_quant_enabled: jax.Array


def _flag(on: bool | int | jax.Array) -> jax.Array:
    return jnp.asarray(on, jnp.int32).reshape(())


def _set_flag(state: Any, field_for: Callable[[Any], Optional[str]], enabled: Any) -> Any:
    def one(node: Any) -> Any:
        name = field_for(node)
        return dataclasses.replace(node, **{name: _flag(enabled)}) if name else node

    is_state = lambda n: field_for(n) is not None  # noqa: E731
    return jax.tree_util.tree_map(one, state, is_leaf=is_state)


def _observer_flag(node: Any) -> Optional[str]:
    if not dataclasses.is_dataclass(node) or isinstance(node, type):
        return None
    names = {f.name for f in dataclasses.fields(node)}
    for name in ("observer_enabled", "static_enabled"):
        if name in names:
            return name
    return None


def _fake_quant_flag(node: Any) -> Optional[str]:
    if dataclasses.is_dataclass(node) and not isinstance(node, type) and "fake_quant_enabled" in {
        f.name for f in dataclasses.fields(node)
    }:
        return "fake_quant_enabled"
    return None


def enable_observer(state: Any, enabled: bool | jax.Array = True) -> Any:
    """Turn statistics collection on in every fake-quantize state inside ``state`` (any pytree).

    Returns a new pytree; the flag is data, so a jitted step is not retraced.
    """
    return _set_flag(state, _observer_flag, enabled)


def disable_observer(state: Any) -> Any:
    """Turn statistics collection off in every fake-quantize state inside ``state``."""
    return _set_flag(state, _observer_flag, False)


def enable_fake_quant(state: Any, enabled: bool | jax.Array = True) -> Any:
    """Turn fake quantization on in every fake-quantize state inside ``state``."""
    return _set_flag(state, _fake_quant_flag, enabled)


def disable_fake_quant(state: Any) -> Any:
    """Turn fake quantization off (outputs equal inputs) in every fake-quantize state inside ``state``."""
    return _set_flag(state, _fake_quant_flag, False)


# ---------------------------------------------------------------------------------------------
# configs


@partial(jax.jit, static_argnums=0)
def _jitted_apply(config: Any, state: Any, x: jax.Array) -> tuple[jax.Array, Any]:
    # Configs are hashable, so eager calls hit one compiled program per (config, shapes); inside an
    # outer jit this nests and is inlined.
    return config._apply(state, x)


class FakeQuantizeBase(abc.ABC):
    """Interface of every fake-quantize config: ``init``, ``apply``, ``calculate_qparams``, ``with_args``."""

    @abc.abstractmethod
    def init(self, example_or_shape: Any = None) -> Any:
        """A fresh state (observers empty, both flags on)."""

    def apply(self, state: Any, x: jax.Array) -> tuple[jax.Array, Any]:
        """``(y, new_state)``: observe ``x`` if enabled, then fake-quantize it if enabled.

        Args:
          state: from :meth:`init` (or a previous ``apply``).
          x: float array (NHWC activations, or weights in the layout the observer expects).
        Returns:
          ``y`` like ``x`` (straight-through gradient) and the new state. Jitted per config.
        """
        return _jitted_apply(self, state, x)

    @abc.abstractmethod
    def _apply(self, state: Any, x: jax.Array) -> tuple[jax.Array, Any]:
        """The traced body of :meth:`apply`."""

    @abc.abstractmethod
    def calculate_qparams(self, state: Any) -> tuple[jax.Array, jax.Array]:
        """``(scale, zero_point)`` from the state."""

    @classmethod
    def with_args(cls, **kwargs: Any) -> ObserverFactory:
        return with_args(cls, **kwargs)

    # attributes PyTorch exposes on the module, read off the observer (``activation_post_process``)
    @property
    def dtype(self) -> Any:
        return self.activation_post_process.dtype  # type: ignore[attr-defined]

    @property
    def qscheme(self) -> Any:
        return getattr(self.activation_post_process, "qscheme", per_tensor_affine)  # type: ignore[attr-defined]

    @property
    def ch_axis(self) -> int:
        return getattr(self.activation_post_process, "ch_axis", -1)  # type: ignore[attr-defined]


def check_range_fits_dtype(quant_min: int, quant_max: int, dtype: Any, where: str) -> None:
    """ValueError naming ``where`` unless ``[quant_min, quant_max]`` lies inside a QDType's range."""
    if isinstance(dtype, QDType):
        if quant_min < dtype.min:
            raise ValueError(f"{where}: quant_min {quant_min} is out of bound for {dtype!r} (min {dtype.min})")
        if quant_max > dtype.max:
            raise ValueError(f"{where}: quant_max {quant_max} is out of bound for {dtype!r} (max {dtype.max})")


_PER_TENSOR = (per_tensor_affine, per_tensor_symmetric)
_PER_CHANNEL = (per_channel_affine, per_channel_symmetric, per_channel_affine_float_qparams)


def _channels(example_or_shape: Any, axis: int, where: str) -> int:
    if example_or_shape is None:
        raise ValueError(f"{where}: a per-channel fake quantize needs example_or_shape (an array or its shape) "
                         "to size its scales and zero points; call init(x) or init(x.shape)")
    shape = tuple(getattr(example_or_shape, "shape", example_or_shape))
    if not -len(shape) <= axis < len(shape):
        raise ValueError(f"{where}: ch_axis {axis} is out of range for shape {shape}")
    return int(shape[axis])


@dataclasses.dataclass(frozen=True, init=False)
class FakeQuantize(FakeQuantizeBase):
    """Observe, then quantize and dequantize (``torch.ao.quantization.FakeQuantize``).

    ``FakeQuantize(observer=MovingAverageMinMaxObserver, quant_min=None, quant_max=None,
    is_dynamic=False, **observer_kwargs)``: the observer is built from the class or factory with
    ``observer_kwargs`` (and ``quant_min``/``quant_max`` when both are given), as in PyTorch. On each
    ``apply`` with the observer enabled the qparams are the observer's ``calculate_qparams``.
    """

    activation_post_process: Any
    is_dynamic: bool

    def __init__(self, observer: Any = None, quant_min: Optional[int] = None, quant_max: Optional[int] = None,
                 is_dynamic: bool = False, **observer_kwargs: Any):
        name = type(self).__name__
        if observer is None:
            observer = MovingAverageMinMaxObserver
        if quant_min is not None and quant_max is not None:
            if quant_min > quant_max:
                raise ValueError(f"{name}: quant_min ({quant_min}) must be less than or equal to quant_max ({quant_max})")
            check_range_fits_dtype(quant_min, quant_max, observer_kwargs.get(
                "dtype", factory_keywords(observer).get("dtype", quint8)), name)
            observer_kwargs.update(quant_min=quant_min, quant_max=quant_max)
        if is_dynamic or _accepts(observer, "is_dynamic"):
            observer_kwargs["is_dynamic"] = is_dynamic
        obs = instantiate_observer(observer, name, **observer_kwargs)
        object.__setattr__(self, "activation_post_process", obs)
        object.__setattr__(self, "is_dynamic", bool(getattr(obs, "is_dynamic", is_dynamic)))
        if self.qscheme not in _PER_TENSOR + _PER_CHANNEL:
            raise ValueError(f"{name}: only per-channel and per-tensor quantization are supported in fake quantize, "
                             f"got qscheme {self.qscheme!r}")

    # attributes PyTorch exposes on the module
    @property
    def quant_range(self) -> tuple[int, int]:
        """The effective integer range (after ``reduce_range``), PyTorch's ``activation_post_process.quant_min/max``."""
        obs = self.activation_post_process
        qrange = getattr(obs, "quant_range", None)
        return tuple(qrange) if qrange is not None else (obs.quant_min, obs.quant_max)  # type: ignore[return-value]

    @property
    def quant_min(self) -> int:
        return self.quant_range[0]

    @property
    def quant_max(self) -> int:
        return self.quant_range[1]

    @property
    def is_per_channel(self) -> bool:
        return self.qscheme in _PER_CHANNEL

    def _zero_point_dtype(self) -> Any:
        return jnp.float32 if self.qscheme == per_channel_affine_float_qparams else jnp.int32

    def init(self, example_or_shape: Any = None) -> FakeQuantizeState:
        """State with the observer's initial state, scale 1, zero point 0 and both flags on.

        Args:
          example_or_shape: an example input or its shape; required per channel (sizes ``(C,)``).
        """
        if self.is_per_channel:
            shape = (_channels(example_or_shape, self.ch_axis, type(self).__name__),)
        else:
            shape = ()
        return FakeQuantizeState(
            observer=self.activation_post_process.init(example_or_shape),
            scale=jnp.ones(shape, jnp.float32),
            zero_point=jnp.zeros(shape, self._zero_point_dtype()),
            observer_enabled=_flag(1),
            fake_quant_enabled=_flag(1),
        )

    def _observe(self, state: FakeQuantizeState, x: jax.Array) -> FakeQuantizeState:
        def on(st: FakeQuantizeState):
            obs = self.activation_post_process.update(st.observer, lax.stop_gradient(x))
            scale, zp = self.activation_post_process.calculate_qparams(obs)
            return (obs, jnp.asarray(scale, jnp.float32).reshape(st.scale.shape),
                    jnp.asarray(zp).astype(st.zero_point.dtype).reshape(st.zero_point.shape))

        def off(st: FakeQuantizeState):
            return st.observer, st.scale, st.zero_point

        obs, scale, zp = lax.cond(state.observer_enabled != 0, on, off, state)
        return dataclasses.replace(state, observer=obs, scale=scale, zero_point=zp)

    def _fake_quant(self, state: FakeQuantizeState, x: jax.Array) -> jax.Array:
        def on(x):
            if self.is_per_channel:
                return _fq_per_channel(x, state.scale, state.zero_point, self.ch_axis % x.ndim,
                                       self.quant_min, self.quant_max)
            return _fq_per_tensor(x, state.scale, state.zero_point, self.quant_min, self.quant_max)

        return lax.cond(state.fake_quant_enabled != 0, on, lambda x: x, x)

    def _apply(self, state: FakeQuantizeState, x: jax.Array) -> tuple[jax.Array, FakeQuantizeState]:
        state = self._observe(state, x)
        return self._fake_quant(state, x), state

    def calculate_qparams(self, state: FakeQuantizeState) -> tuple[jax.Array, jax.Array]:
        """The observer's ``calculate_qparams`` on the observer state (as PyTorch)."""
        return self.activation_post_process.calculate_qparams(state.observer)


@dataclasses.dataclass(frozen=True, init=False)
class FixedQParamsFakeQuantize(FakeQuantize):
    """Fake quantization with fixed qparams, for sigmoid/tanh/hardsigmoid/softmax outputs
    (``torch.ao.quantization.FixedQParamsFakeQuantize``). The observer must be a
    ``FixedQParamsObserver``; only per-tensor schemes."""

    def __init__(self, observer: Any):
        super().__init__(observer=observer)
        if type(self.activation_post_process) is not FixedQParamsObserver:
            raise TypeError(f"FixedQParamsFakeQuantize's observer must be a FixedQParamsObserver, "
                            f"got {type(self.activation_post_process).__name__}")
        if self.is_per_channel:
            raise ValueError(f"FixedQParamsFakeQuantize supports only per-tensor quantization, got {self.qscheme!r}")

    def _fixed(self) -> tuple[jax.Array, jax.Array]:
        obs = self.activation_post_process
        return jnp.asarray(obs.scale, jnp.float32).reshape(()), jnp.asarray(obs.zero_point, jnp.int32).reshape(())

    def init(self, example_or_shape: Any = None) -> FakeQuantizeState:
        scale, zp = self._fixed()
        return FakeQuantizeState(
            observer=self.activation_post_process.init(example_or_shape),
            scale=scale, zero_point=zp, observer_enabled=_flag(1), fake_quant_enabled=_flag(1),
        )

    def _apply(self, state: FakeQuantizeState, x: jax.Array) -> tuple[jax.Array, FakeQuantizeState]:
        # fixed qparams: the observer has nothing to learn, only fake quantization runs
        return self._fake_quant(state, x), state

    def calculate_qparams(self, state: Any = None) -> tuple[jax.Array, jax.Array]:
        """The fixed ``(scale, zero_point)``."""
        return self._fixed()


def fused_choose_qparams(
    min_val: jax.Array, max_val: jax.Array, quant_min: int, quant_max: int, symmetric: bool
) -> tuple[jax.Array, jax.Array]:
    """qparams as ``fused_moving_avg_obs_fake_quant`` computes them (``ChooseQuantizationParams`` with
    ``preserve_sparsity=symmetric``), elementwise over any shape.

    Differs from the observers' ``calculate_qparams``: no eps floor (tiny scales become 6.1e-5 and a
    zero range gives scale 0.1), the zero point picks the end with the smaller rounding error, and a
    symmetric range straddling 0 widens to ``[-(n//2 + 1), n//2] * max(|min|/(n//2 + 1), max/(n//2))``
    (``n = quant_max - quant_min``) with the middle zero point ``round((quant_min + quant_max) / 2)``.
    """
    min_val = jnp.asarray(min_val, jnp.float32)
    max_val = jnp.asarray(max_val, jnp.float32)
    straddles = (min_val < 0) & (max_val > 0)
    if symmetric:
        sym_qmin = -((quant_max - quant_min) // 2 + 1)
        sym_qmax = (quant_max - quant_min) // 2
        max_scale = jnp.maximum(jnp.abs(min_val / jnp.float32(sym_qmin)), jnp.abs(max_val / jnp.float32(sym_qmax)))
        min_val = jnp.where(straddles, max_scale * jnp.float32(sym_qmin), min_val)
        max_val = jnp.where(straddles, max_scale * jnp.float32(sym_qmax), max_val)
    scale, zero_point = choose_qparams_from_min_max(min_val, max_val, quant_min, quant_max)
    if symmetric:
        middle = round((quant_min + quant_max) / 2)  # Python rounds half to even, as nearbyint
        zero_point = jnp.where(straddles, jnp.int32(middle), zero_point)
    return scale, zero_point


@dataclasses.dataclass(frozen=True, init=False)
class FusedMovingAvgObsFakeQuantize(FakeQuantize):
    """Moving-average min/max observation, qparams and fake quantization in one step
    (``torch.ao.quantization.FusedMovingAvgObsFakeQuantize`` / ``torch.fused_moving_avg_obs_fake_quant``).

    Numerics differ from :class:`FakeQuantize` in two ways, both PyTorch's: the qparams used in the
    forward come from :func:`fused_choose_qparams` (not the observer's ``calculate_qparams``, which
    :meth:`calculate_qparams` still returns), and they are recomputed only while fake quantization
    is enabled. Per channel, PyTorch requires ``ch_axis == 0``; here any axis works (flax kernels
    keep output channels last).
    """

    def __init__(self, observer: Any = None, quant_min: int = 0, quant_max: int = 255, **observer_kwargs: Any):
        super().__init__(observer, quant_min, quant_max, **observer_kwargs)
        if not isinstance(self.activation_post_process,
                          (MovingAverageMinMaxObserver, MovingAveragePerChannelMinMaxObserver)):
            raise TypeError("Fused observer+fake_quant module only works with MovingAverageMinMaxObserver or "
                            f"MovingAveragePerChannelMinMaxObserver, got {type(self.activation_post_process).__name__}")

    @property
    def is_symmetric_quant(self) -> bool:
        return self.qscheme in (per_tensor_symmetric, per_channel_symmetric)

    def _apply(self, state: FakeQuantizeState, x: jax.Array) -> tuple[jax.Array, FakeQuantizeState]:
        # one fused step (see the class docstring for the numerics)
        obs_state: StatsState = state.observer
        xs = lax.stop_gradient(x).astype(jnp.float32)
        if self.is_per_channel:
            axis = self.ch_axis % x.ndim
            xs = jnp.moveaxis(xs, axis, 0).reshape(xs.shape[axis], -1)
            cur_min, cur_max, bad = finite_min_max(xs, axis=1)
        else:
            cur_min, cur_max, bad = finite_min_max(xs)
        new_min, new_max = moving_average(obs_state.min_val, obs_state.max_val, cur_min, cur_max,
                                          self.activation_post_process.averaging_constant)
        observe = state.observer_enabled != 0
        obs_state = StatsState(
            min_val=jnp.where(observe, new_min, obs_state.min_val),
            max_val=jnp.where(observe, new_max, obs_state.max_val),
            num_batches=obs_state.num_batches + observe.astype(jnp.int32),
            nonfinite=obs_state.nonfinite | (observe & bad),
        )
        running_min, running_max = obs_state.min_val, obs_state.max_val

        fq_on = state.fake_quant_enabled != 0
        scale, zp = fused_choose_qparams(running_min, running_max, self.quant_min, self.quant_max,
                                         self.is_symmetric_quant)
        scale = jnp.where(fq_on, scale.reshape(state.scale.shape), state.scale)
        zp = jnp.where(fq_on, zp.reshape(state.zero_point.shape), state.zero_point)
        state = dataclasses.replace(state, observer=obs_state, scale=scale, zero_point=zp)
        return self._fake_quant(state, x), state


@dataclasses.dataclass(frozen=True)
class Identity:
    """Does nothing: the stand-in for ``torch.nn.Identity`` in weight-only / activation-only QConfigs.

    Fits both contracts (observer: ``init``/``update``; fake quantize: ``apply``); its state is empty.
    """

    def init(self, example_or_shape: Any = None) -> tuple:
        return ()

    def update(self, state: tuple, x: jax.Array) -> tuple:
        return state

    def apply(self, state: tuple, x: jax.Array) -> tuple[jax.Array, tuple]:
        return x, state

    def calculate_qparams(self, state: Any = None):
        raise ValueError("Identity has no quantization parameters: it marks a tensor that stays in float")

    @classmethod
    def with_args(cls, **kwargs: Any) -> ObserverFactory:
        return with_args(cls, **kwargs)
