"""Bad-input catalogue entries S01-S06 (docs/bad_input_catalogue.md): ``jaxquant.compile``, the serving path.

Same conventions as ``test_catalogue.py``: the error names the place and says what to do, and the
user's model is left as it was.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxquant as jq


def _raises(exc, *needles):
    return pytest.raises(exc, match="(?is)" + "".join(f"(?=.*{n})" for n in needles))


def _mlp():
    return nnx.Sequential(nnx.Linear(6, 8, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(8, 3, rngs=nnx.Rngs(1)))


def _snapshot(model):
    graphdef, state = nnx.split(model)
    return graphdef, [np.array(jax.random.key_data(a) if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key) else a)
                      for a in jax.tree.leaves(state)]


def _assert_untouched(model, snap):
    graphdef, leaves = _snapshot(model)
    assert graphdef == snap[0]
    for a, b in zip(leaves, snap[1]):
        np.testing.assert_array_equal(a, b)


def test_S01_served_model_called_with_another_rank_or_dtype():
    served = jq.compile(_mlp())
    served(jnp.ones((2, 6)))
    with _raises(TypeError, "input 0 of Sequential", "compiled for float32", "astype"):
        served(jnp.ones((2, 6), jnp.int32))
    with _raises(TypeError, "rank 3", "compiled for float32 of rank 2"):
        served(jnp.ones((1, 2, 6)))


def test_S02_model_that_updates_its_state_when_called():
    model = nnx.Sequential(nnx.Linear(6, 6, rngs=nnx.Rngs(0)), nnx.BatchNorm(6, rngs=nnx.Rngs(0)))
    snap = _snapshot(model)
    with _raises(jq.ModelMutatesStateError, r"layers\.1\.mean", r"model\.eval\(\)"):
        jq.compile(model)(jnp.ones((2, 6)))
    _assert_untouched(model, snap)


def test_S03_arrays_replaced_after_compile():
    model = _mlp()
    served = jq.compile(model)
    served(jnp.ones((2, 6)))
    model.layers[0].kernel.set_value(model.layers[0].kernel.get_value() + 1.0)
    with _raises(jq.ModelChangedError, r"layers\.0\.kernel", r"jaxquant\.compile\(model\) again"):
        served(jnp.ones((2, 6)))


def test_S04_batch_larger_than_the_largest_bucket():
    served = jq.compile(_mlp(), buckets=(1, 4))
    with _raises(ValueError, "batch of 5", "largest bucket", "Add a larger bucket"):
        served(jnp.ones((5, 6)))


def test_S05_function_without_params_or_not_a_model():
    with _raises(TypeError, "pass its params"):
        jq.compile(lambda params, x: x)
    with _raises(TypeError, "cannot serve", "nnx.Module"):
        jq.compile("model.ckpt")


def test_S06_dropout_in_training_mode():
    model = nnx.Sequential(nnx.Linear(6, 6, rngs=nnx.Rngs(0)), nnx.Dropout(0.1, rngs=nnx.Rngs(1)))
    snap = _snapshot(model)
    with _raises(jq.ModelMutatesStateError, "Dropout in training mode", r"layers\.1", r"model\.eval\(\)"):
        jq.compile(model)
    _assert_untouched(model, snap)
