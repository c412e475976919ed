"""Shared builders for the Linen tests: small Linen models and NNX models built to quantize the same
way (a QuantStub before and a DeQuantStub after every quantized layer = Linen's per-layer scheme)."""
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxquant.nn as jqnn


def batches(shape, n=3, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray((rng.normal(size=shape) * scale).astype(np.float32)) for _ in range(n)]


class PerLayer(nnx.Module):
    """``DeQuantStub(layer(QuantStub(x)))``: NNX's eager-mode way to quantize one layer on its own."""

    def __init__(self, layer):
        self.quant = jqnn.QuantStub()
        self.layer = layer
        self.dequant = jqnn.DeQuantStub()

    def __call__(self, x):
        return self.dequant(self.layer(self.quant(x)))


def nnx_linear(kernel, bias):
    lin = nnx.Linear(kernel.shape[0], kernel.shape[1], rngs=nnx.Rngs(0))
    lin.kernel.set_value(jnp.asarray(kernel))
    lin.bias.set_value(jnp.asarray(bias))
    return lin
