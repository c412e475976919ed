"""Bad-input catalogue entries I08-I10 (docs/bad_input_catalogue.md): ``jax.grad`` through an int8 model
raises instead of returning zeros, for NNX dynamic modules and for Linen static and dynamic models
(I06 covers NNX static). Before the guard each of these returned an all-zero (static) or
meaningless (dynamic: only through the activation range) gradient without a word. float16 dynamic
weights keep their gradients: nothing is rounded to integers there.
"""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxquant as jq
import jaxquant.linen as jql


def _raises(*needles):
    return pytest.raises(TypeError, match="(?is)" + "".join(f"(?=.*{re.escape(n)})" for n in needles))


X = jnp.asarray(np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32))
SEQ = jnp.asarray(np.random.default_rng(1).normal(size=(2, 5, 6)).astype(np.float32))


class _NNXModel(nnx.Module):
    def __init__(self, rngs):
        self.fc = nnx.Linear(6, 8, rngs=rngs)
        self.proj = nnx.LinearGeneral(8, (2, 3), rngs=rngs)
        self.mix = nnx.Einsum("nhd,dk->nhk", (3, 4), rngs=rngs)

    def __call__(self, x):
        return self.mix(self.proj(self.fc(x)))


def _nnx_lstm():
    class M(nnx.Module):
        def __init__(self, rngs):
            self.rnn = nnx.RNN(nnx.LSTMCell(6, 4, rngs=rngs))

        def __call__(self, x):
            return self.rnn(x)

    return M(nnx.Rngs(0))


def test_I08_grad_through_nnx_dynamic_modules():
    model = _NNXModel(nnx.Rngs(0))
    int8 = jq.quantize_dynamic(model, {nnx.Linear, nnx.LinearGeneral, nnx.Einsum})
    with _raises("dynamic Linear 'fc'", "zero", "prepare_qat"):
        jax.grad(lambda x: int8(x).sum())(X)
    # the first int8 layer the gradient meets is named: here the LinearGeneral
    with _raises("dynamic LinearGeneral 'proj'"):
        jax.grad(lambda h: int8.mix(int8.proj(h)).sum())(jnp.ones((4, 8)))
    with _raises("dynamic Einsum 'mix'"):
        jax.grad(lambda h: int8.mix(h).sum())(jnp.ones((4, 2, 3)))
    lstm = jq.quantize_dynamic(_nnx_lstm(), {nnx.LSTMCell})
    with _raises("dynamic Linear 'rnn.cell", "zero"):
        nnx.grad(lambda m, x: m(x).sum(), argnums=1)(lstm, SEQ)
    # inference, eager and jitted, is unchanged
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda x: int8(x))(X)), np.asarray(int8(X)))
    # float16 weights are not rounded to integers: their gradient is the float one, finite and non-zero
    half = jq.quantize_dynamic(model, {nnx.Linear, nnx.LinearGeneral, nnx.Einsum}, dtype=jq.float16)
    g = jax.grad(lambda x: half(x).sum())(X)
    g_float = jax.grad(lambda x: model(x).sum())(X)
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_float), rtol=2e-2, atol=2e-3)


class _LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jql.QuantStub()(x)
        x = nn.relu(nn.Dense(8)(x))
        return nn.Dense(3)(x)


def test_I09_grad_through_a_linen_static_int8_model():
    model = _LinenNet()
    variables = model.init(jax.random.key(0), X)
    prepared = jql.prepare(model, jql.get_default_qconfig_mapping("x86"))
    stats = jql.calibrate(prepared, variables, [X, 2 * X])
    qmodel, qvars = jql.convert(prepared, stats, X)
    with _raises("QuantStub", "static int8", "zero", "jaxquant.linen.prepare_qat"):
        jax.grad(lambda x: qmodel.apply(qvars, x).sum())(X)
    np.testing.assert_array_equal(np.asarray(jax.jit(qmodel.apply)(qvars, X)), np.asarray(qmodel.apply(qvars, X)))


class _LinenRNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(6)(x)
        return nn.RNN(nn.GRUCell(4), variable_broadcast=["params", jql.QUANT_PARAMS])(x)


def test_I10_grad_through_a_linen_dynamic_int8_model():
    model = _LinenRNN()
    variables = model.init(jax.random.key(0), SEQ)
    qmodel, qvars = jql.quantize_dynamic(model, variables, SEQ)
    with _raises("Dense_0", "dynamic int8", "zero", "prepare_qat"):
        jax.grad(lambda x: qmodel.apply(qvars, x).sum())(SEQ)
    np.testing.assert_array_equal(np.asarray(jax.jit(qmodel.apply)(qvars, SEQ)),
                                  np.asarray(qmodel.apply(qvars, SEQ)))
