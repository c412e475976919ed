"""Real English text that ships with every CPython: the ``pydoc_data.topics`` help pages.

Used as calibration/evaluation text for sentence encoders (``pydoc_sentences``) and as a
corpus for character-level language models (``pydoc_text``). The content depends on the
Python version, but for a given interpreter the output is fully deterministic.
"""

from __future__ import annotations

import functools
import re

__all__ = ["pydoc_text", "pydoc_sentences"]

# A sentence ends at . ! or ? followed by whitespace and something that starts a sentence.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"“‘(])")
_HEADING_RULE = re.compile(r"^\s*([*=\-^~])\1{3,}\s*$")
_LIST_MARKER = re.compile(r"^(?:\d+\.|\*|-|\+|\[\d+\])\s+")  # list items, footnotes
# Abbreviations after which the splitter must not cut ("e.g. Foo", "Mr. X" ...).
_NO_SPLIT_BEFORE = ("e.g.", "i.e.", "etc.", "vs.", "cf.", "Mr.", "Dr.", "approx.", "no.")


def _topics() -> dict[str, str]:
    try:
        from pydoc_data import topics
    except ImportError as e:  # pragma: no cover - stripped-down Python builds
        raise ImportError(
            "pydoc_data.topics is missing from this Python build; install the full standard "
            "library (e.g. the python3-doc / libpython3-stdlib package)."
        ) from e
    return topics.topics


def pydoc_text() -> str:
    """All help topics concatenated (sorted by topic name), as one str; ~465k characters."""
    t = _topics()
    return "\n\n".join(t[k] for k in sorted(t))


def _prose_paragraphs(page: str):
    """Yield unindented prose paragraphs, joined to one line; skip code, grammar and headings."""
    for block in re.split(r"\n\s*\n", page):
        lines = block.split("\n")
        if not lines or not lines[0].strip():
            continue
        # Indented blocks are code samples, grammar productions, tables or notes.
        if lines[0][:1].isspace():
            continue
        if any(_HEADING_RULE.match(line) for line in lines):
            continue
        text = " ".join(line.strip() for line in lines)
        yield _LIST_MARKER.sub("", text)


def _split_sentences(paragraph: str) -> list[str]:
    parts = _SENTENCE_END.split(paragraph)
    merged: list[str] = []
    for p in parts:
        if merged and merged[-1].endswith(_NO_SPLIT_BEFORE):
            merged[-1] = f"{merged[-1]} {p}"
        else:
            merged.append(p)
    return merged


def _is_clean(s: str) -> bool:
    words = s.split()
    if not 5 <= len(words) <= 60 or s[-1] not in ".!?":
        return False
    if "::=" in s or ">>>" in s or "|" in s:
        return False
    # Mostly words: rejects lines of code or symbol soup that slipped through.
    letters = sum(c.isalpha() for c in s)
    return letters >= 0.6 * len(s)


@functools.lru_cache(maxsize=1)
def _all_sentences() -> tuple[str, ...]:
    t = _topics()
    seen: set[str] = set()
    out: list[str] = []
    for key in sorted(t):
        for para in _prose_paragraphs(t[key]):
            for s in _split_sentences(re.sub(r"\s+", " ", para).strip()):
                if s and _is_clean(s) and s not in seen:
                    seen.add(s)
                    out.append(s)
    return tuple(out)


def pydoc_sentences(n: int | None = None) -> list[str]:
    """The first ``n`` (default: all, a few thousand) clean English sentences from the help pages.

    Deterministic order (topics sorted by name, then document order), deduplicated; each
    sentence is one line of 5-60 words ending in . ! or ?.
    """
    sentences = _all_sentences()
    if n is None:
        return list(sentences)
    if n < 0:
        raise ValueError(f"n={n}; ask for a non-negative number of sentences.")
    if n > len(sentences):
        raise ValueError(
            f"n={n} but this Python's pydoc topics yield only {len(sentences)} clean sentences; "
            "ask for fewer or pass n=None."
        )
    return list(sentences[:n])
