"""Float activation and shape modules, named as in ``torch.nn``.

Eager-mode quantization finds layers by module, so an activation that should be quantized (or fused
into the layer before it) must be a module, not a bare function call: use ``jaxquant.nn.ReLU()``
where a PyTorch model would use ``nn.ReLU()``. Each is a stateless ``nnx.Module``; inputs are float
arrays of any shape.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class Identity(nnx.Module):
    """Returns its input; what fusion leaves in place of a module folded into its neighbour."""

    def __call__(self, x):
        return x


class ReLU(nnx.Module):
    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(x)


class ReLU6(nnx.Module):
    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.clip(x, 0.0, 6.0)


class Hardswish(nnx.Module):
    def __call__(self, x: jax.Array) -> jax.Array:
        return x * jnp.clip(x + 3.0, 0.0, 6.0) / 6.0


class Hardsigmoid(nnx.Module):
    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.clip(x + 3.0, 0.0, 6.0) / 6.0


class ELU(nnx.Module):
    def __init__(self, alpha: float = 1.0):
        self.alpha = alpha

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.elu(x, self.alpha)


class LeakyReLU(nnx.Module):
    def __init__(self, negative_slope: float = 0.01):
        self.negative_slope = negative_slope

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.where(x >= 0, x, x * self.negative_slope)


class Sigmoid(nnx.Module):
    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.sigmoid(x)


class Tanh(nnx.Module):
    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.tanh(x)


class Softmax(nnx.Module):
    def __init__(self, axis: int = -1):
        self.axis = axis

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.softmax(x, axis=self.axis)


class GELU(nnx.Module):
    def __init__(self, approximate: bool = False):
        self.approximate = approximate

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.gelu(x, approximate=self.approximate)


class Flatten(nnx.Module):
    """Flattens axes ``start_axis..end_axis`` (PyTorch's ``nn.Flatten``; defaults keep the batch axis)."""

    def __init__(self, start_axis: int = 1, end_axis: int = -1):
        self.start_axis = start_axis
        self.end_axis = end_axis

    def __call__(self, x):
        return flatten(x, self.start_axis, self.end_axis)


def flatten(x, start_axis: int = 1, end_axis: int = -1):
    """``x`` reshaped with axes ``start_axis..end_axis`` merged; works on arrays and QTensors."""
    ndim = len(x.shape)
    start, end = start_axis % ndim, end_axis % ndim
    new_shape = tuple(x.shape[:start]) + (-1,) + tuple(x.shape[end + 1 :])
    return reshape(x, new_shape)


def reshape(x, shape):
    """``x.reshape(shape)`` for arrays and per-tensor QTensors (qparams unchanged)."""
    from jaxquant.qtensor import QTensor

    if isinstance(x, QTensor):
        if x.axis is not None:
            raise ValueError("reshape of a per-channel QTensor is not supported: dequantize first")
        return QTensor(x.int_data.reshape(shape), x.scale, x.zero_point, x.dtype, x.qscheme, None)
    return x.reshape(shape)
