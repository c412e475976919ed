"""Fused float modules, the analogue of ``torch.ao.nn.intrinsic``.

``fuse_modules`` puts these in a model to mark layers that are quantized as one unit: a ``ConvReLU``
becomes one int8 conv with the ReLU folded into its output clamp. In float they compute exactly what
their parts compute in sequence. One class serves 1-D, 2-D and 3-D convolutions because ``nnx.Conv``
does; parts are named attributes (``conv``/``linear``, ``bn``, ``relu``) and, as in PyTorch's
``nn.Sequential``-based versions, also reachable by index (``fused[0]`` is the conv).

``ConvBn``, ``ConvBnReLU`` and ``LinearBn`` keep the BatchNorm unfolded: they are what
``fuse_modules_qat`` produces, for QAT modules that fold the BatchNorm in their forward pass.
"""
from __future__ import annotations

from typing import ClassVar, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from jaxquant.nn.activations import ReLU

__all__ = ["FusedModule", "ConvReLU", "LinearReLU", "BNReLU", "ConvBn", "ConvBnReLU", "LinearBn"]


def _type_name(t: type) -> str:
    if t.__module__.startswith("flax."):
        return "nnx." + t.__qualname__
    if t.__module__.startswith("jaxquant.nn."):
        return "jaxquant.nn." + t.__qualname__
    return f"{t.__module__}.{t.__qualname__}"


class FusedModule(nnx.Module):
    """Base of the fused modules: applies the parts named in ``_parts`` in order."""

    _parts: ClassVar[tuple[str, ...]] = ()
    _part_types: ClassVar[tuple[type, ...]] = ()

    def __init__(self, *modules: nnx.Module):
        name = type(self).__name__
        if len(modules) != len(self._parts) or not all(
                isinstance(m, t) for m, t in zip(modules, self._part_types)):
            expected = ", ".join(_type_name(t) for t in self._part_types)
            got = ", ".join(type(m).__name__ for m in modules)
            raise TypeError(f"{name} takes ({expected}); got ({got})")
        for attr, module in zip(self._parts, modules):
            setattr(self, attr, module)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x`` through every part in order; shapes and dtypes are those of the parts."""
        for attr in self._parts:
            x = getattr(self, attr)(x)
        return x

    def __getitem__(self, index: int) -> nnx.Module:
        return getattr(self, self._parts[index])

    def __len__(self) -> int:
        return len(self._parts)


class ConvReLU(FusedModule):
    """``relu(conv(x))``; ``conv`` is an ``nnx.Conv`` of any spatial rank (NHWC / NWC / NDHWC)."""

    _parts = ("conv", "relu")
    _part_types = (nnx.Conv, ReLU)

    def __init__(self, conv: nnx.Conv, relu: ReLU):
        super().__init__(conv, relu)


class LinearReLU(FusedModule):
    """``relu(linear(x))`` for an ``nnx.Linear``."""

    _parts = ("linear", "relu")
    _part_types = (nnx.Linear, ReLU)

    def __init__(self, linear: nnx.Linear, relu: ReLU):
        super().__init__(linear, relu)


class BNReLU(FusedModule):
    """``relu(bn(x))`` for an ``nnx.BatchNorm`` (features on the last axis)."""

    _parts = ("bn", "relu")
    _part_types = (nnx.BatchNorm, ReLU)

    def __init__(self, bn: nnx.BatchNorm, relu: ReLU):
        super().__init__(bn, relu)


class ConvBn(FusedModule):
    """``bn(conv(x))`` with the BatchNorm kept separate (for QAT; eval fusion folds it instead)."""

    _parts = ("conv", "bn")
    _part_types = (nnx.Conv, nnx.BatchNorm)

    def __init__(self, conv: nnx.Conv, bn: nnx.BatchNorm):
        super().__init__(conv, bn)


class ConvBnReLU(FusedModule):
    """``relu(bn(conv(x)))`` with the BatchNorm kept separate (for QAT)."""

    _parts = ("conv", "bn", "relu")
    _part_types = (nnx.Conv, nnx.BatchNorm, ReLU)

    def __init__(self, conv: nnx.Conv, bn: nnx.BatchNorm, relu: ReLU):
        super().__init__(conv, bn, relu)


class LinearBn(FusedModule):
    """``bn(linear(x))`` with the BatchNorm kept separate (for QAT)."""

    _parts = ("linear", "bn")
    _part_types = (nnx.Linear, nnx.BatchNorm)

    def __init__(self, linear: nnx.Linear, bn: nnx.BatchNorm):
        super().__init__(linear, bn)


def unwrap_linear_relu(module: nnx.Module) -> tuple[nnx.Linear, bool]:
    """``(linear, relu)`` for an ``nnx.Linear`` or a fused ``LinearReLU``."""
    if isinstance(module, LinearReLU):
        return module.linear, True
    return module, False


def float_linear_arrays(linear: nnx.Linear, path: str) -> tuple[jax.Array, Optional[jax.Array]]:
    """The float32 kernel ``(K, N)`` and bias ``(N,)`` (or None) of an ``nnx.Linear``."""
    if not isinstance(linear, nnx.Linear):
        raise TypeError(f"'{path}': expected an nnx.Linear, got {type(linear).__name__}")
    kernel = jnp.asarray(linear.kernel.get_value(), jnp.float32)
    bias = None if linear.bias is None else jnp.asarray(linear.bias.get_value(), jnp.float32)
    return kernel, bias
