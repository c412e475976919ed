"""Every module-swap table of the eager NNX transforms (PyTorch's ``quantization_mappings.py``).

Plain functions returning read-only mappings: nothing global to mutate. Pass your own dict to
``prepare``/``prepare_qat``/``convert``/``quantize_dynamic`` (``mapping=``) to add or override entries.

``convert`` has one protocol: ``mapping[type].from_observed(module, path)``, where ``module`` is an
``Observed`` (keyed by the type of the float module it wraps), a QAT module, a prepared
``FloatFunctional`` or an ``nnx.Dropout``; so the static mapping also maps the QAT types to the
quantized ones, as PyTorch's ``DEFAULT_STATIC_QUANT_MODULE_MAPPINGS`` does.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Mapping

from flax import nnx

from jaxquant.dtypes import bfloat16, float16, qint8, quint8
from jaxquant.nn import activations as act
from jaxquant.nn import dynamic as nnqd
from jaxquant.nn import intrinsic, pooling
from jaxquant.nn import qat as nnqat
from jaxquant.nn import quantized as nnq
from jaxquant.nn.functional_modules import FloatFunctional
from jaxquant.nn.stubs import DeQuantStub, QuantStub

__all__ = ["get_default_static_quant_module_mappings", "get_default_qat_module_mappings",
           "get_default_dynamic_quant_module_mappings", "get_dynamic_weight_dtypes", "get_quantized_passthrough_types",
           "DYNAMIC_DEFAULT_TYPES"]


def get_default_static_quant_module_mappings() -> Mapping[type, type]:
    """Float (or fused, or QAT) module type -> static quantized module type."""
    mappings = {
        QuantStub: nnq.Quantize,
        DeQuantStub: nnq.DeQuantize,
        nnx.Linear: nnq.Linear,
        intrinsic.LinearReLU: nnq.Linear,
        nnx.Conv: nnq.Conv,
        intrinsic.ConvReLU: nnq.Conv,
        nnx.ConvTranspose: nnq.ConvTranspose,
        nnx.BatchNorm: nnq.BatchNorm,
        intrinsic.BNReLU: nnq.BNReLU,
        nnx.LayerNorm: nnq.LayerNorm,
        nnx.GroupNorm: nnq.GroupNorm,
        act.Hardswish: nnq.Hardswish,
        act.ELU: nnq.ELU,
        act.LeakyReLU: nnq.LeakyReLU,
        act.GELU: nnq.GELU,
        # what convert swaps besides Observed wrappers
        FloatFunctional: nnq.QFunctional,
        nnx.Dropout: nnq.Dropout,
        nnqat.Linear: nnq.Linear,
        nnqat.LinearReLU: nnq.Linear,
        nnqat.LinearBn: nnq.Linear,
        nnqat.Conv: nnq.Conv,
        nnqat.ConvReLU: nnq.Conv,
        nnqat.ConvBn: nnq.Conv,
        nnqat.ConvBnReLU: nnq.Conv,
    }
    if hasattr(nnx, "InstanceNorm"):
        mappings[nnx.InstanceNorm] = nnq.InstanceNorm
    return MappingProxyType(mappings)


def get_default_qat_module_mappings() -> Mapping[type, type]:
    """Float (or fused) module type -> QAT module type (PyTorch's ``DEFAULT_QAT_MODULE_MAPPINGS``)."""
    return MappingProxyType({
        nnx.Linear: nnqat.Linear,
        intrinsic.LinearReLU: nnqat.LinearReLU,
        intrinsic.LinearBn: nnqat.LinearBn,
        nnx.Conv: nnqat.Conv,
        intrinsic.ConvReLU: nnqat.ConvReLU,
        intrinsic.ConvBn: nnqat.ConvBn,
        intrinsic.ConvBnReLU: nnqat.ConvBnReLU,
    })


def get_default_dynamic_quant_module_mappings() -> Mapping[type, type]:
    """Float module type -> dynamic module type (each has ``from_float(module, qconfig, path)``).

    The dynamic ``Linear`` and the cells pick the int8, float16 or bfloat16 weight variant from
    the qconfig's weight dtype, as PyTorch's ``nnqd.Linear.from_float`` does.
    """
    return MappingProxyType({
        nnx.Linear: nnqd.Linear,
        intrinsic.LinearReLU: nnqd.Linear,
        nnx.LinearGeneral: nnqd.LinearGeneral,
        nnx.Einsum: nnqd.Einsum,
        nnx.LSTMCell: nnqd.LSTMCell,
        nnx.OptimizedLSTMCell: nnqd.LSTMCell,
        nnx.GRUCell: nnqd.GRUCell,
        nnx.Embed: nnqd.Embedding,
    })


def get_dynamic_weight_dtypes() -> Mapping[type, tuple]:
    """Dynamic module type -> the weight dtypes its ``from_float`` takes."""
    linear_like = (qint8, float16, bfloat16)
    return MappingProxyType({nnqd.Linear: linear_like, nnqd.LinearGeneral: linear_like, nnqd.Einsum: linear_like,
                             nnqd.LSTMCell: linear_like, nnqd.GRUCell: linear_like, nnqd.Embedding: (quint8,)})


def DYNAMIC_DEFAULT_TYPES(dtype) -> frozenset:  # noqa: N802 - reads like PyTorch's default sets
    """The module types ``quantize_dynamic(qconfig_spec=None)`` quantizes for ``dtype`` (PyTorch's defaults:
    Linear and recurrent cells for qint8/float16, embeddings for quint8)."""
    if dtype in (qint8, float16, bfloat16):
        return frozenset(get_default_dynamic_quant_module_mappings()) - {nnx.Embed}
    if dtype == quint8:
        return frozenset({nnx.Embed})
    raise ValueError(f"quantize_dynamic: don't know how to quantize with default settings for {dtype!r}; use "
                     "qint8, float16, bfloat16 or quint8, or give a full qconfig_spec")


def get_quantized_passthrough_types() -> frozenset[type]:
    """Modules that work on quantized tensors as they are (no observer, no swap at prepare): ReLU keeps
    its input's qparams, pooling and reshapes move integers, sigmoid-like ops use fixed qparams."""
    return frozenset({
        act.Identity, act.ReLU, act.ReLU6, act.Flatten, act.Sigmoid, act.Tanh, act.Hardsigmoid,
        pooling.MaxPool2d, pooling.AvgPool2d, pooling.AdaptiveAvgPool2d, nnx.Dropout,
    })
