"""Markers for where quantization starts and ends: ``QuantStub``, ``DeQuantStub``, ``QuantWrapper``.

As in PyTorch's eager mode, the float model says where activations enter the quantized region
(``QuantStub``: identity in float, an observer after ``prepare``, a quantize op after ``convert``) and
where they leave it (``DeQuantStub``).
"""
from __future__ import annotations

from typing import Any, Optional

from flax import nnx


class QuantStub(nnx.Module):
    """Identity on float input; becomes :class:`~jaxquant.nn.quantized.Quantize` after convert.

    ``qconfig`` optionally overrides the qconfig that would otherwise apply to this module.
    """

    def __init__(self, qconfig: Optional[Any] = None):
        if qconfig is not None:
            self.qconfig = qconfig

    def __call__(self, x):
        return x


class DeQuantStub(nnx.Module):
    """Identity on float input; becomes :class:`~jaxquant.nn.quantized.DeQuantize` after convert."""

    def __init__(self, qconfig: Optional[Any] = None):
        if qconfig is not None:
            self.qconfig = qconfig

    def __call__(self, x):
        return x


class QuantWrapper(nnx.Module):
    """``dequant(module(quant(x)))``: wraps a float module so it can be quantized as a whole."""

    def __init__(self, module: nnx.Module):
        self.quant = QuantStub(getattr(module, "qconfig", None))
        self.dequant = DeQuantStub(getattr(module, "qconfig", None))
        self.module = module

    def __call__(self, *args, **kwargs):
        args = tuple(self.quant(a) for a in args)
        return self.dequant(self.module(*args, **kwargs))
