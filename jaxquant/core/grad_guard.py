"""Refuse differentiation through an int8 model (converted, or dynamically quantized) instead of
returning zero gradients. In the core layer: the NNX modules and the Linen interceptor both guard
their int8 inputs with it."""
from __future__ import annotations

from functools import partial

import jax


@partial(jax.custom_jvp, nondiff_argnums=(1,))
def refuse_gradient(x: jax.Array, where: str) -> jax.Array:
    """Identity on ``x`` (any shape/dtype); differentiating through it raises ``TypeError``.

    Rounding to integers is piecewise constant, so ``jax.grad`` of an int8 model is exactly zero
    everywhere: a training loop would run and learn nothing. The rule runs only while tracing a
    derivative (``grad``/``jvp``/``vjp``); plain and jitted calls see an identity, no cost."""
    return x


@refuse_gradient.defjvp
def _refuse_gradient_jvp(where, primals, tangents):
    raise TypeError(
        f"{where}: jax.grad (or jvp/vjp) through an int8 model (converted or dynamically quantized): "
        "quantization rounds to integers, so every gradient would be exactly zero. Differentiate the float "
        "model, or train with quantization-aware training (jaxquant.prepare_qat, or jaxquant.linen.prepare_qat: "
        "fake quantization with straight-through gradients) and call convert afterwards")
