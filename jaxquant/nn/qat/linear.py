"""QAT ``Linear``, ``LinearReLU`` and ``LinearBn`` (``torch.ao.nn.qat.Linear``,
``torch.ao.nn.intrinsic.qat.LinearReLU`` / ``LinearBn1d``).

Each keeps the float ``nnx.Linear`` (its ``kernel``/``bias`` Params are trained), fake-quantizes the
kernel through ``weight_fake_quant`` on every call and its output through
``activation_post_process``; ``convert`` gives the int8 :class:`jaxquant.nn.quantized.Linear` that
static PTQ would give, with the fake quants' qparams.
"""
from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from jaxquant.fusion.bn_folding import fuse_linear_bn_weights
from jaxquant.nn import intrinsic
from jaxquant.nn.qat.base import QATWeightLayer, make_fake_quants

__all__ = ["Linear", "LinearReLU", "LinearBn", "make_fake_quants"]


class Linear(QATWeightLayer):
    """QAT linear: ``act_fq(relu?(x @ weight_fq(kernel) + bias))``; ``x`` float32 ``(..., in)`` ->
    float32 ``(..., out)``. From an ``nnx.Linear`` (or, for ``LinearReLU``, a fused ``intrinsic.LinearReLU``)."""

    _float_attr, _float_type, _fused_relu_type = "linear", nnx.Linear, intrinsic.LinearReLU

    def __init__(self, linear: nnx.Linear, qconfig: Any, path: str = ""):
        self._init_layer(linear, qconfig, path)

    def _op(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
        # nnx.Linear's own contraction (same precision), with the fake-quantized kernel.
        return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=self.linear.precision)


class LinearReLU(Linear):
    """QAT ``LinearReLU``: ReLU before the output fake quant; converts to a quantized Linear with ``relu=True``."""

    _relu = True


class LinearBn(Linear):
    """QAT ``LinearBn1d``: BatchNorm-in-the-loop linear (see :mod:`jaxquant.nn.qat.batchnorm_fold`) from a fused
    ``intrinsic.LinearBn``; ``(N, in)`` -> ``(N, out)`` float32. ``freeze_bn`` (int32 in ``QuantStats``) switches
    to running statistics; convert folds the BatchNorm with them."""

    _fold_bn = staticmethod(fuse_linear_bn_weights)

    def __init__(self, linear: nnx.Linear, bn: nnx.BatchNorm, qconfig: Any, path: str = ""):
        self._init_layer(linear, qconfig, path, bn=bn)
