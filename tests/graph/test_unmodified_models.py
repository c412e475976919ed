"""Unmodified third-party-style Flax models through graph mode: static PTQ, dynamic and QAT, with no change
to the model code. Each reports cosine vs float and checks that every int8 dot compiles to u8 x s8."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxquant as jq
from graph_hlo import assert_int8_dots

QCONFIG = jq.default_per_channel_qconfig


def cosine(a, b):
    a, b = np.ravel(np.asarray(a, np.float64)), np.ravel(np.asarray(b, np.float64))
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# ------------------------------------------------------------------------------------ models


class LinenBlock(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
        y = nn.Conv(self.features, (3, 3), use_bias=False)(x)
        y = nn.BatchNorm(use_running_average=True)(y)
        y = nn.relu(y)
        y = nn.Conv(self.features, (3, 3), use_bias=False)(y)
        y = nn.BatchNorm(use_running_average=True)(y)
        return nn.relu(x + y)


class LinenResNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.BatchNorm(use_running_average=True)(nn.Conv(8, (3, 3), use_bias=False)(x)))
        x = LinenBlock(8)(x)
        x = LinenBlock(8)(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(10)(x)


def _linen_resnet():
    model = LinenResNet()
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 12, 12, 3)), jnp.float32)
    variables = model.init(jax.random.key(0), x)
    rng = np.random.default_rng(1)
    # trained-looking BatchNorm statistics
    stats = jax.tree_util.tree_map(lambda v: jnp.asarray(rng.uniform(0.5, 1.5, v.shape), v.dtype),
                                   variables["batch_stats"])
    variables = {"params": variables["params"], "batch_stats": stats}
    return model, variables, x


class Block(nnx.Module):
    def __init__(self, dim, heads, rngs):
        self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=heads, in_features=dim, decode=False, rngs=rngs)
        self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
        self.fc1 = nnx.Linear(dim, 2 * dim, rngs=rngs)
        self.fc2 = nnx.Linear(2 * dim, dim, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(nnx.gelu(self.fc1(self.norm2(x))))


class NNXViT(nnx.Module):
    def __init__(self, rngs):
        self.patch = nnx.Conv(3, 32, (4, 4), strides=(4, 4), rngs=rngs)
        self.blocks = nnx.List([Block(32, 4, rngs) for _ in range(2)])
        self.head = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x):
        x = self.patch(x)
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        for b in self.blocks:
            x = b(x)
        return self.head(jnp.mean(x, axis=1))


class NNXLSTM(nnx.Module):
    """An LSTM policy net written the usual way: a cell stepped over time in Python."""

    def __init__(self, rngs):
        self.cell = nnx.LSTMCell(6, 16, rngs=rngs)
        self.head = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
        carry = self.cell.initialize_carry((x.shape[0], 6), rngs=nnx.Rngs(0))
        for t in range(x.shape[1]):
            carry, y = self.cell(carry, x[:, t])
        return self.head(y)


class LinenEncoder(nn.Module):
    layers: int = 2

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(32)(x)
        for _ in range(self.layers):
            h = nn.LayerNorm()(x)
            x = x + nn.MultiHeadDotProductAttention(num_heads=4)(h)
            h = nn.LayerNorm()(x)
            x = x + nn.Dense(32)(nn.gelu(nn.Dense(64)(h)))
        return nn.Dense(5)(x[:, 0])


# ------------------------------------------------------------------------------------- helpers


def _static(fn, args, batches):
    observed = jq.graph.prepare(fn, args, QCONFIG)
    state = jq.graph.calibrate(observed, batches, progress=False)
    return jq.graph.convert(observed, state)


def _check_program(qprog, inputs, y_float, min_cos):
    y = jax.jit(qprog.apply)(qprog.params, *inputs)
    c = cosine(y, y_float)
    assert c > min_cos, c
    with jq.use_native(False):  # the pure-XLA kernels' dots (the native backend runs custom calls)
        hlo = jax.jit(qprog.apply).lower(qprog.params, *inputs).compile().as_text()
    assert_int8_dots(hlo)
    return c


# --------------------------------------------------------------------------------------- tests


@pytest.mark.slow
def test_linen_resnet_static_folds_batchnorm_and_requantizes_residual():
    model, variables, x = _linen_resnet()
    observed = jq.graph.prepare(model.apply, (variables, x), QCONFIG)
    units = {p: fused for p, _, fused in observed.units}
    convs = [p for p in units if "Conv" in p]
    assert len(convs) == 5 and all("mul" in units[p] for p in convs), units  # every BatchNorm folded
    assert len(observed.plan.requant) == 2  # the two residual adds of int8 values
    batches = [jnp.asarray(np.random.default_rng(i).normal(size=x.shape), jnp.float32) for i in range(3)]
    state = jq.graph.calibrate(observed, batches, progress=False)
    qprog = jq.graph.convert(observed, state)
    y_float = model.apply(variables, batches[0])
    _check_program(qprog, (batches[0],), y_float, 0.98)
    dyn = jq.graph.quantize_dynamic(model.apply, (variables, x))
    _check_program(dyn, (x,), model.apply(variables, x), 0.99)


@pytest.mark.slow
def test_linen_resnet_qat_optax_loop_then_convert():
    model, variables, x = _linen_resnet()
    qat = jq.graph.prepare_qat(model.apply, (variables, x), jq.get_default_qat_qconfig("x86"))
    labels = jnp.arange(4) % 10

    def loss_fn(params, state, x):
        logits, state = qat.apply(params, state, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), state

    opt = optax.sgd(0.05)
    params, state = variables, qat.init_state
    opt_state = opt.init(params)

    @jax.jit
    def step(params, state, opt_state):
        (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state, x)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), state, opt_state, loss, grads

    losses = []
    for _ in range(5):
        params, state, opt_state, loss, grads = step(params, state, opt_state)
        losses.append(float(loss))
    gk = grads["params"]["Conv_0"]["kernel"]
    assert float(jnp.abs(gk).max()) > 0  # straight-through gradients reach the float kernel
    assert losses[-1] < losses[0], losses
    qprog = jq.graph.convert(qat, state, params=params)
    _check_program(qprog, (x,), model.apply(params, x), 0.97)


@pytest.mark.slow
def test_nnx_vit_static_attention_in_int8():
    model = NNXViT(nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 3)), jnp.float32)
    observed = jq.graph.prepare(model, x, QCONFIG)
    kinds = [k for _, k, _ in observed.units]
    assert kinds.count("matmul") == 4 and kinds.count("linear") == 2 * 6 + 1 and kinds.count("conv") == 1
    state = jq.graph.calibrate(observed, [x], progress=False)
    qprog = jq.graph.convert(observed, state)
    _check_program(qprog, (x,), model(x), 0.98)
    dyn = jq.graph.quantize_dynamic(model, x)
    _check_program(dyn, (x,), model(x), 0.98)


@pytest.mark.slow
def test_nnx_vit_qat_gradients():
    model = NNXViT(nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 3)), jnp.float32)
    qat = jq.graph.prepare_qat(model, x, jq.get_default_qat_qconfig("x86"))
    params = qat.params

    def loss(p):
        y, _ = qat.apply(p, qat.init_state, x)
        return jnp.sum(y ** 2)

    # under jit, as a training step runs (eagerly, every forward and backward op compiles on its own)
    g = jax.jit(jax.grad(loss))(params)
    leaves = [l for l in jax.tree_util.tree_leaves(g) if jnp.issubdtype(l.dtype, jnp.floating)]
    assert sum(float(jnp.abs(l).sum()) > 0 for l in leaves) >= len(leaves) // 2
    qprog = jq.graph.convert(qat, jax.jit(qat.apply)(params, qat.init_state, x)[1])
    _check_program(qprog, (x,), model(x), 0.95)


@pytest.mark.slow
def test_nnx_lstm_static_and_dynamic():
    model = NNXLSTM(nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4, 6)), jnp.float32)
    observed = jq.graph.prepare(model, x, QCONFIG)
    # 4 gates x 4 steps on the input, 4 gates x 3 steps on the hidden state (the first step's carry is a
    # constant zero: that dot is constant-folded, not quantized), and the head
    assert len(observed.units) == 4 * 4 + 4 * 3 + 1
    state = jq.graph.calibrate(observed, [x], progress=False)
    qprog = jq.graph.convert(observed, state)
    _check_program(qprog, (x,), model(x), 0.98)
    _check_program(jq.graph.quantize_dynamic(model, x), (x,), model(x), 0.99)


@pytest.mark.slow
def test_scan_is_left_float_with_a_warning():
    class ScanNet(nnx.Module):
        def __init__(self, rngs):
            self.rnn = nnx.RNN(nnx.SimpleCell(4, 8, rngs=rngs))
            self.head = nnx.Linear(8, 2, rngs=rngs)

        def __call__(self, x):
            return self.head(self.rnn(x)[:, -1])

    model = ScanNet(nnx.Rngs(0))
    x = jnp.ones((2, 5, 4), jnp.float32)
    with pytest.warns(UserWarning, match="'(scan|while)' at op .* control flow"):
        observed = jq.graph.prepare(model, x, QCONFIG)
    qprog = jq.graph.convert(observed, jq.graph.calibrate(observed, [x], progress=False))
    assert qprog.unit_paths == ["head"]
    assert cosine(qprog(x), model(x)) > 0.99


@pytest.mark.slow
def test_linen_transformer_static_dynamic():
    model = LinenEncoder()
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, 8)), jnp.float32)
    variables = model.init(jax.random.key(0), x)
    observed = jq.graph.prepare(model.apply, (variables, x), QCONFIG)
    paths = [p for p, _, _ in observed.units]
    assert "Dense_0" in paths and any("MultiHeadDotProductAttention_0.query" in p for p in paths), paths
    qprog = jq.graph.convert(observed, jq.graph.calibrate(observed, [x], progress=False))
    _check_program(qprog, (x,), model.apply(variables, x), 0.98)
    _check_program(jq.graph.quantize_dynamic(model.apply, (variables, x)), (x,), model.apply(variables, x), 0.99)


def _qat_steps_then_convert(qat, params, inputs, y_target, steps=2):
    """A plain Optax loop on the fake-quantized program (MSE to the float outputs), then convert."""
    opt = optax.sgd(0.01)
    state, opt_state = qat.init_state, opt.init(params)

    def loss_fn(p, s):
        y, s = qat.apply(p, s, *inputs)
        return jnp.mean((y - y_target) ** 2), s

    @jax.jit
    def step(p, s, o):
        (loss, s), g = jax.value_and_grad(loss_fn, has_aux=True)(p, s)
        updates, o = opt.update(g, o, p)
        return optax.apply_updates(p, updates), s, o, g

    for _ in range(steps):
        params, state, opt_state, grads = step(params, state, opt_state)
    floats = [l for l in jax.tree_util.tree_leaves(grads) if jnp.issubdtype(l.dtype, jnp.floating)]
    assert any(float(jnp.abs(l).max()) > 0 for l in floats)  # straight-through gradients reach the params
    return jq.graph.convert(qat, state, params=params), params


@pytest.mark.slow
def test_nnx_lstm_qat():
    model = NNXLSTM(nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 2, 6)), jnp.float32)  # 2 steps: small program
    qat = jq.graph.prepare_qat(model, x, jq.get_default_qat_qconfig("x86"))
    qprog, params = _qat_steps_then_convert(qat, qat.params, (x,), model(x))
    nnx.update(model, params)  # the trained float model is the reference of its int8 program
    _check_program(qprog, (x,), model(x), 0.97)


@pytest.mark.slow
def test_linen_transformer_qat():
    enc = LinenEncoder(layers=1)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, 8)), jnp.float32)
    variables = enc.init(jax.random.key(0), x)
    qat = jq.graph.prepare_qat(enc.apply, (variables, x), jq.get_default_qat_qconfig("x86"))
    qprog, params = _qat_steps_then_convert(qat, variables, (x,), enc.apply(variables, x))
    _check_program(qprog, (x,), enc.apply(params, x), 0.97)
