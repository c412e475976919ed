"""Shipping dynamic-quantized models: ``save`` -> ``load`` into a freshly quantized template gives the
same arrays and outputs bit for bit, and a ``jax.export`` artifact (symbolic batch) gives the same
outputs as the jitted model, for an ``nnx.RNN`` over dynamic LSTM/GRU cells (with a uint8 embedding)
and for ``nnx.MultiHeadAttention`` + ``nnx.Einsum`` (dynamic LinearGeneral and Einsum, two inputs)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxquant as jq
from jaxquant.nn.dynamic import Embedding as DynamicEmbedding
from jaxquant.nn.variables import QuantCache
from jaxquant.tools.size import model_arrays

VOCAB, EMBED, HIDDEN = 23, 8, 16


class CharRNN(nnx.Module):
    def __init__(self, cell: str, rngs: nnx.Rngs):
        self.embed = nnx.Embed(VOCAB, EMBED, rngs=rngs)
        make = {"lstm": nnx.LSTMCell, "gru": nnx.GRUCell}[cell]
        self.rnn = nnx.RNN(make(EMBED, HIDDEN, rngs=rngs))
        self.head = nnx.Linear(HIDDEN, VOCAB, rngs=rngs)

    def __call__(self, tokens):
        return self.head(self.rnn(self.embed(tokens)))


class Attention(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=16, qkv_features=16, decode=False, rngs=rngs)
        self.head = nnx.Einsum("btd,dk->btk", (16, 5), (5,), rngs=rngs)

    def __call__(self, x, keep):
        """x float32 (B, T, 16), keep int32 (B, T) (1 = real token) -> float32 (B, T, 5)."""
        mask = nnx.make_attention_mask(keep, keep)
        return self.head(self.attn(x, mask=mask))


RNN_SPEC = {nnx.Embed: jq.float_qparams_weight_only_qconfig, nnx.LSTMCell: jq.default_dynamic_qconfig,
            nnx.GRUCell: jq.default_dynamic_qconfig, nnx.Linear: jq.per_channel_dynamic_qconfig}


def tokens(n: int, t: int = 7, seed: int = 0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, (n, t)), jnp.int32)


def attention_inputs(n: int, t: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    keep = np.ones((n, t), np.int32)
    keep[:, t - 1 - rng.integers(0, 2, n)] = 0  # some padding at the end of each row
    return jnp.asarray(rng.normal(size=(n, t, 16)), jnp.float32), jnp.asarray(keep)


def assert_same_arrays(a: nnx.Module, b: nnx.Module) -> None:
    xa, xb = model_arrays(a), model_arrays(b)
    assert xa.keys() == xb.keys()
    for k in xa:
        assert xa[k].dtype == xb[k].dtype, k
        np.testing.assert_array_equal(xa[k], xb[k], err_msg=k)


FORWARD = nnx.jit(lambda m, *xs: m(*xs))  # one cache: models of one architecture share its compiles


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_dynamic_rnn_save_load_export_identical(cell, tmp_path):
    model = jq.quantize_dynamic(CharRNN(cell, nnx.Rngs(0)), RNN_SPEC, per_token=True)
    assert isinstance(model.embed, DynamicEmbedding)
    assert type(model.rnn.cell).__module__ == "jaxquant.nn.dynamic.rnn"
    assert type(model.rnn.cell).__name__ == {"lstm": "LSTMCell", "gru": "GRUCell"}[cell]
    x = tokens(3)
    expected = np.asarray(FORWARD(model, x))

    jq.save(tmp_path / "m.jq", model)
    # Another seed: before loading, the template's weights (and outputs) differ from the saved ones.
    template = jq.quantize_dynamic(CharRNN(cell, nnx.Rngs(1)), RNN_SPEC, per_token=True)
    assert not np.array_equal(np.asarray(FORWARD(template, x)), expected)
    loaded = jq.load(tmp_path / "m.jq", template)
    assert_same_arrays(loaded, model)
    np.testing.assert_array_equal(np.asarray(FORWARD(loaded, x)), expected)
    # The rebuilt packed layouts are the ones the saved model computed.
    caches_loaded = nnx.to_flat_state(nnx.state(loaded, QuantCache))
    caches_saved = nnx.to_flat_state(nnx.state(model, QuantCache))
    assert [p for p, _ in caches_loaded] == [p for p, _ in caches_saved] != []
    for (_, a), (_, b) in zip(caches_loaded, caches_saved):
        for la, lb in zip(jax.tree_util.tree_leaves(a.get_value()), jax.tree_util.tree_leaves(b.get_value())):
            np.testing.assert_array_equal(np.asarray(la), np.asarray(lb))

    exported = jax.export.deserialize(bytearray(jq.export(model, tokens(2))))
    assert "b" in str(exported.in_avals[0].shape)
    np.testing.assert_array_equal(np.asarray(exported.call(x)), expected)
    t = tokens(1, seed=1)
    np.testing.assert_array_equal(np.asarray(exported.call(t)), np.asarray(FORWARD(model, t)))


def test_dynamic_attention_save_load_export_two_inputs(tmp_path):
    spec = {nnx.LinearGeneral: jq.per_channel_dynamic_qconfig, nnx.Einsum: jq.default_dynamic_qconfig}
    model = jq.quantize_dynamic(Attention(nnx.Rngs(0)), spec)
    assert type(model.attn.query).__module__ == "jaxquant.nn.dynamic.linear_general"
    assert type(model.head).__module__ == "jaxquant.nn.dynamic.einsum"
    x, keep = attention_inputs(3)
    expected = np.asarray(FORWARD(model, x, keep))

    jq.save(tmp_path / "attn.jq", model)
    template = jq.quantize_dynamic(Attention(nnx.Rngs(5)), spec)
    assert not np.array_equal(np.asarray(FORWARD(template, x, keep)), expected)
    loaded = jq.load(tmp_path / "attn.jq", template)
    assert_same_arrays(loaded, model)
    np.testing.assert_array_equal(np.asarray(FORWARD(loaded, x, keep)), expected)

    exported = jax.export.deserialize(bytearray(jq.export(model, *attention_inputs(2))))
    # Both inputs carry the same symbolic batch size.
    assert [str(a.shape[0]) for a in exported.in_avals] == ["b", "b"]
    np.testing.assert_array_equal(np.asarray(exported.call(x, keep)), expected)
    a, k = attention_inputs(1, seed=11)
    np.testing.assert_array_equal(np.asarray(exported.call(a, k)), np.asarray(FORWARD(model, a, k)))


def test_template_with_other_dynamic_settings_is_refused(tmp_path):
    model = jq.quantize_dynamic(CharRNN("gru", nnx.Rngs(0)), RNN_SPEC, per_token=True)
    jq.save(tmp_path / "m.jq", model)
    template = jq.quantize_dynamic(CharRNN("gru", nnx.Rngs(0)), RNN_SPEC, per_token=False)
    before = model_arrays(template)
    with pytest.raises(jq.CheckpointError, match="per_token"):
        jq.load(tmp_path / "m.jq", template)
    for k, v in model_arrays(template).items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)


def test_export_batch_dim_out_of_range_names_the_input():
    model = jq.quantize_dynamic(Attention(nnx.Rngs(0)), {nnx.Einsum})
    x, keep = attention_inputs(2)
    with pytest.raises(ValueError, match="batch_dim=2 is out of range for input 1"):
        jq.export(model, x, keep, batch_dim=2)
