"""Byte-level BPE tokenizer (GPT-2 style) built from a GGUF file's ``tokenizer.ggml.*`` tables.

Pre-tokenization follows the SmolLM tokenizer (llama.cpp's ``smollm`` pre-type, Hugging Face's
``Sequence[Digits(individual_digits=True), ByteLevel(add_prefix_space=False)]``): every digit is
its own piece, then GPT-2's regex splits words, numbers, punctuation runs and whitespace. Each
piece's UTF-8 bytes are mapped to GPT-2's printable byte alphabet and merged by rank. Control
tokens (type 3, e.g. ``<|im_start|>``) in the text are matched whole.
"""
from __future__ import annotations

import functools
from typing import Sequence

__all__ = ["BPETokenizer", "bytes_to_unicode"]

_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_CONTROL = 3


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


class BPETokenizer:
    """``encode(str) -> list[int]`` and ``decode(list[int]) -> str`` for a GPT-2 byte-level BPE.

    Args:
      tokens: id -> token string (GPT-2 byte alphabet).
      merges: ``"left right"`` strings, best (lowest rank) first.
      token_types: GGUF token types (3 = control token, matched whole in the input text).
      bos_token_id, eos_token_id: special ids (``-1`` if none).
    """

    def __init__(self, tokens: Sequence[str], merges: Sequence[str], token_types: Sequence[int] | None = None,
                 bos_token_id: int = -1, eos_token_id: int = -1):
        try:
            import regex
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("the BPE tokenizer needs the `regex` package (unicode classes): pip install regex") from e
        self.tokens = list(tokens)
        self.vocab = {t: i for i, t in enumerate(self.tokens)}
        self.ranks = {tuple(m.split(" ")): r for r, m in enumerate(merges)}
        types = list(token_types) if token_types is not None else [1] * len(self.tokens)
        self.special = {t: i for i, t in enumerate(self.tokens) if types[i] == _CONTROL}
        self.bos_token_id, self.eos_token_id = int(bos_token_id), int(eos_token_id)
        self._pattern = regex.compile(_GPT2_PATTERN)
        self._digits = regex.compile(r"\p{N}|[^\p{N}]+")
        specials = sorted(self.special, key=len, reverse=True)
        self._special_re = regex.compile("(" + "|".join(regex.escape(s) for s in specials) + ")") if specials else None
        self._byte_map = bytes_to_unicode()
        self._byte_unmap = {c: b for b, c in self._byte_map.items()}
        self._cache: dict[str, tuple[int, ...]] = {}

    @classmethod
    def from_gguf(cls, g) -> "BPETokenizer":
        """From a :class:`jaxquant.models.gguf_reader.LlamaGGUF`."""
        return cls(g.tokens, g.merges, g.token_types, g.bos_token_id, g.eos_token_id)

    def __len__(self) -> int:
        return len(self.tokens)

    def _bpe(self, piece: str) -> tuple[int, ...]:
        hit = self._cache.get(piece)
        if hit is not None:
            return hit
        word = [self._byte_map[b] for b in piece.encode("utf-8")]
        while len(word) > 1:
            best, best_rank = -1, None
            for i in range(len(word) - 1):
                r = self.ranks.get((word[i], word[i + 1]))
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = i, r
            if best < 0:
                break
            a, b = word[best], word[best + 1]
            # Merge every occurrence of this pair, left to right (as the reference implementations do).
            out, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == a and word[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            word = out
        ids = []
        for w in word:
            if w not in self.vocab:
                raise ValueError(f"BPETokenizer: piece {w!r} of {piece!r} is not in the vocabulary; the merges and "
                                 "tokens tables do not belong together")
            ids.append(self.vocab[w])
        result = tuple(ids)
        if len(self._cache) < 200_000:
            self._cache[piece] = result
        return result

    def _encode_plain(self, text: str, out: list[int]) -> None:
        for chunk in self._digits.findall(text):
            for piece in self._pattern.findall(chunk):
                out.extend(self._bpe(piece))

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        """Token ids of ``text`` (control-token strings in it map to their ids)."""
        if not isinstance(text, str):
            raise TypeError(f"BPETokenizer.encode: expected str, got {type(text).__name__}")
        out: list[int] = [self.bos_token_id] if add_bos and self.bos_token_id >= 0 else []
        parts = self._special_re.split(text) if self._special_re is not None else [text]
        for part in parts:
            if not part:
                continue
            if part in self.special:
                out.append(self.special[part])
            else:
                self._encode_plain(part, out)
        return out

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (invalid UTF-8 from a cut multi-byte character becomes U+FFFD)."""
        n = len(self.tokens)
        chunks: list[bytes] = []
        for i in ids:
            i = int(i)
            if not 0 <= i < n:
                raise ValueError(f"BPETokenizer.decode: id {i} is outside the vocabulary [0, {n})")
            t = self.tokens[i]
            if t in self.special:
                chunks.append(t.encode("utf-8"))
            else:
                chunks.append(bytes(self._byte_unmap.get(c, 63) for c in t))
        return b"".join(chunks).decode("utf-8", errors="replace")
