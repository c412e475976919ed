"""``FloatFunctional``: element-wise ops (add, mul, cat, ...) as a module, so they can be observed
and later swapped for their quantized version (``QFunctional``), as in PyTorch's eager mode.

Use one ``FloatFunctional`` per call site (each gets its own output observer)."""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx


class FloatFunctional(nnx.Module):
    """Float ops whose outputs pass through ``activation_post_process`` (``None`` until prepare)."""

    def __init__(self):
        self.activation_post_process: Optional[nnx.Module] = nnx.data(None)

    def _observe(self, y: jax.Array) -> jax.Array:
        if self.activation_post_process is not None:
            y = self.activation_post_process(y)
        return y

    def __call__(self, x):
        raise RuntimeError(
            "FloatFunctional is not meant to be called directly: use one of its methods "
            "(add, mul, add_relu, cat, add_scalar, mul_scalar, matmul)"
        )

    def add(self, x: jax.Array, y: jax.Array) -> jax.Array:
        return self._observe(x + y)

    def add_scalar(self, x: jax.Array, y: float) -> jax.Array:
        # PyTorch does not observe add_scalar: the output qparams follow from the input's.
        return x + y

    def mul(self, x: jax.Array, y: jax.Array) -> jax.Array:
        return self._observe(x * y)

    def mul_scalar(self, x: jax.Array, y: float) -> jax.Array:
        return x * y

    def cat(self, xs: Sequence[jax.Array], axis: int = 0) -> jax.Array:
        return self._observe(jnp.concatenate(list(xs), axis=axis))

    def add_relu(self, x: jax.Array, y: jax.Array) -> jax.Array:
        return self._observe(jax.nn.relu(x + y))

    def matmul(self, x: jax.Array, y: jax.Array) -> jax.Array:
        return self._observe(jnp.matmul(x, y))
