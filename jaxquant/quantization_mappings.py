"""Which float module becomes which quantized module (PyTorch's ``quantization_mappings.py``).

Plain functions returning read-only mappings: nothing global to mutate. Pass your own dict to
``prepare``/``convert`` (``mapping=``) to add or override entries.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Mapping

from flax import nnx


def get_default_static_quant_module_mappings() -> Mapping[type, type]:
    """Float (or fused) module type -> static quantized module type."""
    from jaxquant.nn import activations as act
    from jaxquant.nn import intrinsic
    from jaxquant.nn import quantized as nnq
    from jaxquant.nn.stubs import DeQuantStub, QuantStub

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
    }
    if hasattr(nnx, "InstanceNorm"):
        mappings[nnx.InstanceNorm] = nnq.InstanceNorm
    return MappingProxyType(mappings)


def get_quantized_passthrough_types() -> frozenset[type]:
    """Modules that work on quantized tensors as they are (no observer, no swap): ReLU keeps its
    input's qparams, pooling and reshapes move integers, sigmoid-like ops use fixed qparams."""
    from jaxquant.nn import activations as act
    from jaxquant.nn import pooling

    return frozenset({
        act.Identity, act.ReLU, act.ReLU6, act.Flatten, act.Sigmoid, act.Tanh, act.Hardsigmoid,
        pooling.MaxPool2d, pooling.AvgPool2d, pooling.AdaptiveAvgPool2d, nnx.Dropout,
    })
