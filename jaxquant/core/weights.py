"""Quantizing a float weight with the qconfig's weight observer, as PyTorch's ``from_float`` does.

Two layers: a traceable core (:func:`observe_weight`, :func:`quantize_with_qparams`,
:func:`quantize_weight_traceable`; pure jnp) and :func:`quantize_weight`, the host-side entry point
used at conversion, which also checks what needs concrete values (finite weights, an observer that
saw data, the observer's dtype and channel axis) and names the layer when something is wrong. Every
front end (NNX static and dynamic modules, Linen, graph mode) quantizes its weights here.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxquant.dtypes import FloatDType, calculate_qmin_qmax, per_channel_affine_float_qparams, qint8, quint8
from jaxquant.observers import check_observer_state
from jaxquant.qtensor import QTensor, quantize_per_channel, quantize_per_tensor


def observer_quant_range(observer: Any) -> tuple[int, int]:
    """The effective ``(quant_min, quant_max)`` of an observer config (PyTorch's rules)."""
    if hasattr(observer, "quant_range"):
        return tuple(observer.quant_range)
    qmin, qmax = getattr(observer, "quant_min", None), getattr(observer, "quant_max", None)
    custom = qmin is not None and qmax is not None
    return calculate_qmin_qmax(qmin, qmax, custom, observer.dtype, getattr(observer, "reduce_range", False))


# ----------------------------------------------------------------------------------------------
# Traceable core: pure jnp, runs under jax.jit, nn.scan, vmap (jaxquant.linen quantizes kernels
# inside traced passes). No checks that need values here.


def observe_weight(observer: Any, w_pt: jax.Array) -> tuple[Any, tuple[jax.Array, jax.Array]]:
    """One observer pass over a weight in PyTorch's layout (output channel first).

    Returns ``(observer state, (scale float32 (C,) or (), zero_point (C,) or ()))``.
    """
    state = observer.update(observer.init(w_pt), w_pt)
    return state, observer.calculate_qparams(state)


def quantize_with_qparams(kernel: jax.Array, scale: jax.Array, zero_point: jax.Array, dtype: Any, qscheme: Any,
                          quant_range: tuple[int, int]) -> QTensor:
    """Quantize a float32 flax kernel ``(..., C_out)`` with given qparams; integers clamped to ``quant_range``.

    ``scale``/``zero_point`` are ``(C_out,)`` for a per-channel ``qscheme`` (channel axis last; float
    zero points for ``per_channel_affine_float_qparams``, integers otherwise) or scalars per tensor.
    Returns a QTensor whose ``int_data`` is in ``dtype``'s storage type.
    """
    if qscheme.is_per_channel:
        if qscheme == per_channel_affine_float_qparams:
            zero_point = jnp.asarray(zero_point, jnp.float32)
        else:
            zero_point = jnp.round(jnp.asarray(zero_point)).astype(jnp.int32)
        q = quantize_per_channel(kernel, scale, zero_point, kernel.ndim - 1, dtype)
    else:
        q = quantize_per_tensor(kernel, jnp.reshape(scale, ()),
                                jnp.reshape(jnp.round(jnp.asarray(zero_point)), ()).astype(jnp.int32), dtype)
    qmin, qmax = quant_range
    data = jnp.clip(q.int_data, qmin, qmax).astype(dtype.storage)
    return QTensor(data, q.scale, q.zero_point, q.dtype, q.qscheme, q.axis)


def quantize_weight_traceable(kernel: jax.Array, observer: Any) -> QTensor:
    """:func:`quantize_weight`'s arithmetic without its checks: traceable, takes the observer itself.

    ``kernel``: float ``(..., C_out)``; returns the QTensor (flax layout, ``axis = kernel.ndim - 1``
    when per channel).
    """
    kernel = jnp.asarray(kernel, jnp.float32)
    _, (scale, zero_point) = observe_weight(observer, jnp.moveaxis(kernel, -1, 0))
    return quantize_with_qparams(kernel, scale, zero_point, observer.dtype, observer.qscheme,
                                 observer_quant_range(observer))


# Compiled once per observer config (configs are hashable): eager, the observer's ops dispatch one by one.
_observe_weight_jit = jax.jit(observe_weight, static_argnums=0)


# ----------------------------------------------------------------------------------------------
# Host-side entry point: resolves the qconfig, checks values, then runs the core.


def weight_observer(qconfig: Any, path: str) -> Any:
    """The observer instance of ``qconfig.weight`` (a FakeQuantize config gives its observer)."""
    if qconfig is None or getattr(qconfig, "weight", None) is None:
        raise ValueError(f"'{path}': its qconfig has no weight observer; use a qconfig with one, such as "
                         "get_default_qconfig('x86') or default_dynamic_qconfig")
    observer = qconfig.weight()
    # A FakeQuantize config carries its observer as ``activation_post_process`` (PyTorch's name).
    return getattr(observer, "activation_post_process", observer)


def quantize_weight(kernel: jax.Array, qconfig: Any, path: str, dtypes: tuple = (qint8,)) -> QTensor:
    """Quantize a flax kernel whose output channels are the last axis, with the qconfig's weight observer.

    The observer sees the weight in PyTorch's layout (output channel first), so per-channel
    observers keep PyTorch's ``ch_axis=0`` default; the result is in the flax layout with
    ``axis = kernel.ndim - 1``. Integers are clamped to the observer's quant range, so a 4-bit range
    (``quant_min=-8, quant_max=7``) really gives 4-bit values.

    Args:
      kernel: float32 ``(..., C_out)``.
      qconfig: a QConfig whose ``weight`` is an observer (or fake-quant) factory.
      path: the module path, for error messages.
      dtypes: the weight dtypes the caller's kernels accept (qint8; dynamic embeddings also take
        quint8 rows with float qparams).
    Returns:
      A QTensor (int8 data for qint8; uint8 with float zero points for float-qparams observers).
    """
    observer = weight_observer(qconfig, path)
    if observer.dtype not in dtypes:
        raise ValueError(f"'{path}': the weight observer {observer!r} targets {observer.dtype!r}; these kernels "
                         f"need {' or '.join(map(repr, dtypes))} weights")
    kernel = jnp.asarray(kernel, jnp.float32)
    check_finite(kernel, path)
    if observer.qscheme.is_per_channel and getattr(observer, "ch_axis", 0) not in (0, -kernel.ndim):
        raise ValueError(f"'{path}': weight observers see (out_channels, ...) weights; use ch_axis=0, got "
                         f"{observer.ch_axis}")
    state, (scale, zero_point) = _observe_weight_jit(observer, jnp.moveaxis(kernel, -1, 0))
    check_observer_state(observer, state, name=f"{path} (weight)")
    return quantize_with_qparams(kernel, scale, zero_point, observer.dtype, observer.qscheme,
                                 observer_quant_range(observer))


# ----------------------------------------------------------------------------------------------
# Reading a dynamic qconfig: dynamic modules quantize their weights once, at conversion, as PyTorch's
# from_float does; the activation "observer" of a dynamic qconfig (PlaceholderObserver(is_dynamic=True))
# only carries configuration, since activation qparams are chosen on every call.


def weight_dtype(qconfig: Any, path: str) -> Any:
    """The dtype the qconfig's weight observer targets (``qint8``, ``quint8``, ``float16``, ...)."""
    return weight_observer(qconfig, path).dtype


def activation_per_token(qconfig: Any) -> bool:
    """True when the qconfig's activation placeholder asks for per-row (per-token) qparams: a
    per-channel ``qscheme`` on a dynamic activation observer means one scale per row of ``x``."""
    act = getattr(qconfig, "activation", None)
    if act is None:
        return False
    try:
        observer = act()
    except TypeError:
        return False
    qscheme = getattr(observer, "qscheme", None)
    return bool(qscheme is not None and qscheme.is_per_channel)


def check_finite(kernel: jax.Array, path: str) -> None:
    if not bool(jnp.all(jnp.isfinite(kernel))):
        raise ValueError(f"'{path}': the weight contains NaN or Inf; fix the float model before quantizing")


def quantize_float_weight(kernel: jax.Array, qconfig: Any, path: str):
    """A float kernel ``(..., C_out)`` quantized per the qconfig's weight observer: int8 for ``qint8``
    observers, uint8 rows with float qparams for ``per_channel_affine_float_qparams`` (embeddings)."""
    return quantize_weight(kernel, qconfig, path, dtypes=(qint8, quint8))


def float_weight_dtype(qconfig: Any, path: str) -> FloatDType:
    dtype = weight_dtype(qconfig, path)
    if not isinstance(dtype, FloatDType):
        raise ValueError(f"'{path}': expected a float16/bfloat16 weight observer, got {dtype!r}")
    return dtype

