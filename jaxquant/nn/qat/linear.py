"""QAT ``Linear``, ``LinearReLU`` and ``LinearBn`` (``torch.ao.nn.qat.Linear``,
``torch.ao.nn.intrinsic.qat.LinearReLU`` / ``LinearBn1d``).

Each keeps the float ``nnx.Linear`` (its ``kernel``/``bias`` Params are trained), fake-quantizes the
kernel through ``weight_fake_quant`` on every call and its output through
``activation_post_process``; ``convert`` gives the int8 :class:`jaxquant.nn.quantized.Linear` that
static PTQ would give, with the fake quants' qparams.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
from flax import nnx

from jaxquant.fusion.bn_folding import fuse_linear_bn_weights
from jaxquant.nn import intrinsic
from jaxquant.nn.qat.base import QATWeightLayer, make_fake_quants
from jaxquant.nn.qat.batchnorm_fold import fused_bn_forward
from jaxquant.nn.qat.weight_fake_quant import fake_quant_kernel

__all__ = ["Linear", "LinearReLU", "LinearBn", "make_fake_quants"]


def _dense(linear: nnx.Linear, x: jax.Array, kernel: jax.Array) -> jax.Array:
    # nnx.Linear's own contraction (same precision), with the fake-quantized kernel.
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=linear.precision)


class Linear(QATWeightLayer):
    """QAT linear: ``act_fq(relu?(x @ weight_fq(kernel) + bias))``; ``x`` float32 ``(..., in)`` ->
    float32 ``(..., out)``."""

    _float_attr = "linear"

    def __init__(self, linear: nnx.Linear, qconfig: Any, path: str = ""):
        self._init_layer(linear, qconfig, path)

    @classmethod
    def from_float(cls, module: nnx.Module, qconfig: Any, path: str = "") -> "Linear":
        """From an ``nnx.Linear`` (or, for ``LinearReLU``, a fused ``intrinsic.LinearReLU``)."""
        return cls._from_unfused(module, qconfig, path, nnx.Linear, intrinsic.LinearReLU)

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = fake_quant_kernel(self.weight_fake_quant, self.linear.kernel.get_value())
        y = _dense(self.linear, x, kernel)
        if self.linear.bias is not None:
            y = y + self.linear.bias.get_value()
        return self._activation(y)


class LinearReLU(Linear):
    """QAT ``LinearReLU``: ReLU before the output fake quant; converts to a quantized Linear with ``relu=True``."""

    _relu = True


class LinearBn(QATWeightLayer):
    """QAT ``LinearBn1d``: BatchNorm-in-the-loop linear (see :mod:`jaxquant.nn.qat.batchnorm_fold`);
    ``(N, in)`` -> ``(N, out)`` float32. ``freeze_bn`` (int32 in ``QuantStats``) switches to running statistics."""

    _float_attr = "linear"

    def __init__(self, linear: nnx.Linear, bn: nnx.BatchNorm, qconfig: Any, path: str = ""):
        self._init_layer(linear, qconfig, path, bn=bn)

    @classmethod
    def from_float(cls, module: nnx.Module, qconfig: Any, path: str = "") -> "LinearBn":
        """From a fused ``intrinsic.LinearBn`` (``fuse_modules_qat``)."""
        return cls(module.linear, module.bn, qconfig, path)

    def __call__(self, x: jax.Array) -> jax.Array:
        bias = None if self.linear.bias is None else self.linear.bias.get_value()
        y = fused_bn_forward(lambda x, k: _dense(self.linear, x, k), x, self.linear.kernel.get_value(), bias,
                             self.bn, self.freeze_bn.get_value(), self.weight_fake_quant)
        return self._activation(y)

    def float_weights(self) -> tuple[jax.Array, Optional[jax.Array]]:
        """Kernel and bias with the BatchNorm folded in using its running statistics."""
        bn = self.bn
        return fuse_linear_bn_weights(
            self.linear.kernel.get_value(), None if self.linear.bias is None else self.linear.bias.get_value(),
            bn.mean.get_value(), bn.var.get_value(), bn.epsilon,
            None if bn.scale is None else bn.scale.get_value(), None if bn.bias is None else bn.bias.get_value())
