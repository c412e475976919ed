"""Quantized modules that compute in float between a dequantize and a quantize.

Normalisations and smooth activations (BatchNorm, LayerNorm, GroupNorm, InstanceNorm, Hardswish,
ELU, LeakyReLU, GELU, BNReLU) keep their float parameters, as PyTorch's quantized versions do; the
input is dequantized, the float module runs, and the result is quantized with the output qparams
calibrated by the observer. XLA fuses the three steps into one loop.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxquant.core.conv import conv_padding, spatial_tuple
from jaxquant.core.weights import quantize_weight
from jaxquant.dtypes import QDType
from jaxquant.nn.quantized.common import observed_qparams, require_qtensor
from jaxquant.nn.variables import QuantParams
from jaxquant.qtensor import QTensor, dequantize, quantize_per_tensor


class FloatOpQuantized(nnx.Module):
    """``quantize(module(dequantize(x)), out_scale, out_zero_point)`` for a float ``module``."""

    def __init__(self, module: nnx.Module, out_scale: jax.Array, out_zero_point: jax.Array,
                 out_dtype: QDType, name: str = ""):
        self.module = module
        self.out_scale = QuantParams(jnp.asarray(out_scale, jnp.float32))
        self.out_zero_point = QuantParams(jnp.asarray(out_zero_point, jnp.int32))
        self.out_dtype = out_dtype
        self.name = name

    @classmethod
    def from_observed(cls, observed, path: str):
        out_scale, out_zp, out_dtype = observed_qparams(observed.activation_post_process, path)
        return cls(observed.module, out_scale, out_zp, out_dtype, path)

    def __call__(self, x) -> QTensor:
        x = require_qtensor(x, self.name, f"quantized {type(self).__name__}")
        y = self.module(dequantize(x))
        return quantize_per_tensor(y, self.out_scale.get_value(), self.out_zero_point.get_value(),
                                   self.out_dtype)


class BatchNorm(FloatOpQuantized):
    """Always normalises with the running statistics, as ``torch.ao.nn.quantized.BatchNorm2d``: an
    int8 model switched to ``.train()`` must not start using (and updating) batch statistics."""

    def __call__(self, x) -> QTensor:
        x = require_qtensor(x, self.name, "quantized BatchNorm")
        y = self.module(dequantize(x), use_running_average=True)
        return quantize_per_tensor(y, self.out_scale.get_value(), self.out_zero_point.get_value(),
                                   self.out_dtype)


class LayerNorm(FloatOpQuantized):
    pass


class GroupNorm(FloatOpQuantized):
    pass


class InstanceNorm(FloatOpQuantized):
    pass


class Hardswish(FloatOpQuantized):
    pass


class ELU(FloatOpQuantized):
    pass


class LeakyReLU(FloatOpQuantized):
    pass


class GELU(FloatOpQuantized):
    pass


class BNReLU(FloatOpQuantized):
    pass


class ConvTranspose(nnx.Module):
    """Quantized ``nnx.ConvTranspose`` with an int8 weight, computed in float on the dequantized weight.

    The weight is stored as int8 (so the layer is 4x smaller) but, unlike ``Conv``, the arithmetic is
    float32: XLA:CPU has no fast integer transposed convolution. Supports flax's 'SAME'/'VALID'/explicit
    padding, strides, kernel dilation and ``transpose_kernel``.
    """

    def __init__(self, weight: QTensor, bias, out_scale, out_zero_point, out_dtype: QDType, *, strides,
                 padding, kernel_dilation, transpose_kernel: bool, name: str = ""):
        self.weight_q = QuantParams(weight)
        self.bias = QuantParams(None if bias is None else jnp.asarray(bias, jnp.float32))
        self.out_scale = QuantParams(jnp.asarray(out_scale, jnp.float32))
        self.out_zero_point = QuantParams(jnp.asarray(out_zero_point, jnp.int32))
        self.out_dtype = out_dtype
        self.strides, self.padding, self.kernel_dilation = strides, padding, kernel_dilation
        self.transpose_kernel = transpose_kernel
        self.name = name

    @classmethod
    def from_observed(cls, observed, path: str) -> "ConvTranspose":
        conv = observed.module
        if isinstance(conv.padding, str) and conv.padding.upper() == "CIRCULAR":
            raise ValueError(f"'{path}': CIRCULAR padding is not supported for quantized ConvTranspose")
        if getattr(conv, "mask", None) is not None:
            raise ValueError(f"'{path}': masked transposed convolutions are not supported")
        out_scale, out_zp, out_dtype = observed_qparams(observed.activation_post_process, path)
        nd = len(conv.kernel_size)
        weight = quantize_weight(conv.kernel.get_value(), observed.qconfig, path)
        bias = None if conv.bias is None else conv.bias.get_value()
        return cls(weight, bias, out_scale, out_zp, out_dtype, strides=spatial_tuple(conv.strides, nd),
                   padding=conv_padding(conv, path), kernel_dilation=spatial_tuple(conv.kernel_dilation, nd),
                   transpose_kernel=conv.transpose_kernel, name=path)

    def __call__(self, x) -> QTensor:
        x = require_qtensor(x, self.name, "quantized ConvTranspose")
        y = jax.lax.conv_transpose(dequantize(x), dequantize(self.weight_q.get_value()), self.strides,
                                   self.padding, rhs_dilation=self.kernel_dilation,
                                   transpose_kernel=self.transpose_kernel)
        bias = self.bias.get_value()
        if bias is not None:
            y = y + bias
        return quantize_per_tensor(y, self.out_scale.get_value(), self.out_zero_point.get_value(),
                                   self.out_dtype)
