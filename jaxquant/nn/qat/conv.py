"""QAT convolutions: ``Conv``, ``ConvReLU``, ``ConvBn``, ``ConvBnReLU`` (``torch.ao.nn.qat.Conv*d``,
``torch.ao.nn.intrinsic.qat.ConvReLU*d`` / ``ConvBn*d`` / ``ConvBnReLU*d``), for 1-D, 2-D and 3-D
(``nnx.Conv`` of any rank, NWC / NHWC / NDHWC) and grouped convolutions.

Each keeps the float ``nnx.Conv`` (and ``nnx.BatchNorm``) whose Params are trained; the kernel goes
through ``weight_fake_quant`` each call, the output through ``activation_post_process``.
``convert`` gives the int8 :class:`jaxquant.nn.quantized.Conv` (BatchNorm folded with its running
statistics first, as PyTorch's ``convert`` does).
"""
from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from jaxquant.core.conv import conv_with_kernel
from jaxquant.fusion.bn_folding import fuse_conv_bn_weights
from jaxquant.nn import intrinsic
from jaxquant.nn.qat.base import QATWeightLayer
from jaxquant.nn.qat.batchnorm_fold import fused_bn_forward
from jaxquant.nn.qat.weight_fake_quant import fake_quant_kernel

__all__ = ["Conv", "ConvReLU", "ConvBn", "ConvBnReLU", "conv_with_kernel"]


class Conv(QATWeightLayer):
    """QAT convolution: ``act_fq(relu?(conv(x, weight_fq(kernel)) + bias))``; NHWC float32 in and out."""

    _float_attr = "conv"

    def __init__(self, conv: nnx.Conv, qconfig: Any, path: str = ""):
        self._init_layer(conv, qconfig, path)

    @classmethod
    def from_float(cls, module: nnx.Module, qconfig: Any, path: str = "") -> "Conv":
        """From an ``nnx.Conv`` (or, for ``ConvReLU``, a fused ``intrinsic.ConvReLU``)."""
        return cls._from_unfused(module, qconfig, path, nnx.Conv, intrinsic.ConvReLU)

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = fake_quant_kernel(self.weight_fake_quant, self.conv.kernel.get_value())
        y = conv_with_kernel(self.conv, x, kernel)
        if self.conv.bias is not None:
            y = y + self.conv.bias.get_value()
        return self._activation(y)


class ConvReLU(Conv):
    """QAT ``ConvReLU``: ReLU before the output fake quant; converts with a fused ReLU."""

    _relu = True


class ConvBn(QATWeightLayer):
    """QAT ``ConvBn``: BatchNorm-in-the-loop convolution as PyTorch's ``ConvBn2d._forward_approximate``
    (see :mod:`jaxquant.nn.qat.batchnorm_fold`). ``freeze_bn`` (int32 ``()`` in ``QuantStats``) makes
    the BatchNorm use and keep its running statistics while training (``freeze_bn_stats``)."""

    _float_attr = "conv"

    def __init__(self, conv: nnx.Conv, bn: nnx.BatchNorm, qconfig: Any, path: str = ""):
        self._init_layer(conv, qconfig, path, bn=bn)

    @classmethod
    def from_float(cls, module: nnx.Module, qconfig: Any, path: str = "") -> "ConvBn":
        """From a fused ``intrinsic.ConvBn`` / ``intrinsic.ConvBnReLU`` (``fuse_modules_qat``)."""
        return cls(module.conv, module.bn, qconfig, path)

    def __call__(self, x: jax.Array) -> jax.Array:
        bias = None if self.conv.bias is None else self.conv.bias.get_value()
        y = fused_bn_forward(lambda x, k: conv_with_kernel(self.conv, x, k), x, self.conv.kernel.get_value(), bias,
                             self.bn, self.freeze_bn.get_value(), self.weight_fake_quant)
        return self._activation(y)

    def float_weights(self) -> tuple[jax.Array, jax.Array]:
        """Kernel and bias with the BatchNorm folded in using its running statistics (PyTorch's ``to_float``)."""
        bn = self.bn
        return fuse_conv_bn_weights(
            self.conv.kernel.get_value(), None if self.conv.bias is None else self.conv.bias.get_value(),
            bn.mean.get_value(), bn.var.get_value(), bn.epsilon,
            None if bn.scale is None else bn.scale.get_value(), None if bn.bias is None else bn.bias.get_value())


class ConvBnReLU(ConvBn):
    """QAT ``ConvBnReLU``: :class:`ConvBn` then ReLU, before the output fake quant."""

    _relu = True
