"""Convolution geometry shared by the front ends: flax conv attributes normalised, and the float
convolution a (fake-quantized) kernel goes through. Frontend-neutral: reads attributes only, so an
``nnx.Conv``, a Linen ``nn.Conv`` or anything with the same attributes works."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax.nnx.nn.linear import _conv_dimension_numbers, canonicalize_padding

__all__ = ["conv_padding", "spatial_tuple", "conv_with_kernel"]


def conv_padding(conv: Any, path: str):
    """flax ``nnx.Conv.padding`` as 'SAME'/'VALID' or explicit ``((lo, hi), ...)`` pairs."""
    nd = len(conv.kernel_size)
    padding = conv.padding
    if isinstance(padding, str):
        if padding.upper() in ("SAME", "VALID"):
            return padding.upper()
        raise ValueError(f"'{path}': padding {padding!r} has no int8 kernel; use 'SAME', 'VALID' or explicit "
                         "padding (or keep this conv float with qconfig=None)")
    if isinstance(padding, int):
        return ((padding, padding),) * nd
    pairs = tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)
    if len(pairs) != nd:
        raise ValueError(f"'{path}': padding {padding!r} does not give one pair per spatial dimension")
    return pairs


def spatial_tuple(value, nd: int) -> tuple[int, ...]:
    if value is None:
        return (1,) * nd
    if isinstance(value, int):
        return (value,) * nd
    return tuple(int(v) for v in value)


def conv_with_kernel(conv: Any, x: jax.Array, kernel: jax.Array) -> jax.Array:
    """What ``conv(x)`` computes without its bias, using ``kernel`` instead of ``conv.kernel``.

    Args:
      conv: the float ``nnx.Conv`` (strides, padding incl. CIRCULAR/REFLECT/CAUSAL, dilations, groups).
      x: float32 ``(*batch, *spatial, C_in)``.
      kernel: float32 ``(*kernel_size, C_in/groups, C_out)``.
    Returns:
      float32 ``(*batch, *out_spatial, C_out)``.
    """
    kernel_size = tuple(conv.kernel_size)
    nd = len(kernel_size)
    n_batch = x.ndim - (nd + 1)
    batch_shape = x.shape[:n_batch]
    if n_batch != 1:
        x = jnp.reshape(x, (-1,) + x.shape[n_batch:])
    strides = spatial_tuple(conv.strides, nd)
    input_dilation = spatial_tuple(conv.input_dilation, nd)
    kernel_dilation = spatial_tuple(conv.kernel_dilation, nd)
    padding = canonicalize_padding(conv.padding, nd)
    if padding in ("CIRCULAR", "REFLECT"):
        dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, kernel_dilation)]
        pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in dilated] + [(0, 0)]
        x = jnp.pad(x, pads, mode={"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding])
        padding = "VALID"
    elif padding == "CAUSAL":
        pads = [(0, 0), (kernel_dilation[0] * (kernel_size[0] - 1), 0), (0, 0)]
        x = jnp.pad(x, pads)
        padding = "VALID"
    if conv.mask is not None:
        kernel = kernel * conv.mask
    y = jax.lax.conv_general_dilated(
        x, kernel, strides, padding, lhs_dilation=input_dilation, rhs_dilation=kernel_dilation,
        dimension_numbers=_conv_dimension_numbers(x.shape), feature_group_count=conv.feature_group_count,
        precision=conv.precision)
    if n_batch != 1:
        y = jnp.reshape(y, batch_shape + y.shape[1:])
    return y
