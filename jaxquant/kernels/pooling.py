"""Max pooling of 8-bit quantized NHWC data: the native AVX-512 pool where the backend is on, else XLA's
``reduce_window``.

Max pooling works on the stored integers (it commutes with the monotone map to real values, so the
input's scale and zero point carry over). Both paths skip padded taps (XLA pads with the dtype's
minimum, which never wins), so they are equal bit for bit; ``tests/native`` compares them.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from jaxquant.native import ops as native_ops

__all__ = ["quantized_max_pool2d"]


def quantized_max_pool2d(data: jax.Array, kernel: Sequence[int], stride: Sequence[int],
                         padding: Sequence[int]) -> jax.Array:
    """Max pool of uint8/int8 ``data (N, H, W, C)``.

    Args:
      data: uint8 or int8 NHWC array (a QTensor's ``int_data``).
      kernel, stride: ``(kh, kw)``, ``(sh, sw)``; padding: ``(ph, pw)``, on both sides, PyTorch's.

    Returns:
      ``(N, OH, OW, C)`` of ``data``'s dtype, ``OH = (H + 2 ph - kh) // sh + 1`` (likewise OW).
    """
    kernel, stride, padding = tuple(kernel), tuple(stride), tuple(padding)
    if native_ops.pool_supported(data.shape, data.dtype, kernel, stride, padding):
        return native_ops.native_max_pool(data, kernel, stride, padding)
    init = jnp.array(jnp.iinfo(data.dtype).min, data.dtype)
    pads = ((0, 0), (padding[0], padding[0]), (padding[1], padding[1]), (0, 0))
    return lax.reduce_window(data, init, lax.max, (1, *kernel, 1), (1, *stride, 1), pads)
