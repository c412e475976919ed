"""Size of the ``jaxquant/`` package at two git refs, on the comparable part only.

#13 asks for "fewer lines in jaxquant/" than at its filing (f188195). Since then whole capabilities were
added in their own files (graph mode, the native backend, weight-only LLM quantization, serving, the
trust checks); comparing the whole package would charge the renovation for them. This script counts the
package minus ``ADDED_CAPABILITIES`` at both refs (paths that did not exist at f188195, so the old count
is the whole old package), three ways per ref:

- ``lines``: every line (``wc -l``);
- ``non-blank``: lines with something on them;
- ``code``: non-blank lines that are neither comments nor docstrings (found with ``tokenize``).

Files are read with ``git show REF:path`` (text only, nothing is imported or executed).

    python benchmarks/code_size.py                  # f188195 against the working tree
    python benchmarks/code_size.py --old f188195 --new HEAD
"""
from __future__ import annotations

import argparse
import io
import subprocess
import token
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Capabilities that arrived after #13 was filed, each in files of its own (issue in brackets).
ADDED_CAPABILITIES = (
    "jaxquant/graph/",                 # graph mode over jaxprs (#14)
    "jaxquant/native/",                # oneDNN / VNNI native backend (#16)
    "jaxquant/weight_only/",           # weight-only LLM quantization: GPTQ, AWQ, SmoothQuant (#17)
    "jaxquant/models/llama.py",        # SmolLM2 / Llama model (#17)
    "jaxquant/models/bpe_tokenizer.py",  # its tokenizer (#17)
    "jaxquant/models/gguf_reader.py",  # its checkpoint reader (#17)
    "jaxquant/serving.py",             # jaxquant.compile, the serving callable
    "jaxquant/transforms/checks.py",   # actionable entry checks of the transforms (#15)
    "jaxquant/optional_deps.py",       # optional extras named in import errors (#15)
    "jaxquant/nn/quantized/dropout.py",  # nnq.Dropout, identity on QTensors (#15)
)


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout


def _files(ref: str | None) -> dict[str, str]:
    """Python files of ``jaxquant/`` at ``ref`` (``None``: the working tree's tracked files)."""
    if ref is None:
        names = _git("ls-files", "jaxquant").split()
        read = lambda n: (ROOT / n).read_text()  # noqa: E731
    else:
        names = _git("ls-tree", "-r", "--name-only", ref, "jaxquant").split()
        read = lambda n: _git("show", f"{ref}:{n}")  # noqa: E731
    return {n: read(n) for n in names
            if n.endswith(".py") and not n.startswith(ADDED_CAPABILITIES) and (ref or (ROOT / n).exists())}


def _code_lines(text: str) -> int:
    """Lines holding a token other than comments, docstrings (a string statement) and layout."""
    lines: set[int] = set()
    prev = token.NEWLINE
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type in (token.COMMENT, token.NL, token.NEWLINE, token.INDENT, token.DEDENT, token.ENDMARKER):
            if tok.type == token.NEWLINE:
                prev = token.NEWLINE
            continue
        # A string starting a logical line, with nothing after it on that line, is a docstring.
        if tok.type == token.STRING and prev in (token.NEWLINE, token.INDENT, token.DEDENT):
            prev = token.STRING
            continue
        prev = tok.type
        lines.update(range(tok.start[0], tok.end[0] + 1))
    return len(lines)


def measure(ref: str | None) -> dict[str, int]:
    files = _files(ref)
    return {"files": len(files),
            "lines": sum(t.count("\n") for t in files.values()),
            "non-blank": sum(1 for t in files.values() for line in t.splitlines() if line.strip()),
            "code": sum(_code_lines(t) for t in files.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--old", default="f188195")
    parser.add_argument("--new", default=None, help="git ref; default: the working tree")
    args = parser.parse_args()
    old, new = measure(args.old), measure(args.new)
    # the previous landing's measure: only the paths that existed at the old ref (moved code not counted)
    kept = set(_files(args.old)) & set(_files(args.new))
    old["lines, old paths only"] = old["lines"]
    new["lines, old paths only"] = sum(t.count("\n") for n, t in _files(args.new).items() if n in kept)
    print(f"jaxquant/ minus {len(ADDED_CAPABILITIES)} added-capability paths (see ADDED_CAPABILITIES)\n")
    print(f"| | {args.old} | {args.new or 'working tree'} | change |\n|---|---|---|---|")
    for key in old:
        print(f"| {key} | {old[key]:,} | {new[key]:,} | {new[key] - old[key]:+,} |")


if __name__ == "__main__":
    main()
