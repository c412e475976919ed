"""Refuse differentiation through a converted (int8) model instead of returning zero gradients."""
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
        f"{where}: jax.grad (or jvp/vjp) through a converted int8 model: quantization rounds to integers, "
        "so every gradient would be exactly zero. Differentiate the float model, or train with "
        "quantization-aware training (jaxquant.prepare_qat: fake quantization with straight-through "
        "gradients) and call convert afterwards")
