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

from jaxquant.dtypes import qint8, quint8
from jaxquant.qtensor import QTensor, dequantize, quantize_per_tensor


def _map_int(x: QTensor, int_data: jax.Array) -> QTensor:
    """A QTensor with new integers and ``x``'s qparams."""
    return QTensor(int_data, x.scale, x.zero_point, x.dtype, x.qscheme, x.axis)


def _fixed_qparams_op(x: QTensor, fn, scale: float, zero_point: int) -> QTensor:
    # Output range is known in advance (e.g. sigmoid in [0, 1]), so no observer is needed. As in
    # PyTorch the output keeps the input's dtype: ``zero_point`` is the quint8 one, and a qint8 output
    # shifts it by -128 (the same real values; tanh's 128 becomes 0).
    if x.dtype == qint8:
        return quantize_per_tensor(fn(dequantize(x)), scale, zero_point - 128, qint8)
    return quantize_per_tensor(fn(dequantize(x)), scale, zero_point, quint8)


class Identity(nnx.Module):
    """Returns its input; what fusion leaves in place of a module folded into its neighbour."""

    def __call__(self, x):
        return x


class ReLU(nnx.Module):
    """``max(x, 0)``; on a QTensor, ``max(q, zero_point)`` with the input's qparams (PyTorch's)."""

    def __call__(self, x):
        if isinstance(x, QTensor):
            return _map_int(x, jnp.maximum(x.int_data, x.zero_point.astype(x.int_data.dtype)))
        return jax.nn.relu(x)


class ReLU6(nnx.Module):
    """``clip(x, 0, 6)``; on a QTensor the integer clip ``[zp, zp + round(6 / scale)]``, qparams kept."""

    def __call__(self, x):
        if isinstance(x, QTensor):
            zp = x.zero_point.astype(jnp.int32)
            six = jnp.round(jnp.float32(6.0) / x.scale).astype(jnp.int32) + zp
            q = jnp.clip(x.int_data.astype(jnp.int32), zp, six)
            return _map_int(x, jnp.clip(q, x.dtype.min, x.dtype.max).astype(x.int_data.dtype))
        return jnp.clip(x, 0.0, 6.0)


class Hardswish(nnx.Module):
    def __call__(self, x: jax.Array) -> jax.Array:
        return x * jnp.clip(x + 3.0, 0.0, 6.0) / 6.0


class Hardsigmoid(nnx.Module):
    """On a QTensor: fixed output qparams ``(1/256, 0)`` quint8 (``(1/256, -128)`` qint8), as PyTorch."""

    def __call__(self, x):
        if isinstance(x, QTensor):
            return _fixed_qparams_op(x, lambda v: jnp.clip(v + 3.0, 0.0, 6.0) / 6.0, 1.0 / 256.0, 0)
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
    """On a QTensor: fixed output qparams ``(1/256, 0)`` quint8 (``(1/256, -128)`` qint8), as PyTorch's
    quantized sigmoid."""

    def __call__(self, x):
        if isinstance(x, QTensor):
            return _fixed_qparams_op(x, jax.nn.sigmoid, 1.0 / 256.0, 0)
        return jax.nn.sigmoid(x)


class Tanh(nnx.Module):
    """On a QTensor: fixed output qparams ``(2/256, 128)`` quint8 (``(2/256, 0)`` qint8), as PyTorch's
    quantized tanh."""

    def __call__(self, x):
        if isinstance(x, QTensor):
            return _fixed_qparams_op(x, jnp.tanh, 2.0 / 256.0, 128)
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
    if isinstance(x, QTensor):
        if x.axis is not None:
            raise ValueError("reshape of a per-channel QTensor is not supported: dequantize first")
        return QTensor(x.int_data.reshape(shape), x.scale, x.zero_point, x.dtype, x.qscheme, None)
    return x.reshape(shape)
