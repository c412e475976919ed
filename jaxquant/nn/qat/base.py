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

from jaxquant.nn.qat.fake_quant_module import FakeQuantModule
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
    def _from_unfused(cls, module: nnx.Module, qconfig: Any, path: str, float_type: type, fused_relu_type: type):
        """``cls(layer, qconfig, path)`` from a float ``float_type`` or a fused ReLU form wrapping one."""
        layer = getattr(module, cls._float_attr) if isinstance(module, fused_relu_type) else module
        if not isinstance(layer, float_type):
            raise TypeError(f"'{path}': {cls.__name__}.from_float needs an nnx.{float_type.__name__}, "
                            f"got {type(module).__name__}")
        return cls(layer, qconfig, path)

    def float_weights(self) -> tuple[jax.Array, Optional[jax.Array]]:
        """``(kernel, bias or None)`` that convert quantizes: the float layer's (BatchNorm forms fold it in)."""
        layer = getattr(self, self._float_attr)
        return layer.kernel.get_value(), None if layer.bias is None else layer.bias.get_value()

    def _activation(self, y: jax.Array) -> jax.Array:
        """Optional ReLU, then the output fake quant."""
        if self._relu:
            y = jax.nn.relu(y)
        if self.activation_post_process is not None:
            y = self.activation_post_process(y)
        return y
