"""Dynamic quantization of Linen models: equal to NNX's quantize_dynamic of the same weights, LSTM cells
equal to the cell equations over NNX dynamic Linears, embeddings equal to NNX's quantized Embedding."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxquant as jq
import jaxquant.linen as jql
from jaxquant.nn import dynamic as nnqd

from linen_models import batches, nnx_linear


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(16)(x))
        x = nn.DenseGeneral((2, 3), axis=-1)(x)
        return nn.Dense(4)(x.reshape(*x.shape[:-2], 6))


class NnxMLP(nnx.Module):
    def __init__(self, p):
        self.l0 = nnx_linear(p["Dense_0"]["kernel"], p["Dense_0"]["bias"])
        self.g = nnx_linear(p["DenseGeneral_0"]["kernel"].reshape(16, 6), p["DenseGeneral_0"]["bias"].reshape(6))
        self.l1 = nnx_linear(p["Dense_1"]["kernel"], p["Dense_1"]["bias"])

    def __call__(self, x):
        return self.l1(self.g(jax.nn.relu(self.l0(x))))


@pytest.mark.slow
@pytest.mark.parametrize("per_token", [False, True])
def test_dynamic_dense_equals_nnx_quantize_dynamic(per_token):
    x = batches((5, 7, 8), n=1)[0]
    v = MLP().init(jax.random.key(0), x)
    qm, qv = jql.quantize_dynamic(MLP(), v, x, per_token=per_token)
    assert "params" not in qv and qv[jql.QUANT_PARAMS]["Dense_0"]["weight_int"].dtype == jnp.int8
    ref = jq.transforms.quantize_dynamic.quantize_dynamic(NnxMLP(v["params"]), per_token=per_token)
    xt = batches((5, 7, 8), n=1, seed=4)[0]
    y = jax.jit(qm.apply)(qv, xt)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(ref(xt)))
    y_float = MLP().apply(v, xt)
    assert 0 < np.abs(np.asarray(y - y_float)).max() < 0.05 * np.abs(np.asarray(y_float)).max()


def _nnx_dyn(p):
    lin = nnx.Linear(p["kernel"].shape[0], p["kernel"].shape[1], use_bias="bias" in p, rngs=nnx.Rngs(0))
    lin.kernel.set_value(p["kernel"])
    if "bias" in p:
        lin.bias.set_value(p["bias"])
    return nnqd.Linear.from_float(lin, jq.default_dynamic_qconfig, "")


class Seq(nn.Module):
    @nn.compact
    def __call__(self, xs):
        rnn = nn.RNN(nn.LSTMCell(6), variable_broadcast=["params", jql.QUANT_PARAMS])
        return rnn(xs)


@pytest.mark.slow
def test_dynamic_lstm_cell_in_nn_rnn_equals_cell_equations_over_nnx_dynamic_linears():
    xs = batches((2, 4, 5), n=1)[0]  # (batch, time, features)
    v = Seq().init(jax.random.key(0), xs)
    qm, qv = jql.quantize_dynamic(Seq(), v, xs)
    cell_q = qv[jql.QUANT_PARAMS]["LSTMCell_0"]  # nn.RNN keeps the cell's scope
    assert set(cell_q) == {"ii", "if", "ig", "io", "hi", "hf", "hg", "ho"} and "params" not in qv
    y = np.asarray(jax.jit(qm.apply)(qv, xs))
    # reference: Linen LSTMCell's equations with two NNX dynamic Linears, one per gate group (the four
    # gates' kernels concatenated: one weight scale, PyTorch's weight_ih / weight_hh); the input
    # projection runs over the whole sequence at once (one activation scale), as PyTorch's LSTM
    p = v["params"]["LSTMCell_0"]
    d_i = _nnx_dyn({"kernel": jnp.concatenate([p[k]["kernel"] for k in ("ii", "if", "ig", "io")], -1)})
    d_h = _nnx_dyn({"kernel": jnp.concatenate([p[k]["kernel"] for k in ("hi", "hf", "hg", "ho")], -1),
                    "bias": jnp.concatenate([p[k]["bias"] for k in ("hi", "hf", "hg", "ho")])})
    xi = jnp.split(d_i(xs), 4, axis=-1)
    h = c = jnp.zeros((2, 6))
    outs = []
    for t in range(xs.shape[1]):
        hi, hf, hg, ho = jnp.split(d_h(h), 4, axis=-1)
        i = jax.nn.sigmoid(xi[0][:, t] + hi)
        f = jax.nn.sigmoid(xi[1][:, t] + hf)
        g = jnp.tanh(xi[2][:, t] + hg)
        o = jax.nn.sigmoid(xi[3][:, t] + ho)
        c = f * c + i * g
        h = o * jnp.tanh(c)
        outs.append(h)
    np.testing.assert_allclose(y, np.stack(outs, 1), rtol=1e-6, atol=1e-6)
    y_float = np.asarray(Seq().apply(v, xs))
    assert 0 < np.abs(y - y_float).max() < 0.05


class Tok(nn.Module):
    @nn.compact
    def __call__(self, ids):
        emb = nn.Embed(11, 4)
        return emb(ids), emb.attend(jnp.ones((2, 4)))


def test_embed_weight_only_equals_nnx_quantized_embedding():
    ids = jnp.array([[0, 3, 10], [7, 7, 1]])
    v = Tok().init(jax.random.key(0), ids)
    qm, qv = jql.quantize_dynamic(Tok(), v, ids, dtype=jq.quint8)
    assert qv[jql.QUANT_PARAMS]["Embed_0"]["weight_int"].dtype == jnp.uint8 and "params" not in qv
    table = nnx.Embed(11, 4, rngs=nnx.Rngs(0))
    table.embedding.set_value(v["params"]["Embed_0"]["embedding"])
    ref = nnqd.Embedding.from_float(table, jq.float_qparams_weight_only_qconfig, "e")
    out, att = jax.jit(qm.apply)(qv, ids)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref(ids)))
    np.testing.assert_allclose(np.asarray(att), np.asarray(ref.attend(jnp.ones((2, 4)))), rtol=1e-6)


def test_quantize_dynamic_bad_spec_names_linen_paths():
    x = batches((3, 8), n=1)[0]
    v = MLP().init(jax.random.key(0), x)
    with pytest.raises(KeyError, match="Dense_9.*Dense_0"):
        jql.quantize_dynamic(MLP(), v, x, qconfig_spec={"Dense_9": jq.default_dynamic_qconfig})
    with pytest.raises(TypeError, match="flax.linen"):
        jql.quantize_dynamic(MLP(), v, x, qconfig_spec={nnx.Linear: jq.default_dynamic_qconfig})
    with pytest.warns(UserWarning, match="no layer was quantized"):
        jql.quantize_dynamic(MLP(), v, x, qconfig_spec={nn.Conv: jq.default_dynamic_qconfig})


@pytest.mark.slow
def test_dynamic_gru_cell_equals_cell_equations_over_nnx_dynamic_linears():
    x = batches((3, 5), n=1)[0]
    h = batches((3, 4), n=1, seed=2)[0]
    cell = nn.GRUCell(4)
    v = cell.init(jax.random.key(0), h, x)
    qm, qv = jql.quantize_dynamic(cell, v, h, x)
    assert set(qv[jql.QUANT_PARAMS]) == {"ir", "iz", "in", "hr", "hz", "hn"} and "params" not in qv
    new_h, _ = jax.jit(qm.apply)(qv, h, x)
    # one NNX dynamic Linear per gate group (kernels concatenated: one weight scale, as PyTorch's GRU)
    p = v["params"]
    cat = lambda names, key: jnp.concatenate([p[k][key] if key in p[k] else  # noqa: E731
                                              jnp.zeros(p[k]["kernel"].shape[-1:]) for k in names], -1)
    d_i = _nnx_dyn({"kernel": cat(("ir", "iz", "in"), "kernel"), "bias": cat(("ir", "iz", "in"), "bias")})
    d_h = _nnx_dyn({"kernel": cat(("hr", "hz", "hn"), "kernel"), "bias": cat(("hr", "hz", "hn"), "bias")})
    (xr, xz, xn), (hr, hz, hn) = jnp.split(d_i(x), 3, -1), jnp.split(d_h(h), 3, -1)
    r = jax.nn.sigmoid(xr + hr)
    z = jax.nn.sigmoid(xz + hz)
    n = jnp.tanh(xn + r * hn)
    np.testing.assert_allclose(np.asarray(new_h), np.asarray((1.0 - z) * n + z * h), rtol=1e-6, atol=1e-6)
