"""A small CNN for 28x28 grayscale images, written for eager-mode quantization.

QuantStub -> [Conv-BN-ReLU -> MaxPool] x 2 -> Flatten -> Linear-ReLU -> Linear -> DeQuantStub.
Activations are modules (``jaxquant.nn.ReLU``) so they can be fused; ``fusion_patterns`` lists the
Conv-BN-ReLU and Linear-ReLU groups for ``fuse_modules``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxquant.nn as jqnn


class ConvBlock(nnx.Module):
    def __init__(self, in_channels: int, out_channels: int, *, rngs: nnx.Rngs):
        self.conv = nnx.Conv(in_channels, out_channels, (3, 3), padding="SAME", use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(out_channels, momentum=0.9, rngs=rngs)
        self.relu = jqnn.ReLU()
        self.pool = jqnn.MaxPool2d(2)

    def __call__(self, x):
        return self.pool(self.relu(self.bn(self.conv(x))))


class FashionCNN(nnx.Module):
    """Input float32 ``(N, 28, 28, 1)``; output float32 logits ``(N, num_classes)``."""

    def __init__(self, num_classes: int = 10, width: int = 32, *, rngs: nnx.Rngs):
        self.quant = jqnn.QuantStub()
        self.block1 = ConvBlock(1, width, rngs=rngs)
        self.block2 = ConvBlock(width, 2 * width, rngs=rngs)
        self.flatten = jqnn.Flatten()
        self.fc1 = nnx.Linear(7 * 7 * 2 * width, 128, rngs=rngs)
        self.relu = jqnn.ReLU()
        self.dropout = nnx.Dropout(0.2, rngs=rngs)
        self.fc2 = nnx.Linear(128, num_classes, rngs=rngs)
        self.dequant = jqnn.DeQuantStub()

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.quant(x)
        x = self.block2(self.block1(x))
        x = self.dropout(self.relu(self.fc1(self.flatten(x))))
        return self.dequant(self.fc2(x))


def fusion_patterns(model: FashionCNN) -> list[list[str]]:
    """The module groups ``fuse_modules`` folds: Conv-BN-ReLU in each block, and fc1-ReLU."""
    return [
        ["block1.conv", "block1.bn", "block1.relu"],
        ["block2.conv", "block2.bn", "block2.relu"],
        ["fc1", "relu"],
    ]


def set_batchnorm_statistics(model: FashionCNN, rng: np.random.Generator, *, mean_std: float = 0.1,
                             affine: bool = False) -> FashionCNN:
    """Give both blocks' BatchNorms trained-looking values, so a fold of an untrained model is exercised.

    Per block, drawn from ``rng`` in this order: running mean ~ N(0, ``mean_std``), running variance ~
    U(0.5, 2.0), and with ``affine`` also scale ~ U(0.5, 1.5) and bias ~ N(0, 0.2) (all float32, one
    value per channel). For tests and benchmarks that quantize a model without training it. Changes
    ``model`` in place and returns it (its train/eval mode untouched).
    """
    for block in (model.block1, model.block2):
        c = block.bn.mean.get_value().shape[0]
        block.bn.mean.set_value(jnp.asarray(rng.normal(0, mean_std, c), jnp.float32))
        block.bn.var.set_value(jnp.asarray(rng.uniform(0.5, 2.0, c), jnp.float32))
        if affine:
            block.bn.scale.set_value(jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32))
            block.bn.bias.set_value(jnp.asarray(rng.normal(0, 0.2, c), jnp.float32))
    return model
