"""Every ```python block of README.md and docs/*.md runs as pasted, in a fresh namespace.

Blocks are self-contained (their own imports, tiny models and random data), so a reader can paste
any one of them into a fresh interpreter. A block preceded by the HTML comment
``<!-- doctest: slow -->`` is marked ``slow``; ``<!-- doctest: skip (reason) -->`` skips it (the reason
is shown). Nothing else about a block is special-cased here.
"""
from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_BLOCK = re.compile(r"(?P<marker><!--\s*doctest:\s*(?P<kind>slow|skip)(?P<why>[^>]*)-->\s*\n)?"
                    r"^```python[ \t]*\n(?P<code>.*?)^```[ \t]*$", re.S | re.M)


def extract_blocks(text: str) -> list[tuple[str, str, str]]:
    """``[(code, kind, reason)]`` for every ```python block of a markdown text, in order.

    ``kind`` is ``""``, ``"slow"`` or ``"skip"`` from a ``<!-- doctest: ... -->`` comment on the
    line right before the fence."""
    return [(m["code"], m["kind"] or "", (m["why"] or "").strip()) for m in _BLOCK.finditer(text)]


def _cases():
    cases = []
    for path in DOC_FILES:
        for i, (code, kind, why) in enumerate(extract_blocks(path.read_text())):
            marks = []
            if kind == "slow":
                marks.append(pytest.mark.slow)
            elif kind == "skip":
                marks.append(pytest.mark.skip(reason=why or "marked skip in the doc"))
            cases.append(pytest.param(path, i, code, marks=marks, id=f"{path.name}#{i}"))
    return cases


CASES = _cases()


def test_extractor_sees_fences_and_markers():
    text = ("intro\n```python\na = 1\n```\n<!-- doctest: slow -->\n```python\nb = 2\n```\n"
            "```bash\nls\n```\n<!-- doctest: skip (needs a GPU) -->\n```python\nc = 3\n```\n")
    assert extract_blocks(text) == [("a = 1\n", "", ""), ("b = 2\n", "slow", ""),
                                    ("c = 3\n", "skip", "(needs a GPU)")]


def test_docs_have_python_blocks():
    # guards against the extractor silently finding nothing (e.g. after a regex change)
    assert len(CASES) >= 27


@pytest.mark.parametrize("path, index, code", CASES)
def test_doc_block_runs(path, index, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks that write files write them here
    namespace = {"__name__": "__doc_block__"}
    exec(compile(code, f"{path.name}#{index}", "exec"), namespace)
