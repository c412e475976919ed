"""Folding an eval-mode BatchNorm into the weights of the Conv / Linear in front of it.

``bn(conv(x)) = gamma * (conv(x) - mean) / sqrt(var + eps) + beta`` is affine per output channel, so
it can be absorbed: scale the kernel's output-channel slices by ``gamma / sqrt(var + eps)`` and
replace the bias by ``(bias - mean) * gamma / sqrt(var + eps) + beta``. Same formulas and order of
operations as PyTorch's ``torch.nn.utils.fusion.fuse_conv_bn_weights`` / ``fuse_linear_bn_weights``,
but on Flax layouts, where the output channel is the *last* kernel axis:

- ``nnx.Conv`` kernel ``(*kernel_size, in_features // groups, out_features)``
- ``nnx.ConvTranspose`` kernel ``(*kernel_size, in_features, out_features)``; with
  ``transpose_kernel=True`` it is ``(*kernel_size, out_features, in_features)``: pass
  ``transpose=True``
- ``nnx.Linear`` kernel ``(in_features, out_features)``

Pure functions of arrays; they work under ``jax.jit``.
"""
from __future__ import annotations

from functools import partial
from typing import Optional

import jax
import numpy as np
import jax.numpy as jnp

__all__ = ["fuse_conv_bn_weights", "fuse_linear_bn_weights"]


def _compute_dtype(*arrays) -> jnp.dtype:
    # Fold in at least float32 even for bf16/f16 parameters: the rsqrt of a small variance loses
    # most of its bits in half precision, and the result is cast back to the parameter dtype anyway.
    dtype = jnp.result_type(*[a.dtype for a in arrays if a is not None])
    return jnp.promote_types(dtype, jnp.float32)


def _check_vectors(fn: str, n_bn: int, bias, gamma, beta, n_out: int) -> None:
    for name, value, n in (("bias", bias, n_out), ("gamma", gamma, n_bn), ("beta", beta, n_bn)):
        if value is not None and jnp.shape(value) != (n,):
            raise ValueError(f"{fn}: {name} has shape {jnp.shape(value)}, expected ({n},)")


def _fold(kernel, bias, running_mean, running_var, eps, gamma, beta, *, out_axis: int, n_out: int):
    arrays = (kernel, bias, running_mean, running_var, gamma, beta)
    if any(isinstance(a, jax.core.Tracer) for a in arrays if a is not None):
        return _fold_traced(kernel, bias, running_mean, running_var, eps, gamma, beta, out_axis=out_axis,
                            n_out=n_out)
    return _fold_numpy(kernel, bias, running_mean, running_var, eps, gamma, beta, out_axis=out_axis, n_out=n_out)


def _fold_numpy(kernel, bias, running_mean, running_var, eps, gamma, beta, *, out_axis: int, n_out: int):
    # Concrete inputs (fusion at prepare time): numpy, so every float32 operation rounds exactly as
    # PyTorch's (XLA rewrites 1/sqrt into an rsqrt that differs in the last bit for ~1/3 of inputs,
    # which flips quantization ties of the folded weights).
    kernel_dtype = kernel.dtype
    bias_dtype = kernel_dtype if bias is None else bias.dtype
    dtype = np.dtype(_compute_dtype(kernel, running_mean, running_var))
    mean = np.asarray(running_mean, dtype)
    var_rsqrt = dtype.type(1) / np.sqrt(np.asarray(running_var, dtype) + dtype.type(eps))
    gamma = np.ones_like(mean) if gamma is None else np.asarray(gamma, dtype)
    beta = np.zeros_like(mean) if beta is None else np.asarray(beta, dtype)
    bias = np.zeros_like(mean) if bias is None else np.asarray(bias, dtype)
    shape = [1] * kernel.ndim
    shape[out_axis] = -1
    fused_kernel = np.asarray(kernel, dtype) * (gamma * var_rsqrt).reshape(shape)
    fused_bias = np.broadcast_to((bias - mean) * var_rsqrt * gamma + beta, (n_out,))
    return jnp.asarray(fused_kernel, kernel_dtype), jnp.asarray(fused_bias, bias_dtype)


@partial(jax.jit, static_argnames=("out_axis", "n_out"))
def _fold_traced(kernel, bias, running_mean, running_var, eps, gamma, beta, *, out_axis: int, n_out: int):
    # One compiled function instead of a dozen eagerly dispatched ops (each its own compile).
    # Order of operations as PyTorch's, so results agree to the last bit or two.
    kernel_dtype = kernel.dtype
    bias_dtype = kernel_dtype if bias is None else bias.dtype
    dtype = _compute_dtype(kernel, running_mean, running_var)
    mean = running_mean.astype(dtype)
    var_rsqrt = jax.lax.rsqrt(running_var.astype(dtype) + jnp.asarray(eps, dtype))
    gamma = jnp.ones_like(mean) if gamma is None else gamma.astype(dtype)
    beta = jnp.zeros_like(mean) if beta is None else beta.astype(dtype)
    bias = jnp.zeros_like(mean) if bias is None else bias.astype(dtype)
    bn_scale = gamma * var_rsqrt
    shape = [1] * kernel.ndim
    shape[out_axis] = -1
    fused_kernel = kernel.astype(dtype) * bn_scale.reshape(shape)
    fused_bias = jnp.broadcast_to((bias - mean) * bn_scale + beta, (n_out,))
    return fused_kernel.astype(kernel_dtype), fused_bias.astype(bias_dtype)


def fuse_conv_bn_weights(
    kernel: jax.Array,
    bias: Optional[jax.Array],
    running_mean: jax.Array,
    running_var: jax.Array,
    eps: float,
    gamma: Optional[jax.Array],
    beta: Optional[jax.Array],
    transpose: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Kernel and bias of the convolution equal to ``BatchNorm(conv(x))`` with BN in eval mode.

    Args:
      kernel: Flax conv kernel, output channels (C) on the last axis, shape ``(*k, cin/groups, C)``;
        with ``transpose=True`` on the second-to-last axis, shape ``(*k, C, cin)`` (the
        ``nnx.ConvTranspose(transpose_kernel=True)`` layout).
      bias: ``(C,)`` or ``None`` (treated as zeros; the result always has a bias).
      running_mean, running_var: BatchNorm statistics, ``(C,)``.
      eps: BatchNorm epsilon.
      gamma, beta: BatchNorm scale and bias, ``(C,)``, or ``None`` (``use_scale``/``use_bias``
        false: ones / zeros).
      transpose: where the output-channel axis is, see ``kernel``.

    Returns:
      ``(kernel, bias)``: kernel of the input's shape and dtype, bias ``(C,)`` in the input bias's
      dtype (the kernel's if there was none). Computed in at least float32.
    """
    kernel = jnp.asarray(kernel)
    if kernel.ndim < 2:
        raise ValueError(f"fuse_conv_bn_weights: kernel must have at least 2 axes, got shape "
                         f"{kernel.shape}")
    out_axis = kernel.ndim - 2 if transpose else kernel.ndim - 1
    n_out = kernel.shape[out_axis]
    if jnp.shape(running_mean) != (n_out,) or jnp.shape(running_var) != (n_out,):
        raise ValueError(
            f"fuse_conv_bn_weights: BatchNorm has {jnp.shape(running_mean)} statistics but the "
            f"kernel {kernel.shape} has {n_out} output channels (axis {out_axis - kernel.ndim}); "
            "the BatchNorm must normalise the conv's output channels"
            + ("" if transpose else " (for a transpose_kernel=True kernel pass transpose=True)"))
    _check_vectors("fuse_conv_bn_weights", n_out, bias, gamma, beta, n_out)
    return _fold(kernel, bias, running_mean, running_var, eps, gamma, beta, out_axis=out_axis,
                 n_out=n_out)


def fuse_linear_bn_weights(
    kernel: jax.Array,
    bias: Optional[jax.Array],
    running_mean: jax.Array,
    running_var: jax.Array,
    eps: float,
    gamma: Optional[jax.Array],
    beta: Optional[jax.Array],
) -> tuple[jax.Array, jax.Array]:
    """Kernel and bias of the ``nnx.Linear`` equal to ``BatchNorm(linear(x))`` with BN in eval mode.

    Args:
      kernel: ``(in_features, out_features)``.
      bias: ``(out_features,)`` or ``None`` (zeros).
      running_mean, running_var, gamma, beta: ``(out_features,)`` or ``(1,)`` (one BatchNorm
        channel broadcast over all features, as PyTorch allows); gamma/beta may be ``None``.
      eps: BatchNorm epsilon.

    Returns:
      ``(kernel, bias)``: kernel ``(in_features, out_features)`` in the kernel's dtype, bias
      ``(out_features,)`` in the bias's dtype (the kernel's if there was none).
    """
    kernel = jnp.asarray(kernel)
    if kernel.ndim != 2:
        raise ValueError(f"fuse_linear_bn_weights: kernel must be (in_features, out_features), got "
                         f"shape {kernel.shape}")
    n_out = kernel.shape[1]
    n_bn = jnp.shape(running_mean)
    if n_bn not in ((n_out,), (1,)) or jnp.shape(running_var) != n_bn:
        raise ValueError(
            f"fuse_linear_bn_weights: BatchNorm has {n_bn} statistics but the Linear has "
            f"{n_out} output features; they must be equal (or the BatchNorm must have 1 feature)")
    _check_vectors("fuse_linear_bn_weights", n_bn[0], bias, gamma, beta, n_out)
    return _fold(kernel, bias, running_mean, running_var, eps, gamma, beta, out_axis=1,
                 n_out=n_out)
