"""Pooling modules over NHWC inputs, named and parameterised as in ``torch.nn`` (2-D).

On a quantized input (a per-tensor :class:`~jaxquant.qtensor.QTensor`) max pooling works on the
integers directly and average pooling averages the integers and rounds, keeping the input's scale and
zero point, as PyTorch's quantized pooling does.
"""
from __future__ import annotations

from typing import Sequence, Union

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from jaxquant.kernels.pooling import quantized_max_pool2d
from jaxquant.qtensor import QTensor

IntOrPair = Union[int, Sequence[int]]


def _pair(v: IntOrPair) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)  # type: ignore[return-value]


def _window(x: jax.Array, init, op, kernel, stride, padding) -> jax.Array:
    pads = ((0, 0), (padding[0], padding[0]), (padding[1], padding[1]), (0, 0))
    return lax.reduce_window(x, init, op, (1, *kernel, 1), (1, *stride, 1), pads)


def max_pool2d(x, kernel_size: IntOrPair, stride: IntOrPair | None = None, padding: IntOrPair = 0):
    """Max pooling of an NHWC float array or per-tensor QTensor ``(N, H, W, C)``."""
    kernel = _pair(kernel_size)
    stride = _pair(stride if stride is not None else kernel_size)
    padding = _pair(padding)
    if isinstance(x, QTensor):
        out = quantized_max_pool2d(x.int_data, kernel, stride, padding)
        return QTensor(out, x.scale, x.zero_point, x.dtype, x.qscheme, None)
    # A Python-scalar identity lets JAX recognise the max monoid, whose reduce_window is differentiable.
    return _window(x, -jnp.inf, lax.max, kernel, stride, padding)


def avg_pool2d(x, kernel_size: IntOrPair, stride: IntOrPair | None = None, padding: IntOrPair = 0):
    """Average pooling (zero padding counted, PyTorch's ``count_include_pad=True``) of NHWC input."""
    kernel = _pair(kernel_size)
    stride = _pair(stride if stride is not None else kernel_size)
    padding = _pair(padding)
    count = kernel[0] * kernel[1]
    if isinstance(x, QTensor):
        # Padding holds the zero point, which stands for 0.0.
        data = x.int_data.astype(jnp.int32)
        pads = ((0, 0), (padding[0], padding[0]), (padding[1], padding[1]), (0, 0))
        data = jnp.pad(data - x.zero_point, pads)
        total = _window(data, jnp.int32(0), lax.add, kernel, stride, (0, 0))
        mean = jnp.round(total.astype(jnp.float32) / count) + x.zero_point
        out = jnp.clip(mean, x.dtype.min, x.dtype.max).astype(x.int_data.dtype)
        return QTensor(out, x.scale, x.zero_point, x.dtype, x.qscheme, None)
    total = _window(x, 0.0, lax.add, kernel, stride, padding)
    return total / count


def _adaptive_bounds(size: int, out: int) -> list[tuple[int, int]]:
    # PyTorch: start = floor(i * size / out), end = ceil((i + 1) * size / out)
    return [((i * size) // out, -((-(i + 1) * size) // out)) for i in range(out)]


def adaptive_avg_pool2d(x, output_size: IntOrPair):
    """PyTorch's ``adaptive_avg_pool2d`` on NHWC input; output ``(N, oh, ow, C)``."""
    oh, ow = _pair(output_size)
    quantized = isinstance(x, QTensor)
    data = (x.int_data.astype(jnp.float32) if quantized else x)
    h, w = data.shape[1], data.shape[2]
    if (oh, ow) == (1, 1):
        pooled = jnp.mean(data, axis=(1, 2), keepdims=True)
    else:
        rows = []
        for h0, h1 in _adaptive_bounds(h, oh):
            cols = [jnp.mean(data[:, h0:h1, w0:w1, :], axis=(1, 2)) for w0, w1 in _adaptive_bounds(w, ow)]
            rows.append(jnp.stack(cols, axis=1))
        pooled = jnp.stack(rows, axis=1)
    if quantized:
        out = jnp.clip(jnp.round(pooled), x.dtype.min, x.dtype.max).astype(x.int_data.dtype)
        return QTensor(out, x.scale, x.zero_point, x.dtype, x.qscheme, None)
    return pooled


class MaxPool2d(nnx.Module):
    """``torch.nn.MaxPool2d`` for NHWC input (float or quantized)."""

    def __init__(self, kernel_size: IntOrPair, stride: IntOrPair | None = None, padding: IntOrPair = 0):
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding

    def __call__(self, x):
        return max_pool2d(x, self.kernel_size, self.stride, self.padding)


class AvgPool2d(nnx.Module):
    """``torch.nn.AvgPool2d`` for NHWC input (float or quantized)."""

    def __init__(self, kernel_size: IntOrPair, stride: IntOrPair | None = None, padding: IntOrPair = 0):
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding

    def __call__(self, x):
        return avg_pool2d(x, self.kernel_size, self.stride, self.padding)


class AdaptiveAvgPool2d(nnx.Module):
    """``torch.nn.AdaptiveAvgPool2d`` for NHWC input (float or quantized)."""

    def __init__(self, output_size: IntOrPair):
        self.output_size = output_size

    def __call__(self, x):
        return adaptive_avg_pool2d(x, self.output_size)
