"""Reading a dynamic qconfig: the weight observer's verdict on a float kernel, and the activation
side's choices (per tensor or per token).

Dynamic modules quantize their weights once, at conversion, with ``qconfig.weight()`` exactly as
PyTorch's ``from_float`` does; the activation "observer" of a dynamic qconfig only carries
configuration (``PlaceholderObserver(is_dynamic=True)``), since the activation qparams are chosen
on every call.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.dtypes import FloatDType, QDType, qint8, quint8


def weight_observer(qconfig: Any, path: str) -> Any:
    """The observer instance of ``qconfig.weight`` (a FakeQuantize config gives its observer)."""
    if qconfig is None or getattr(qconfig, "weight", None) is None:
        raise ValueError(f"'{path}': its qconfig has no weight observer; use default_dynamic_qconfig, "
                         "per_channel_dynamic_qconfig, float16_dynamic_qconfig or "
                         "float_qparams_weight_only_qconfig")
    observer = qconfig.weight()
    return getattr(observer, "observer", observer)


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
    """A float kernel ``(..., C_out)`` quantized per the qconfig's weight observer.

    Returns a :class:`~jaxquant.qtensor.QTensor` (int8 for ``qint8`` observers; uint8 rows with
    float qparams for ``per_channel_affine_float_qparams``). The observer sees the weight in
    PyTorch's layout (channel axis first), so per-channel observers keep ``ch_axis=0``.
    """
    from jaxquant.nn.quantized.weights import observer_quant_range
    from jaxquant.observers.base import check_observer_state
    from jaxquant.qtensor import QTensor, quantize_per_channel, quantize_per_tensor

    observer = weight_observer(qconfig, path)
    if not isinstance(observer.dtype, QDType) or observer.dtype not in (qint8, quint8):
        raise ValueError(f"'{path}': the weight observer {observer!r} targets {observer.dtype!r}; integer "
                         "dynamic modules need qint8 (or quint8 with float qparams for embeddings)")
    kernel = jnp.asarray(kernel, jnp.float32)
    check_finite(kernel, path)
    w_pt = jnp.moveaxis(kernel, -1, 0)
    state = observer.update(observer.init(w_pt), w_pt)
    check_observer_state(observer, state, name=f"{path} (weight)")
    scale, zero_point = observer.calculate_qparams(state)
    qmin, qmax = observer_quant_range(observer)
    if observer.qscheme.is_per_channel:
        if getattr(observer, "ch_axis", 0) not in (0, -w_pt.ndim):
            raise ValueError(f"'{path}': weight observers see (out_channels, ...) weights; use ch_axis=0, "
                             f"got {observer.ch_axis}")
        q = quantize_per_channel(kernel, scale, zero_point, kernel.ndim - 1, observer.dtype)
    else:
        q = quantize_per_tensor(kernel, jnp.reshape(scale, ()), jnp.reshape(zero_point, ()).astype(jnp.int32),
                                observer.dtype)
    data = jnp.clip(q.int_data, qmin, qmax).astype(observer.dtype.storage)
    return QTensor(data, q.scale, q.zero_point, q.dtype, q.qscheme, q.axis)


def float_weight_dtype(qconfig: Any, path: str) -> FloatDType:
    dtype = weight_dtype(qconfig, path)
    if not isinstance(dtype, FloatDType):
        raise ValueError(f"'{path}': expected a float16/bfloat16 weight observer, got {dtype!r}")
    return dtype


def as_numpy_f32(x: Any) -> np.ndarray:
    return np.asarray(x, np.float32)
