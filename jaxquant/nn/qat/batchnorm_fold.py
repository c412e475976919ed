"""The BatchNorm-in-the-loop forward of PyTorch's QAT ``ConvBn*d`` / ``LinearBn1d``
(``torch.ao.nn.intrinsic.qat.modules.conv_fused._ConvBnNd._forward_approximate``).

The weight is scaled by ``gamma / sqrt(running_var + eps)`` *before* fake quantization, so training
sees the weight that convert will store (BN folded with the running statistics); the op runs without
bias, its output is divided by the same factor, the original bias is added and a real BatchNorm
follows: batch statistics while training (running statistics updated), running statistics in eval
mode or once ``freeze_bn`` is set.

Running statistics: ``momentum`` is flax's (the decay of the old value: PyTorch's ``momentum=0.1`` is
flax's ``0.9``); the variance folded in is the *unbiased* batch variance, as PyTorch's BatchNorm does
(flax's uses the biased one; the two differ by ``n / (n - 1)`` with ``n`` values per channel), so QAT
runs match PyTorch's step for step.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from jaxquant.nn.qat.fake_quant_module import FakeQuantModule
from jaxquant.nn.qat.weight_fake_quant import fake_quant_kernel


def bn_scale_factor(bn: nnx.BatchNorm) -> jax.Array:
    """``gamma / sqrt(running_var + eps)``, float32 ``(C,)``."""
    var = bn.var.get_value()
    gamma = jnp.ones_like(var) if bn.scale is None else bn.scale.get_value()
    return gamma / jnp.sqrt(var + bn.epsilon)


def bn_training(bn: nnx.BatchNorm) -> bool:
    """Whether the BatchNorm is in training mode (``model.train()``)."""
    return not bool(bn.use_running_average)


def fused_bn_forward(
    op: Callable[[jax.Array, jax.Array], jax.Array],
    x: jax.Array,
    kernel: jax.Array,
    bias: Optional[jax.Array],
    bn: nnx.BatchNorm,
    freeze_bn: jax.Array,
    weight_fake_quant: FakeQuantModule,
) -> jax.Array:
    """``bn(op(x, fq(kernel * s)) / s + bias)`` with ``s = gamma / sqrt(running_var + eps)``.

    Args:
      op: ``op(x, kernel) -> y`` without bias; ``y``'s last axis holds the ``C`` output channels.
      x: float32 input of ``op``.
      kernel: float32 flax kernel ``(..., C)``.
      bias: float32 ``(C,)`` or ``None``.
      bn: the BatchNorm over ``C``; its running statistics are updated in training mode unless frozen.
      freeze_bn: int32 ``()``; non-zero uses running statistics even in training mode (no retrace).
      weight_fake_quant: fake quant applied to the scaled kernel.
    Returns:
      float32 output like ``op``'s.
    """
    running_mean, running_var = bn.mean.get_value(), bn.var.get_value()
    scale_factor = bn_scale_factor(bn)
    scaled_kernel = fake_quant_kernel(weight_fake_quant, kernel * scale_factor)
    y = op(x, scaled_kernel) / scale_factor
    if bias is not None:
        y = y + bias
    gamma = jnp.ones_like(running_var) if bn.scale is None else bn.scale.get_value()
    beta = jnp.zeros_like(running_mean) if bn.bias is None else bn.bias.get_value()
    if bn_training(bn):
        axes = tuple(range(y.ndim - 1))
        batch_mean = jnp.mean(y, axis=axes)
        batch_var = jnp.mean(jnp.square(y - batch_mean), axis=axes)  # two-pass, as PyTorch
        frozen = freeze_bn != 0
        mean = jnp.where(frozen, running_mean, batch_mean)
        var = jnp.where(frozen, running_var, batch_var)
        m = bn.momentum
        new_mean = m * running_mean + (1.0 - m) * jax.lax.stop_gradient(batch_mean)
        n = y.size // y.shape[-1]
        unbiased = batch_var * (n / max(n - 1, 1))
        new_var = m * running_var + (1.0 - m) * jax.lax.stop_gradient(unbiased)
        bn.mean.set_value(jnp.where(frozen, running_mean, new_mean))
        bn.var.set_value(jnp.where(frozen, running_var, new_var))
    else:
        mean, var = running_mean, running_var
    return (y - mean) / jnp.sqrt(var + bn.epsilon) * gamma + beta
