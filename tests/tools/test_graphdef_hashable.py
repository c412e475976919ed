"""A converted model's graphdef stays hashable: jax.jit takes it as a static argument (nnx.jit does too)."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxquant as jq

from .conftest import build_fashion_cnn, images, minmax_qconfig


def _run_with_static_graphdef(model, x):
    graphdef, state = nnx.split(model)
    hash(graphdef)
    forward = jax.jit(lambda state, x, graphdef: nnx.merge(graphdef, state)(x), static_argnums=2)
    return np.asarray(forward(state, x, graphdef))


def test_static_int8_graphdef_is_hashable():
    prepared = jq.prepare(build_fashion_cnn(seed=0), minmax_qconfig())
    int8_model = jq.convert(jq.calibrate(prepared, [images(4, seed=1)], progress=False))
    x = images(2, seed=2)
    np.testing.assert_array_equal(_run_with_static_graphdef(int8_model, x), np.asarray(int8_model(x)))


def test_dynamic_int8_graphdef_is_hashable():
    model = jq.quantize_dynamic(nnx.Sequential(nnx.Linear(6, 4, rngs=nnx.Rngs(0)), nnx.Linear(4, 3, rngs=nnx.Rngs(1))))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6)), jnp.float32)
    np.testing.assert_array_equal(_run_with_static_graphdef(model, x), np.asarray(model(x)))
