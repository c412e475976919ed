"""QAT ``Linear``, ``LinearReLU`` and ``LinearBn`` (``torch.ao.nn.qat.Linear``,
``torch.ao.nn.intrinsic.qat.LinearReLU`` / ``LinearBn1d``).

Each keeps the float ``nnx.Linear`` (its ``kernel``/``bias`` Params are trained), fake-quantizes the
kernel through ``weight_fake_quant`` on every call and its output through
``activation_post_process``; ``to_quantized(path)`` gives the int8
:class:`jaxquant.nn.quantized.Linear` that static PTQ would give, with the fake quants' qparams.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from jaxquant.nn.qat.batchnorm_fold import fused_bn_forward
from jaxquant.nn.qat.fake_quant_module import FakeQuantModule
from jaxquant.nn.qat.weight_fake_quant import fake_quant_kernel, quantize_kernel_with_fake_quant
from jaxquant.nn.variables import QuantStats

__all__ = ["Linear", "LinearReLU", "LinearBn", "make_fake_quants"]


def make_fake_quants(qconfig: Any, kernel_shape: tuple[int, ...], path: str) -> tuple[FakeQuantModule, Optional[FakeQuantModule]]:
    """``(weight_fake_quant, activation_post_process)`` for a flax kernel of ``kernel_shape`` (out last)."""
    if qconfig is None or qconfig.weight is None:
        raise ValueError(f"'{path}': QAT needs a qconfig with a weight fake quant, e.g. get_default_qat_qconfig('x86')")
    pt_shape = (kernel_shape[-1],) + tuple(kernel_shape[:-1])
    weight_fq = FakeQuantModule(qconfig.weight(), pt_shape)
    act_fq = None if qconfig.activation is None else FakeQuantModule(qconfig.activation())
    if act_fq is not None and act_fq.fake_quant.is_per_channel:
        raise ValueError(f"'{path}': activation fake quants must be per tensor, got {act_fq.fake_quant!r}")
    return weight_fq, act_fq


def _dense(linear: nnx.Linear, x: jax.Array, kernel: jax.Array) -> jax.Array:
    # nnx.Linear's own contraction (same precision), with the fake-quantized kernel.
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=linear.precision)


def _out_qparams(module: Any, path: str):
    from jaxquant.nn.quantized.common import observed_qparams

    if module.activation_post_process is None:
        raise ValueError(f"'{path}': this QAT module has no output fake quant (its qconfig.activation is None), "
                         "so it has no static output qparams to convert with")
    return observed_qparams(module.activation_post_process, path)


class Linear(nnx.Module):
    """QAT linear: ``act_fq(relu?(x @ weight_fq(kernel) + bias))``; ``x`` float32 ``(..., in)`` ->
    float32 ``(..., out)``."""

    _relu = False

    def __init__(self, linear: nnx.Linear, qconfig: Any, path: str = ""):
        self.linear = linear
        self.qconfig = qconfig
        self.weight_fake_quant, act = make_fake_quants(qconfig, linear.kernel.get_value().shape, path)
        self.activation_post_process = nnx.data(act)

    @classmethod
    def from_float(cls, module: nnx.Module, qconfig: Any, path: str = "") -> "Linear":
        """From an ``nnx.Linear`` (or, for ``LinearReLU``, a fused ``intrinsic.LinearReLU``)."""
        from jaxquant.nn import intrinsic

        linear = module.linear if isinstance(module, intrinsic.LinearReLU) else module
        if not isinstance(linear, nnx.Linear):
            raise TypeError(f"'{path}': {cls.__name__}.from_float needs an nnx.Linear, got {type(module).__name__}")
        return cls(linear, qconfig, path)

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = fake_quant_kernel(self.weight_fake_quant, self.linear.kernel.get_value())
        y = _dense(self.linear, x, kernel)
        if self.linear.bias is not None:
            y = y + self.linear.bias.get_value()
        if self._relu:
            y = jax.nn.relu(y)
        if self.activation_post_process is not None:
            y = self.activation_post_process(y)
        return y

    def _float_weights(self) -> tuple[jax.Array, Optional[jax.Array]]:
        bias = None if self.linear.bias is None else self.linear.bias.get_value()
        return self.linear.kernel.get_value(), bias

    def to_quantized(self, path: str):
        """The int8 :class:`jaxquant.nn.quantized.Linear` (weight quantized with ``weight_fake_quant``'s qparams)."""
        from jaxquant.nn.quantized import Linear as QLinear

        out_scale, out_zp, out_dtype = _out_qparams(self, path)
        kernel, bias = self._float_weights()
        weight = quantize_kernel_with_fake_quant(self.weight_fake_quant, kernel, path)
        return QLinear(weight, bias, out_scale, out_zp, out_dtype, relu=self._relu, name=path)


class LinearReLU(Linear):
    """QAT ``LinearReLU``: ReLU before the output fake quant; converts to a quantized Linear with ``relu=True``."""

    _relu = True


class LinearBn(nnx.Module):
    """QAT ``LinearBn1d``: BatchNorm-in-the-loop linear (see :mod:`jaxquant.nn.qat.batchnorm_fold`);
    ``(N, in)`` -> ``(N, out)`` float32. ``freeze_bn`` (int32 in ``QuantStats``) switches to running statistics."""

    def __init__(self, linear: nnx.Linear, bn: nnx.BatchNorm, qconfig: Any, path: str = ""):
        self.linear = linear
        self.bn = bn
        self.qconfig = qconfig
        self.freeze_bn = QuantStats(jnp.zeros((), jnp.int32))
        self.weight_fake_quant, act = make_fake_quants(qconfig, linear.kernel.get_value().shape, path)
        self.activation_post_process = nnx.data(act)

    @classmethod
    def from_float(cls, module: nnx.Module, qconfig: Any, path: str = "") -> "LinearBn":
        """From a fused ``intrinsic.LinearBn`` (``fuse_modules_qat``)."""
        return cls(module.linear, module.bn, qconfig, path)

    def __call__(self, x: jax.Array) -> jax.Array:
        bias = None if self.linear.bias is None else self.linear.bias.get_value()
        y = fused_bn_forward(lambda x, k: _dense(self.linear, x, k), x, self.linear.kernel.get_value(), bias,
                             self.bn, self.freeze_bn.get_value(), self.weight_fake_quant)
        if self.activation_post_process is not None:
            y = self.activation_post_process(y)
        return y

    def to_quantized(self, path: str):
        """int8 :class:`jaxquant.nn.quantized.Linear` with the BatchNorm folded using its running statistics."""
        from jaxquant.fusion.bn_folding import fuse_linear_bn_weights
        from jaxquant.nn.quantized import Linear as QLinear

        out_scale, out_zp, out_dtype = _out_qparams(self, path)
        bn = self.bn
        kernel, bias = fuse_linear_bn_weights(
            self.linear.kernel.get_value(), None if self.linear.bias is None else self.linear.bias.get_value(),
            bn.mean.get_value(), bn.var.get_value(), bn.epsilon,
            None if bn.scale is None else bn.scale.get_value(), None if bn.bias is None else bn.bias.get_value())
        weight = quantize_kernel_with_fake_quant(self.weight_fake_quant, kernel, path)
        return QLinear(weight, bias, out_scale, out_zp, out_dtype, relu=False, name=path)
