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

__all__ = ["Conv", "ConvReLU", "ConvBn", "ConvBnReLU", "conv_with_kernel"]


class Conv(QATWeightLayer):
    """QAT convolution: ``act_fq(relu?(conv(x, weight_fq(kernel)) + bias))``; NHWC float32 in and out. From an
    ``nnx.Conv`` (or, for ``ConvReLU``, a fused ``intrinsic.ConvReLU``)."""

    _float_attr, _float_type, _fused_relu_type = "conv", nnx.Conv, intrinsic.ConvReLU

    def __init__(self, conv: nnx.Conv, qconfig: Any, path: str = ""):
        self._init_layer(conv, qconfig, path)

    def _op(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
        return conv_with_kernel(self.conv, x, kernel)


class ConvReLU(Conv):
    """QAT ``ConvReLU``: ReLU before the output fake quant; converts with a fused ReLU."""

    _relu = True


class ConvBn(Conv):
    """QAT ``ConvBn``: BatchNorm-in-the-loop convolution as PyTorch's ``ConvBn2d._forward_approximate``
    (see :mod:`jaxquant.nn.qat.batchnorm_fold`), from a fused ``intrinsic.ConvBn`` / ``ConvBnReLU``.
    ``freeze_bn`` (int32 ``()`` in ``QuantStats``) makes the BatchNorm use and keep its running statistics
    while training (``freeze_bn_stats``); convert folds the BatchNorm with them."""

    _fold_bn = staticmethod(fuse_conv_bn_weights)

    def __init__(self, conv: nnx.Conv, bn: nnx.BatchNorm, qconfig: Any, path: str = ""):
        self._init_layer(conv, qconfig, path, bn=bn)


class ConvBnReLU(ConvBn):
    """QAT ``ConvBnReLU``: :class:`ConvBn` then ReLU, before the output fake quant."""

    _relu = True
