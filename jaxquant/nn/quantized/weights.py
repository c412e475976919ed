"""Quantizing a float weight with the qconfig's weight observer, as PyTorch's ``from_float`` does."""
from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from jaxquant.dtypes import calculate_qmin_qmax, qint8
from jaxquant.qtensor import QTensor, quantize_per_channel, quantize_per_tensor


def observer_quant_range(observer: Any) -> tuple[int, int]:
    """The effective ``(quant_min, quant_max)`` of an observer config (PyTorch's rules)."""
    if hasattr(observer, "quant_range"):
        return tuple(observer.quant_range)
    qmin, qmax = getattr(observer, "quant_min", None), getattr(observer, "quant_max", None)
    custom = qmin is not None and qmax is not None
    return calculate_qmin_qmax(qmin, qmax, custom, observer.dtype, getattr(observer, "reduce_range", False))


@partial(jax.jit, static_argnums=0)
def _observe_weight(observer: Any, w: jax.Array):
    state = observer.update(observer.init(w), w)
    return state, observer.calculate_qparams(state)


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
    from jaxquant.observers import check_observer_state

    observer = weight_observer(qconfig, path)
    if observer.dtype not in dtypes:
        raise ValueError(f"'{path}': the weight observer {observer!r} targets {observer.dtype!r}; these kernels "
                         f"need {' or '.join(map(repr, dtypes))} weights")
    kernel = jnp.asarray(kernel, jnp.float32)
    if not bool(jnp.all(jnp.isfinite(kernel))):
        raise ValueError(f"'{path}': the weight contains NaN or Inf; fix the float model before quantizing")
    w_pt = jnp.moveaxis(kernel, -1, 0)
    state, (scale, zero_point) = _observe_weight(observer, w_pt)
    check_observer_state(observer, state, name=f"{path} (weight)")
    qmin, qmax = observer_quant_range(observer)
    if observer.qscheme.is_per_channel:
        if getattr(observer, "ch_axis", 0) not in (0, -w_pt.ndim):
            raise ValueError(f"'{path}': weight observers see (out_channels, ...) weights; use ch_axis=0, got "
                             f"{observer.ch_axis}")
        zero_point = jnp.asarray(zero_point)
        if not jnp.issubdtype(zero_point.dtype, jnp.floating):
            zero_point = zero_point.astype(jnp.int32)
        q = quantize_per_channel(kernel, scale, zero_point, kernel.ndim - 1, observer.dtype)
    else:
        q = quantize_per_tensor(kernel, jnp.reshape(scale, ()), jnp.reshape(zero_point, ()).astype(jnp.int32),
                                observer.dtype)
    data = jnp.clip(q.int_data, qmin, qmax).astype(observer.dtype.storage)
    return QTensor(data, q.scale, q.zero_point, q.dtype, q.qscheme, q.axis)
