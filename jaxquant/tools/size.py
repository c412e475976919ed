"""How big a model is: the arrays that define it (what `jaxquant.save` writes) and their bytes.

Derived caches (``QuantCache``: packed weight layouts kept for speed) are not counted: they are
rebuilt from the int8 weights and are not part of the model's definition.
"""
from __future__ import annotations

import numpy as np
from flax import nnx

from jaxquant.nn.variables import QuantCache


def model_arrays(model: nnx.Module) -> dict[str, np.ndarray]:
    """``{dotted path: numpy array}`` of every array that defines ``model`` (caches excluded)."""
    # RNG streams (dropout keys) are not model data either.
    state = nnx.state(model, nnx.All(nnx.Not(QuantCache), nnx.Not(nnx.RngState)))
    arrays = {}
    for path, leaf in state.flat_state():
        value = leaf.get_value() if hasattr(leaf, "get_value") else leaf
        for sub_path, array in _leaves(value):
            arrays[".".join(map(str, path)) + sub_path] = np.asarray(array)
    return arrays


def _leaves(value):
    import jax

    flat, _ = jax.tree_util.tree_flatten_with_path(value)
    for key_path, array in flat:
        yield jax.tree_util.keystr(key_path), array


def model_size_bytes(model: nnx.Module) -> int:
    """Bytes held by the arrays that define ``model`` (int8 weights count 1 byte each)."""
    return int(sum(a.nbytes for a in model_arrays(model).values()))
