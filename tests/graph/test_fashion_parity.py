"""Graph-mode static PTQ of the unmodified Fashion-MNIST CNN equals eager fuse -> prepare -> calibrate ->
convert bit for bit (same qconfig, same calibration batches), and its int8 dots are u8 x s8."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxquant as jq
from graph_hlo import assert_int8_dots
from jaxquant.models.fashion_cnn import FashionCNN, fusion_patterns, set_batchnorm_statistics


def _trained_like_model():
    # non-trivial BatchNorm statistics, so the fold is exercised
    model = set_batchnorm_statistics(FashionCNN(width=8, rngs=nnx.Rngs(0)), np.random.default_rng(1),
                                     mean_std=0.3, affine=True)
    model.eval()
    return model


def _opcodes(hlo: str) -> dict:
    """Instruction counts by opcode in compiled HLO text (names, layouts and metadata ignored)."""
    counts = {}
    for op in re.findall(r"= \S+ ([a-z][\w-]*)\(", hlo):
        counts[op] = counts.get(op, 0) + 1
    counts.pop("parameter", None)  # the two pytrees order and split their leaves differently
    return counts


@pytest.mark.parametrize("backend_qconfig", ["x86_minmax", pytest.param("x86", marks=pytest.mark.slow)])
def test_fashion_cnn_graph_static_equals_eager(backend_qconfig):
    if backend_qconfig == "x86":
        qconfig = jq.get_default_qconfig("x86")
    else:
        qconfig = jq.QConfig(activation=jq.MinMaxObserver.with_args(reduce_range=True),
                             weight=jq.default_per_channel_weight_observer)
    model = _trained_like_model()
    rng = np.random.default_rng(2)
    batches = [jnp.asarray(rng.uniform(0, 1, (8, 28, 28, 1)), jnp.float32) for _ in range(3)]
    x_test = jnp.asarray(rng.uniform(0, 1, (16, 28, 28, 1)), jnp.float32)

    fused = jq.fuse_modules(model, fusion_patterns(model))
    prepared = jq.prepare(fused, qconfig)
    jq.calibrate(prepared, batches, progress=False)
    eager = jq.convert(prepared)
    y_eager = eager(x_test)

    observed = jq.graph.prepare(model, batches[0], qconfig)
    assert [p for p, _, _ in observed.units] == ["block1.conv", "block2.conv", "fc1", "fc2"]
    state = jq.graph.calibrate(observed, batches, progress=False)
    qprog = jq.graph.convert(observed, state)
    y_graph = jax.jit(qprog.apply)(qprog.params, x_test)
    np.testing.assert_array_equal(np.asarray(y_graph), np.asarray(y_eager))
    if backend_qconfig == "x86_minmax":
        # speed parity, structurally: both compile to the same XLA instructions (op for op), so graph mode
        # cannot be slower than eager beyond noise (benchmarks/bench_graph.py times it)
        gd, st = nnx.split(eager)
        with jq.use_native(False):
            h_eager = jax.jit(lambda s, x: nnx.merge(gd, s)(x)).lower(st, x_test).compile().as_text()
            h_graph = jax.jit(qprog.apply).lower(qprog.params, x_test).compile().as_text()
        assert _opcodes(h_eager).get("dot", 0) >= 4 and _opcodes(h_eager).get("fusion", 0) > 4
        assert _opcodes(h_graph) == _opcodes(h_eager)
    # the float model is close too (sanity: the int8 model is a model of the float one)
    y_float = model(x_test)
    cos = float(jnp.sum(y_float * y_graph) / (jnp.linalg.norm(y_float) * jnp.linalg.norm(y_graph)))
    assert cos > 0.99


@pytest.mark.slow
def test_fashion_cnn_graph_int8_hlo_is_u8s8():
    model = _trained_like_model()
    x = jnp.asarray(np.random.default_rng(0).uniform(0, 1, (4, 28, 28, 1)), jnp.float32)
    observed = jq.graph.prepare(model, x, jq.get_default_qconfig("x86"))
    qprog = jq.graph.convert(observed, jq.graph.calibrate(observed, [x], progress=False))
    with jq.use_native(False):  # the pure-XLA kernels' dots (the native backend runs custom calls)
        hlo = jax.jit(qprog.apply).lower(qprog.params, x).compile().as_text()
    assert_int8_dots(hlo, expected=4)


def test_eager_int8_direct_equals_jit_on_a_wider_cnn():
    """Reported last session: the eager int8 CNN called directly vs under jit differed on a wider model.
    Not reproducible on this tree (widths 32-96, batches 1-256, both backends, checked by hand); pinned here: the
    requantize epilogue is computed in one order on every path (kernels' fused epilogue), so the direct
    call, ``jax.jit`` over the split state, ``jq.compile`` and the pure-XLA kernels agree bit for bit."""
    model = FashionCNN(width=24, rngs=nnx.Rngs(3))
    model.eval()
    rng = np.random.default_rng(4)
    qconfig = jq.QConfig(activation=jq.MinMaxObserver.with_args(reduce_range=True),
                         weight=jq.default_per_channel_weight_observer)
    prepared = jq.prepare(jq.fuse_modules(model, fusion_patterns(model)), qconfig)
    jq.calibrate(prepared, [jnp.asarray(rng.uniform(0, 1, (4, 28, 28, 1)), jnp.float32)], progress=False)
    eager = jq.convert(prepared)
    x = jnp.asarray(rng.uniform(0, 1, (2, 28, 28, 1)), jnp.float32)
    y_direct = np.asarray(eager(x))
    gd, st = nnx.split(eager)
    jitted = jax.jit(lambda s, x: nnx.merge(gd, s)(x))
    np.testing.assert_array_equal(np.asarray(jitted(st, x)), y_direct)
    np.testing.assert_array_equal(np.asarray(jq.compile(eager)(x)), y_direct)
    with jq.use_native(False):
        np.testing.assert_array_equal(np.asarray(jax.jit(lambda s, x: nnx.merge(gd, s)(x))(st, x)), y_direct)
