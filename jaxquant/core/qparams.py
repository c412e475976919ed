"""Activation qparams from an observer's state, compiled once per observer config: what every front end's
convert (NNX, Linen, graph) reads, so all three give the same bits."""
from __future__ import annotations

from functools import partial
from typing import Any

import jax


@partial(jax.jit, static_argnums=0)
def calculate_qparams(observer: Any, state: Any) -> tuple[jax.Array, jax.Array]:
    """``observer.calculate_qparams(state)`` compiled on its own: ``(scale float32, zero_point int32)``,
    per tensor ``()`` or per channel ``(C,)``. Inlined into a bigger program XLA may round differently,
    and eager, the histogram search would dispatch thousands of small ops per layer."""
    return observer.calculate_qparams(state)
