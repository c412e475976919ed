"""Linen ``QuantStub``, ``DeQuantStub`` and ``FloatFunctional``: identity / plain float ops in a float
model, which the ``jaxquant.linen`` interceptor observes (prepare), fake-quantizes (QAT) or turns into
quantize-dequantize at the calibrated qparams (convert).

Activations between Linen layers stay float (each quantized layer quantizes its own input), so a
``QuantStub`` here puts its output on the int8 grid rather than handing integers on."""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn


class QuantStub(nn.Module):
    """Identity on float input; observed by prepare, quantize-dequantize after convert."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return x


class DeQuantStub(nn.Module):
    """Identity (outputs of converted Linen layers are already float)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return x


FLOAT_FUNCTIONAL_OPS = ("add", "add_relu", "mul", "cat", "matmul", "add_scalar", "mul_scalar")
# PyTorch does not observe add_scalar / mul_scalar: their output qparams follow from the input's
UNOBSERVED_OPS = ("add_scalar", "mul_scalar")


def float_functional_op(op: str, *args, axis: int = 0) -> jax.Array:
    """The float result of a ``FloatFunctional`` op."""
    if op == "add":
        return args[0] + args[1]
    if op == "add_relu":
        return jax.nn.relu(args[0] + args[1])
    if op == "mul":
        return args[0] * args[1]
    if op == "cat":
        return jnp.concatenate(list(args[0]), axis=axis)
    if op == "matmul":
        return jnp.matmul(args[0], args[1])
    if op == "add_scalar":
        return args[0] + args[1]
    if op == "mul_scalar":
        return args[0] * args[1]
    raise ValueError(f"FloatFunctional: unknown op {op!r}; use one of {FLOAT_FUNCTIONAL_OPS}")


class FloatFunctional(nn.Module):
    """Element-wise ops with their own output observer (one instance per call site), as PyTorch's
    ``FloatFunctional``: ``ff.add(x, y)``, ``add_relu``, ``mul``, ``cat(xs, axis)``, ``matmul``,
    ``add_scalar``, ``mul_scalar``. All go through ``__call__(op, ...)`` so one method is intercepted."""

    @nn.compact
    def __call__(self, op: str, *args, axis: int = 0) -> jax.Array:
        return float_functional_op(op, *args, axis=axis)

    def add(self, x, y):
        return self("add", x, y)

    def add_relu(self, x, y):
        return self("add_relu", x, y)

    def mul(self, x, y):
        return self("mul", x, y)

    def cat(self, xs: Sequence[jax.Array], axis: int = 0):
        return self("cat", tuple(xs), axis=axis)

    def matmul(self, x, y):
        return self("matmul", x, y)

    def add_scalar(self, x, y: float):
        return self("add_scalar", x, y)

    def mul_scalar(self, x, y: float):
        return self("mul_scalar", x, y)
