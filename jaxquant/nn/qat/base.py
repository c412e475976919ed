"""What the QAT Linear and Conv modules (and their ReLU / BatchNorm forms) hold alike.

The float layer whose Params are trained (under ``linear`` or ``conv``), optionally its BatchNorm with
a ``freeze_bn`` flag, the qconfig, a weight fake quant sized for the kernel and an optional output fake
quant. ``convert`` reads the weights through :meth:`QATWeightLayer.float_weights` and the output qparams
from the output fake quant (:func:`jaxquant.nn.quantized.common.weight_layer_source`).
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from jaxquant.nn.qat.batchnorm_fold import fused_bn_forward
from jaxquant.nn.qat.fake_quant_module import FakeQuantModule
from jaxquant.nn.qat.weight_fake_quant import fake_quant_kernel
from jaxquant.nn.variables import QuantStats

__all__ = ["QATWeightLayer", "make_fake_quants"]


def make_fake_quants(qconfig: Any, kernel_shape: tuple[int, ...], path: str) -> tuple[FakeQuantModule, Optional[FakeQuantModule]]:
    """``(weight_fake_quant, activation_post_process)`` for a flax kernel of ``kernel_shape`` (out last)."""
    if qconfig is None or qconfig.weight is None:
        raise ValueError(f"'{path}': QAT needs a qconfig with a weight fake quant, e.g. get_default_qat_qconfig('x86')")
    # weight fake quants see PyTorch's (out, ...) layout, so per-channel statistics match PyTorch's
    pt_shape = (kernel_shape[-1],) + tuple(kernel_shape[:-1])
    weight_fq = FakeQuantModule(qconfig.weight(), pt_shape)
    act_fq = None if qconfig.activation is None else FakeQuantModule(qconfig.activation())
    if act_fq is not None and act_fq.fake_quant.is_per_channel:
        raise ValueError(f"'{path}': activation fake quants must be per tensor, got {act_fq.fake_quant!r}")
    return weight_fq, act_fq


class QATWeightLayer(nnx.Module):
    """Base of the QAT weight layers. Subclasses set ``_float_attr`` (``"linear"`` / ``"conv"``: the
    attribute holding the float layer) and ``_relu``, and call :meth:`_init_layer` from ``__init__``."""

    _float_attr = ""
    _float_type: type = nnx.Module
    _fused_relu_type: type = type(None)
    _fold_bn = None  # staticmethod(fuse_*_bn_weights) in the BatchNorm forms
    _relu = False

    def _init_layer(self, layer: nnx.Module, qconfig: Any, path: str, bn: Optional[nnx.BatchNorm] = None) -> None:
        setattr(self, self._float_attr, layer)
        if bn is not None:
            self.bn = bn
        self.qconfig = qconfig
        if bn is not None:
            # int32 in QuantStats so freeze_bn_stats never retraces a jitted step
            self.freeze_bn = QuantStats(jnp.zeros((), jnp.int32))
        self.weight_fake_quant, act = make_fake_quants(qconfig, layer.kernel.get_value().shape, path)
        self.activation_post_process = nnx.data(act)

    @classmethod
    def from_float(cls, module: nnx.Module, qconfig: Any, path: str = ""):
        """From the float layer (``_float_type``) or its fused ReLU form (``_fused_relu_type``); the
        BatchNorm forms from a fused ``intrinsic.*Bn*`` (``fuse_modules_qat``)."""
        if cls._fold_bn is not None:
            return cls(getattr(module, cls._float_attr), module.bn, qconfig, path)
        layer = getattr(module, cls._float_attr) if isinstance(module, cls._fused_relu_type) else module
        if not isinstance(layer, cls._float_type):
            raise TypeError(f"'{path}': {cls.__name__}.from_float needs an nnx.{cls._float_type.__name__}, "
                            f"got {type(module).__name__}")
        return cls(layer, qconfig, path)

    def _op(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
        """The float layer's op on ``x`` with ``kernel`` in place of its own (no bias)."""
        raise NotImplementedError

    def __call__(self, x: jax.Array) -> jax.Array:
        layer = getattr(self, self._float_attr)
        bias = None if layer.bias is None else layer.bias.get_value()
        if self._fold_bn is not None:
            y = fused_bn_forward(self._op, x, layer.kernel.get_value(), bias, self.bn, self.freeze_bn.get_value(),
                                 self.weight_fake_quant)
        else:
            y = self._op(x, fake_quant_kernel(self.weight_fake_quant, layer.kernel.get_value()))
            if bias is not None:
                y = y + bias
        return self._activation(y)

    def float_weights(self) -> tuple[jax.Array, Optional[jax.Array]]:
        """``(kernel, bias or None)`` that convert quantizes: the float layer's, with the BatchNorm folded in
        using its running statistics for the BatchNorm forms (PyTorch's ``to_float``)."""
        layer = getattr(self, self._float_attr)
        kernel, bias = layer.kernel.get_value(), None if layer.bias is None else layer.bias.get_value()
        if self._fold_bn is None:
            return kernel, bias
        bn = self.bn
        return self._fold_bn(kernel, bias, bn.mean.get_value(), bn.var.get_value(), bn.epsilon,
                             None if bn.scale is None else bn.scale.get_value(),
                             None if bn.bias is None else bn.bias.get_value())

    def _activation(self, y: jax.Array) -> jax.Array:
        """Optional ReLU, then the output fake quant."""
        if self._relu:
            y = jax.nn.relu(y)
        if self.activation_post_process is not None:
            y = self.activation_post_process(y)
        return y
