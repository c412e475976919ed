"""What every quantized module shares: checking its input and reading observed qparams."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxquant.core.weights import quantize_weight
from jaxquant.dtypes import QDType, qint8, quint8
from jaxquant.nn.qat.base import QATWeightLayer
from jaxquant.nn.qat.weight_fake_quant import quantize_kernel_with_fake_quant
from jaxquant.nn.variables import QuantParams
from jaxquant.qtensor import QTensor


def require_qtensor(x: Any, module_name: str, module_type: str) -> QTensor:
    """``x`` if it is a per-tensor QTensor; otherwise a TypeError saying where and what to do."""
    if isinstance(x, QTensor):
        if x.axis is not None:
            raise ValueError(f"quantized module '{module_name}' ({module_type}) received a per-channel "
                             "QTensor; activations must be quantized per tensor")
        return x
    raise TypeError(
        f"quantized module '{module_name}' ({module_type}) received a {type(x).__name__} "
        f"({getattr(x, 'dtype', '?')}), not a quantized tensor: insert a QuantStub before it in the float "
        "model, or give it qconfig=None to keep it float"
    )


def observed_qparams(observer_module: Any, path: str) -> tuple[jax.Array, jax.Array, QDType]:
    """Concrete ``(scale, zero_point, dtype)`` from an ``ObserverModule`` (or a QAT fake-quant module:
    anything with ``checked_qparams(path)`` and ``dtype``), validated; errors name ``path``."""
    scale, zero_point = observer_module.checked_qparams(path)
    dtype = observer_module.dtype
    if dtype not in (quint8, qint8):
        raise ValueError(f"'{path}': static quantization needs quint8 or qint8 activations, "
                         f"{observer_module!r} uses {dtype!r}")
    scale = jnp.asarray(scale, jnp.float32).reshape(())
    zero_point = jnp.asarray(zero_point).astype(jnp.int32).reshape(())
    if not np.isfinite(float(scale)) or float(scale) <= 0:
        raise ValueError(f"'{path}': {observer_module!r} produced an invalid scale {float(scale)}")
    return scale, zero_point, dtype


def weight_layer_source(module: Any, path: str, float_attr: str, fused_relu_type: type):
    """What ``convert`` builds an int8 Linear/Conv from, read off an ``Observed`` float layer (or its fused
    ReLU form, holding the layer under ``float_attr``) or off a QAT layer.

    Returns ``(float layer, weight QTensor, bias float32 or None, (out scale, out zero point, out dtype),
    relu)``; the weight is quantized with the qconfig's weight observer (``Observed``) or with the
    trained weight fake quant's qparams (QAT, BatchNorm folded first).
    """
    if isinstance(module, QATWeightLayer):
        if module.activation_post_process is None:
            raise ValueError(f"'{path}': this QAT module has no output fake quant (its qconfig.activation is "
                             "None), so it has no static output qparams to convert with")
        out = observed_qparams(module.activation_post_process, path)
        kernel, bias = module.float_weights()
        weight = quantize_kernel_with_fake_quant(module.weight_fake_quant, kernel, path)
        return getattr(module, module._float_attr), weight, bias, out, module._relu
    float_module = module.module
    relu = isinstance(float_module, fused_relu_type)
    layer = getattr(float_module, float_attr) if relu else float_module
    out = observed_qparams(module.activation_post_process, path)
    weight = quantize_weight(layer.kernel.get_value(), module.qconfig, path)
    return layer, weight, None if layer.bias is None else layer.bias.get_value(), out, relu


class StaticOutputQParams(nnx.Module):
    """What ``Quantize`` and ``QFunctional`` hold alike: the static per-tensor qparams and dtype of
    their output (from the observer or fake quant that watched it), and the module path."""

    def __init__(self, scale: jax.Array, zero_point: jax.Array, dtype: QDType, name: str = ""):
        self.scale = QuantParams(jnp.asarray(scale, jnp.float32))
        self.zero_point = QuantParams(jnp.asarray(zero_point, jnp.int32))
        self.dtype = dtype
        self.name = name

    @classmethod
    def from_observed(cls, observed, path: str):
        """From a prepared module whose ``activation_post_process`` was calibrated or trained."""
        scale, zero_point, dtype = observed_qparams(observed.activation_post_process, path)
        return cls(scale, zero_point, dtype, path)


class Int8WeightLayer(nnx.Module):
    """What the static int8 Linear and Conv hold alike: the int8 weight (flax layout, output channels
    last) with per-output-channel scales and zero points, a float32 bias, and the output's qparams.
    Subclasses add their packed kernel (a ``QuantCache``) and the call."""

    def _set_weight_and_output(self, weight: QTensor, bias, out_scale, out_zero_point, out_dtype: QDType,
                               relu: bool, name: str) -> None:
        out_channels = weight.shape[-1]
        self.weight_int8 = QuantParams(weight.int_data)
        w_scale, w_zero_point = weight.channel_qparams()
        self.weight_scale = QuantParams(jnp.broadcast_to(w_scale, (out_channels,)).astype(jnp.float32))
        self.weight_zero_point = QuantParams(jnp.broadcast_to(w_zero_point, (out_channels,)).astype(jnp.int32))
        self.weight_qscheme = weight.qscheme
        self.bias = QuantParams(None if bias is None else jnp.asarray(bias, jnp.float32))
        self.out_scale = QuantParams(jnp.asarray(out_scale, jnp.float32))
        self.out_zero_point = QuantParams(jnp.asarray(out_zero_point, jnp.int32))
        self.out_dtype = out_dtype
        self.relu = bool(relu)
        self.name = name

    def weight(self) -> QTensor:
        """The int8 weight as a QTensor in flax layout (output channels last)."""
        data, scale = self.weight_int8.get_value(), self.weight_scale.get_value()
        zero_point = self.weight_zero_point.get_value()
        if self.weight_qscheme.is_per_channel:
            return QTensor(data, scale, zero_point, qint8, self.weight_qscheme, data.ndim - 1)
        return QTensor(data, scale[0], zero_point[0], qint8, self.weight_qscheme, None)
