"""Learnable scale and zero point (LSQ): PyTorch's ``_fake_quantize_learnable_per_{tensor,channel}_affine``
and ``_LearnableFakeQuantize``.

Gradients follow ``fake_quantize_learnable_{tensor,channel}_grad_kernel_cpu``. With ``xq`` the
unclamped rounded integer, ``xfq`` the fake-quantized value, ``z`` the zero point and ``s`` the scale::

    dx = dy                              if qmin <= xq <= qmax   else 0
    ds = dy * (xfq - x) / s * gf         if in range
       = dy * (qmin - z) * gf            if xq < qmin
       = dy * (qmax - z) * gf            if xq > qmax
    dz = 0 if in range else -dy * s * gf

summed over every element (per tensor) or over every axis but the channel axis (per channel).
``gf`` is ``grad_factor`` (LSQ's ``1 / sqrt(numel * quant_max)`` when ``use_grad_scaling``).

Zero point rounding is PyTorch's, quirks included: per tensor the forward rounds half to even and
clamps, while the backward uses ``trunc(clamp(z + 0.5))`` (round half up for z >= -0.5);
per channel both passes round half to even and clamp.
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxquant.fake_quant.fake_quantize import FakeQuantizeBase, check_range_fits_dtype, instantiate_observer
from jaxquant.observers.minmax import MovingAverageMinMaxObserver
from jaxquant.fake_quant.functional import (
    ArrayLike,
    _channel_qparams,
    _channel_view,
    _check_scalar_qparams,
    _clamped_dequantize,
    _float_input,
    _in_range,
    check_qrange,
    check_scale,
    fake_quant_with_mask,
)

FLOAT32_EPS = float(np.finfo(np.float32).eps)


# ---------------------------------------------------------------------------------------------
# per tensor


def _zp_forward(zero_point: jax.Array, quant_min: int, quant_max: int) -> jax.Array:
    return jnp.clip(jnp.round(zero_point), quant_min, quant_max)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _lsq_per_tensor(x, scale, zero_point, quant_min, quant_max, grad_factor):
    zp = _zp_forward(zero_point, quant_min, quant_max).astype(jnp.int32)
    y, _ = fake_quant_with_mask(x, scale, zp, quant_min, quant_max)
    return y.astype(x.dtype)


def _lsq_per_tensor_fwd(x, scale, zero_point, quant_min, quant_max, grad_factor):
    return _lsq_per_tensor(x, scale, zero_point, quant_min, quant_max, grad_factor), (x, scale, zero_point)


def _lsq_grads(x, g, scale, zp, quant_min, quant_max, grad_factor):
    """Elementwise (dx, dscale, dzero_point); ``scale``/``zp`` broadcast against ``x``, zp integral float."""
    x = x.astype(jnp.float32)
    g = g.astype(jnp.float32)
    gf = jnp.float32(grad_factor)
    inv_scale = jnp.float32(1.0) / scale
    xq = jnp.round(zp + x * inv_scale)
    inside = _in_range(xq, quant_min, quant_max)
    dx = jnp.where(inside, g, jnp.float32(0.0))
    xfq = _clamped_dequantize(xq, zp, scale, quant_min, quant_max)
    dscale_small = jnp.float32(quant_min) - zp
    dscale_big = jnp.float32(quant_max) - zp
    ds_out = jnp.where(xq < quant_min, g * dscale_small, g * dscale_big) * gf
    ds_in = g * (xfq - x) * inv_scale * gf
    dscale = jnp.where(inside, ds_in, ds_out)
    dzp = jnp.where(inside, jnp.float32(0.0), -g * scale * gf)
    return dx, dscale, dzp


def _lsq_per_tensor_bwd(quant_min, quant_max, grad_factor, res, g):
    x, scale, zero_point = res
    zp = jnp.trunc(jnp.clip(zero_point + jnp.float32(0.5), quant_min, quant_max))
    dx, dscale, dzp = _lsq_grads(x, g, scale, zp, quant_min, quant_max, grad_factor)
    return dx.astype(x.dtype), jnp.sum(dscale).reshape(scale.shape), jnp.sum(dzp).reshape(zero_point.shape)


_lsq_per_tensor.defvjp(_lsq_per_tensor_fwd, _lsq_per_tensor_bwd)


def _check_lsq_qrange(quant_min: int, quant_max: int, where: str) -> None:
    check_qrange(quant_min, quant_max, where)
    if not quant_min <= 0 <= quant_max:
        raise ValueError(f"{where}: the quantization range must include 0, got [{quant_min}, {quant_max}]")


def fake_quantize_learnable_per_tensor_affine(
    x: ArrayLike,
    scale: ArrayLike,
    zero_point: ArrayLike,
    quant_min: int,
    quant_max: int,
    grad_factor: float = 1.0,
) -> jax.Array:
    """LSQ fake quantization with one learnable scale and zero point
    (``torch._fake_quantize_learnable_per_tensor_affine``).

    Args:
      x: float array of any shape.
      scale: float32 scalar (``()`` or ``(1,)``), > 0; differentiable.
      zero_point: float32 scalar; differentiable. Rounded and clamped to the range in the forward.
      quant_min, quant_max: static ints, ``quant_min <= 0 <= quant_max``, ``quant_min < quant_max``.
      grad_factor: static float multiplying the scale and zero-point gradients.
    Returns:
      An array like ``x``; gradients for ``x``, ``scale`` and ``zero_point`` as PyTorch's.
    """
    where = "fake_quantize_learnable_per_tensor_affine"
    _check_lsq_qrange(quant_min, quant_max, where)
    x = _float_input(x, where)
    scale = jnp.asarray(scale, jnp.float32)
    zero_point = jnp.asarray(zero_point, jnp.float32)
    _check_scalar_qparams(scale, zero_point, where, "fake_quantize_learnable_per_channel_affine")
    check_scale(scale, where)
    return _lsq_per_tensor(x, scale, zero_point, int(quant_min), int(quant_max), float(grad_factor))


# ---------------------------------------------------------------------------------------------
# per channel


@partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _lsq_per_channel(x, scale, zero_point, axis, quant_min, quant_max, grad_factor):
    zp = _zp_forward(zero_point, quant_min, quant_max).astype(jnp.int32)
    y, _ = fake_quant_with_mask(
        x, _channel_view(scale, x.ndim, axis), _channel_view(zp, x.ndim, axis), quant_min, quant_max
    )
    return y.astype(x.dtype)


def _lsq_per_channel_fwd(x, scale, zero_point, axis, quant_min, quant_max, grad_factor):
    y = _lsq_per_channel(x, scale, zero_point, axis, quant_min, quant_max, grad_factor)
    return y, (x, scale, zero_point)


def _lsq_per_channel_bwd(axis, quant_min, quant_max, grad_factor, res, g):
    x, scale, zero_point = res
    zp = _zp_forward(zero_point, quant_min, quant_max)
    dx, dscale, dzp = _lsq_grads(
        x, g, _channel_view(scale, x.ndim, axis), _channel_view(zp, x.ndim, axis), quant_min, quant_max, grad_factor
    )
    others = tuple(a for a in range(x.ndim) if a != axis)
    return dx.astype(x.dtype), jnp.sum(dscale, axis=others), jnp.sum(dzp, axis=others)


_lsq_per_channel.defvjp(_lsq_per_channel_fwd, _lsq_per_channel_bwd)


def fake_quantize_learnable_per_channel_affine(
    x: ArrayLike,
    scale: ArrayLike,
    zero_point: ArrayLike,
    axis: int,
    quant_min: int,
    quant_max: int,
    grad_factor: float = 1.0,
) -> jax.Array:
    """LSQ fake quantization with a learnable scale and zero point per slice along ``axis``
    (``torch._fake_quantize_learnable_per_channel_affine``).

    Args:
      x: float array, ``x.shape[axis] == C``.
      scale: float32 ``(C,)``, > 0. zero_point: float32 ``(C,)`` (rounded half-even and clamped).
      axis, quant_min, quant_max, grad_factor: static.
    Returns:
      An array like ``x``; gradients ``(C,)`` for scale and zero point.
    """
    where = "fake_quantize_learnable_per_channel_affine"
    _check_lsq_qrange(quant_min, quant_max, where)
    x = _float_input(x, where)
    axis, scale, zero_point = _channel_qparams(x, scale, jnp.asarray(zero_point, jnp.float32), axis, where)
    check_scale(scale, where)
    return _lsq_per_channel(x, scale, zero_point, axis, int(quant_min), int(quant_max), float(grad_factor))


# ---------------------------------------------------------------------------------------------
# LearnableFakeQuantize


@partial(jax.custom_vjp, nondiff_argnums=())
def _overwrite(param: jax.Array, value: jax.Array, learn: jax.Array) -> jax.Array:
    """``value``, with the gradient routed to ``param`` (times ``learn``).

    PyTorch copies observer estimates into ``scale.data``: the forward sees the new value while the
    gradient still belongs to the parameter. ``param + stop_gradient(value - param)`` would round.
    """
    return value


def _overwrite_fwd(param, value, learn):
    return value, learn


def _overwrite_bwd(learn, g):
    return g * (learn != 0).astype(g.dtype), jnp.zeros_like(g), np.zeros(learn.shape, jax.dtypes.float0)


_overwrite.defvjp(_overwrite_fwd, _overwrite_bwd)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LearnableFakeQuantizeState:
    """State of a :class:`LearnableFakeQuantize`.

    ``scale``, ``zero_point``: float32 ``()`` or ``(C,)`` — the learnable parameters (take gradients
    with respect to these). Flags, int32 ``()``: ``static_enabled`` (observer drives the qparams),
    ``fake_quant_enabled``, ``learning_enabled`` (gradients reach scale and zero point).
    """

    observer: Any
    scale: jax.Array
    zero_point: jax.Array
    static_enabled: jax.Array
    fake_quant_enabled: jax.Array
    learning_enabled: jax.Array


def _flag(on: Any) -> jax.Array:
    return jnp.asarray(on, jnp.int32).reshape(())


@dataclasses.dataclass(frozen=True, init=False)
class LearnableFakeQuantize(FakeQuantizeBase):
    """LSQ fake quantization with learnable scale and zero point (PyTorch's ``_LearnableFakeQuantize``).

    ``LearnableFakeQuantize(observer, quant_min=0, quant_max=255, scale=1.0, zero_point=0.0,
    channel_len=-1, use_grad_scaling=False, **observer_kwargs)``. Modes as in PyTorch:
    ``enable_static_estimate`` (observer sets the qparams, the default), ``enable_param_learning``
    (observer off, gradients reach scale and zero point) and ``enable_static_observation``
    (observe only, output = input).

    The gradient with respect to ``state.scale`` is evaluated at the value the forward used (the
    observer estimate, or the scale clamped to eps); apply optimizer updates to the returned state's
    ``scale``/``zero_point``, which hold those values — PyTorch's ``.data`` overwrite, made explicit.
    """

    activation_post_process: Any
    quant_min: int
    quant_max: int
    init_scale: float
    init_zero_point: float
    channel_len: int
    use_grad_scaling: bool

    def __init__(self, observer: Any = None, quant_min: int = 0, quant_max: int = 255, scale: float = 1.0,
                 zero_point: float = 0.0, channel_len: int = -1, use_grad_scaling: bool = False,
                 **observer_kwargs: Any):
        where = "LearnableFakeQuantize"
        if quant_min >= quant_max:
            raise ValueError(f"{where}: quant_min ({quant_min}) must be strictly less than quant_max ({quant_max})")
        if not (channel_len == -1 or (isinstance(channel_len, int) and channel_len > 0)):
            raise ValueError(f"{where}: channel_len must be -1 (per tensor) or a positive int, got {channel_len!r}")
        if observer is None:
            observer = MovingAverageMinMaxObserver
        obs = instantiate_observer(observer, where, **{**observer_kwargs, "quant_min": quant_min,
                                                        "quant_max": quant_max})
        check_range_fits_dtype(quant_min, quant_max, getattr(obs, "dtype", None), where)
        for name, value in (("activation_post_process", obs), ("quant_min", int(quant_min)),
                            ("quant_max", int(quant_max)), ("init_scale", float(scale)),
                            ("init_zero_point", float(zero_point)), ("channel_len", int(channel_len)),
                            ("use_grad_scaling", bool(use_grad_scaling))):
            object.__setattr__(self, name, value)

    @property
    def is_per_channel(self) -> bool:
        return self.qscheme.name in ("per_channel_symmetric", "per_channel_affine")

    @property
    def is_symmetric(self) -> bool:
        return self.qscheme.name in ("per_channel_symmetric", "per_tensor_symmetric")

    def init(self, example_or_shape: Any = None) -> LearnableFakeQuantizeState:
        """Scale/zero point filled with the constructor's values; static estimation and fake quant on,
        learning off (PyTorch's defaults)."""
        if self.channel_len != -1:
            shape: tuple[int, ...] = (self.channel_len,)
        elif self.is_per_channel:
            if example_or_shape is None:
                raise ValueError("LearnableFakeQuantize: per-channel needs channel_len or example_or_shape")
            shape = (int(tuple(getattr(example_or_shape, "shape", example_or_shape))[self.ch_axis]),)
        else:
            shape = ()
        return LearnableFakeQuantizeState(
            observer=self.activation_post_process.init(example_or_shape),
            scale=jnp.full(shape, self.init_scale, jnp.float32),
            zero_point=jnp.full(shape, self.init_zero_point, jnp.float32),
            static_enabled=_flag(1), fake_quant_enabled=_flag(1), learning_enabled=_flag(0),
        )

    def _apply(self, state: LearnableFakeQuantizeState, x: jax.Array) -> tuple[jax.Array, LearnableFakeQuantizeState]:
        # observer estimate (if static) or eps clamp, then LSQ fake quantization (if on)
        def static(st):
            obs = self.activation_post_process.update(st.observer, lax.stop_gradient(x))
            s, z = self.activation_post_process.calculate_qparams(obs)
            return (obs, jnp.asarray(s, jnp.float32).reshape(st.scale.shape),
                    jnp.asarray(z).astype(jnp.float32).reshape(st.zero_point.shape))

        def learned(st):
            return st.observer, jnp.maximum(st.scale, jnp.float32(FLOAT32_EPS)), st.zero_point

        obs, scale_val, zp_val = lax.cond(state.static_enabled != 0, static, learned, state)
        fq_on = state.fake_quant_enabled != 0
        if self.is_symmetric:
            zp_val = jnp.where(fq_on, jnp.zeros_like(zp_val), zp_val)
        learn = state.learning_enabled
        scale = _overwrite(state.scale, scale_val, learn)
        zero_point = _overwrite(state.zero_point, zp_val, learn)
        grad_factor = 1.0 / (x.size * self.quant_max) ** 0.5 if self.use_grad_scaling else 1.0

        def on(x, scale, zero_point):
            if self.is_per_channel:
                return _lsq_per_channel(x, scale, zero_point, self.ch_axis % x.ndim, self.quant_min,
                                        self.quant_max, grad_factor)
            return _lsq_per_tensor(x, scale, zero_point, self.quant_min, self.quant_max, grad_factor)

        y = lax.cond(fq_on, on, lambda x, s, z: x, x, scale, zero_point)
        new_state = dataclasses.replace(state, observer=obs, scale=scale_val, zero_point=zp_val)
        return y, new_state

    def calculate_qparams(self, state: LearnableFakeQuantizeState) -> tuple[jax.Array, jax.Array]:
        """``(max(scale, eps) float32, clamp(round(zero_point)) int32)``."""
        scale = jnp.maximum(state.scale, jnp.float32(FLOAT32_EPS))
        zp = jnp.clip(jnp.round(state.zero_point), self.quant_min, self.quant_max).astype(jnp.int32)
        return scale, zp

    # PyTorch's mode switches, as pure functions of the state
    @staticmethod
    def enable_param_learning(state: LearnableFakeQuantizeState) -> LearnableFakeQuantizeState:
        """Learn scale/zero point by gradient; observer off; fake quant on."""
        return dataclasses.replace(state, learning_enabled=_flag(1), fake_quant_enabled=_flag(1),
                                   static_enabled=_flag(0))

    @staticmethod
    def enable_static_estimate(state: LearnableFakeQuantizeState) -> LearnableFakeQuantizeState:
        """Observer sets scale/zero point; no learning; fake quant on."""
        return dataclasses.replace(state, learning_enabled=_flag(0), fake_quant_enabled=_flag(1),
                                   static_enabled=_flag(1))

    @staticmethod
    def enable_static_observation(state: LearnableFakeQuantizeState) -> LearnableFakeQuantizeState:
        """Observer collects statistics; no learning; output equals input."""
        return dataclasses.replace(state, learning_enabled=_flag(0), fake_quant_enabled=_flag(0),
                                   static_enabled=_flag(1))
