"""Quantizing a float weight with the qconfig's weight observer, as PyTorch's ``from_float`` does."""
from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

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


def quantize_weight(kernel: jax.Array, qconfig: Any, path: str) -> QTensor:
    """int8 QTensor of a flax kernel whose output channels are the last axis.

    The observer sees the weight in PyTorch's layout (output channel first), so per-channel
    observers keep PyTorch's ``ch_axis=0`` default; the result is in the flax layout with
    ``axis = kernel.ndim - 1``. Integers are clamped to the observer's quant range, so a 4-bit range
    (``quant_min=-8, quant_max=7``) really gives 4-bit values.

    Args:
      kernel: float32 ``(..., C_out)``.
      qconfig: a QConfig whose ``weight`` is an observer (or fake-quant) factory with dtype qint8.
      path: the module path, for error messages.
    """
    from jaxquant.observers import check_observer_state

    if qconfig is None or qconfig.weight is None:
        raise ValueError(f"'{path}': its qconfig has no weight observer; use a static qconfig such as "
                         "get_default_qconfig('x86')")
    observer = qconfig.weight()
    # A FakeQuantize config carries its observer as ``activation_post_process`` (PyTorch's name).
    observer = getattr(observer, "activation_post_process", observer)
    if observer.dtype != qint8:
        raise ValueError(f"'{path}': int8 kernels need qint8 weights, the weight observer {observer!r} "
                         f"uses {observer.dtype!r}")
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
        q = quantize_per_channel(kernel, scale, jnp.asarray(zero_point).astype(jnp.int32), kernel.ndim - 1, qint8)
    else:
        q = quantize_per_tensor(kernel, jnp.reshape(scale, ()), jnp.reshape(zero_point, ()), qint8)
    data = jnp.clip(q.int_data, qmin, qmax).astype(np.int8)
    return QTensor(data, q.scale, q.zero_point, q.dtype, q.qscheme, q.axis)
