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

from jaxquant.dtypes import FloatDType, qint8, quint8
from jaxquant.nn.quantized.weights import quantize_weight, weight_observer  # noqa: F401 (re-exported)


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

