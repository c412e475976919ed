"""Graph-mode dynamic quantization: MiniLM equals eager quantize_dynamic exactly; activation x activation
dots (attention) quantized on both sides; every int8 dot compiles to u8 x s8."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxquant as jq
from graph_hlo import assert_int8_dots
from jaxquant.models.minilm import MiniLM, MiniLMConfig


def _small_minilm():
    cfg = MiniLMConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, max_position_embeddings=16)
    model = MiniLM(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1, 64, (2, 8)), jnp.int32)
    mask = jnp.ones((2, 8), jnp.int32).at[1, 6:].set(0)
    return model, ids, mask


def test_minilm_graph_dynamic_equals_quantize_dynamic():
    model, ids, mask = _small_minilm()
    eager = jq.quantize_dynamic(model, {nnx.Linear: jq.default_dynamic_qconfig})
    mapping = jq.QConfigMapping().set_global(jq.default_dynamic_qconfig).set_object_type("matmul", None)
    qprog = jq.graph.quantize_dynamic(model, (ids, mask), mapping)
    assert len(qprog.unit_paths) == 2 * 6  # q, k, v, output, intermediate, output per layer
    y_graph = jax.jit(qprog.apply)(qprog.params, ids, mask)
    y_eager = jax.jit(lambda m, a, b: m(a, b))(eager, ids, mask)
    np.testing.assert_array_equal(np.asarray(y_graph), np.asarray(y_eager))


@pytest.mark.slow
def test_minilm_graph_dynamic_attention_int8_both_sides():
    model, ids, mask = _small_minilm()
    qprog = jq.graph.quantize_dynamic(model, (ids, mask))
    assert sum(".matmul" in p or p.startswith("matmul") for p in qprog.unit_paths) == 2 * 2
    y = jax.jit(qprog.apply)(qprog.params, ids, mask)
    y_float = model(ids, mask)
    cos = np.sum(np.asarray(y) * np.asarray(y_float), axis=-1)  # unit-norm embeddings
    assert np.all(cos > 0.99), cos
    with jq.use_native(False):  # the pure-XLA kernels' dots (the native backend runs custom calls)
        hlo = jax.jit(qprog.apply).lower(qprog.params, ids, mask).compile().as_text()
    assert_int8_dots(hlo, expected=2 * 8)


def test_int8_dot_general_matches_numpy():
    from jaxquant.graph.kernels import int8_dot_general

    rng = np.random.default_rng(3)
    l = rng.integers(0, 256, (2, 3, 5, 4)).astype(np.uint8)   # (b, h, q, d)
    r = rng.integers(0, 256, (2, 3, 6, 4)).astype(np.uint8)   # (b, h, k, d)
    dn = (((3,), (3,)), ((0, 1), (0, 1)))
    acc = int8_dot_general(jnp.asarray(l), jnp.int32(7), jnp.asarray(r), jnp.int32(200), dn)
    ref = np.einsum("bhqd,bhkd->bhqk", l.astype(np.int64) - 7, r.astype(np.int64) - 200)
    np.testing.assert_array_equal(np.asarray(acc), ref)
