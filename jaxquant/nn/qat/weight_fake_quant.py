"""Fake-quantizing and finally quantizing a flax kernel with a QAT module's ``weight_fake_quant``.

The weight fake quant sees the kernel in PyTorch's layout (output channel first), so per-channel
configs keep PyTorch's ``ch_axis=0`` default and the statistics are those PyTorch's QAT modules
compute; the result is moved back to the flax layout (output channel last).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.dtypes import qint8
from jaxquant.nn.qat.fake_quant_module import FakeQuantModule
from jaxquant.observers.base import check_observer_state
from jaxquant.qtensor import QTensor, quantize_per_channel, quantize_per_tensor


def fake_quant_kernel(weight_fake_quant: FakeQuantModule, kernel: jax.Array) -> jax.Array:
    """Fake-quantized kernel, same shape/dtype as ``kernel`` (float32 ``(..., C_out)``).

    Updates ``weight_fake_quant``'s statistics (if its observer is enabled); gradient straight-through.
    """
    w_pt = jnp.moveaxis(kernel, -1, 0)
    return jnp.moveaxis(weight_fake_quant(w_pt), 0, -1)


def quantize_kernel_with_fake_quant(weight_fake_quant: FakeQuantModule, kernel: jax.Array, path: str) -> QTensor:
    """int8 QTensor of ``kernel`` (flax layout, float32 ``(..., C_out)``) with the fake quant's own qparams.

    As PyTorch's ``from_float`` of a QAT module: the weight fake quant is run once more on the (possibly
    BN-folded) weight, then ``calculate_qparams`` gives scale/zero point (per channel along the output
    axis, ``axis = kernel.ndim - 1``), and the integers are clamped to the fake quant's range.
    """
    fq = weight_fake_quant.fake_quant
    if fq.dtype != qint8:
        raise ValueError(f"'{path}': int8 kernels need qint8 weights, the weight fake quant {fq!r} uses {fq.dtype!r}")
    kernel = jnp.asarray(kernel, jnp.float32)
    if not bool(jnp.all(jnp.isfinite(kernel))):
        raise ValueError(f"'{path}': the weight contains NaN or Inf (the QAT run diverged?); "
                         "check_qat_state(model) names the first bad layer")
    w_pt = jnp.moveaxis(kernel, -1, 0)
    _, state = fq.apply(weight_fake_quant._state_for_apply(), w_pt)
    learned = weight_fake_quant.learnable and int(np.asarray(state.static_enabled)) == 0
    if not learned and hasattr(fq, "activation_post_process") and hasattr(state, "observer"):
        check_observer_state(fq.activation_post_process, state.observer, name=f"{path} (weight)")
    scale, zero_point = fq.calculate_qparams(state)
    qmin, qmax = weight_fake_quant.quant_range
    zero_point = jnp.round(jnp.asarray(zero_point)).astype(jnp.int32)
    if fq.is_per_channel:
        if fq.ch_axis not in (0, -w_pt.ndim):
            raise ValueError(f"'{path}': weight fake quants see (out_channels, ...) weights; use ch_axis=0, "
                             f"got {fq.ch_axis}")
        q = quantize_per_channel(kernel, jnp.asarray(scale, jnp.float32), zero_point, kernel.ndim - 1, qint8)
    else:
        q = quantize_per_tensor(kernel, jnp.reshape(jnp.asarray(scale, jnp.float32), ()),
                                jnp.reshape(zero_point, ()), qint8)
    data = jnp.clip(q.int_data, qmin, qmax).astype(np.int8)
    return QTensor(data, q.scale, q.zero_point, q.dtype, q.qscheme, q.axis)
