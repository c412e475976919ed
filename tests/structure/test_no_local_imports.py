"""No function-local ``import jaxquant...`` inside jaxquant/: imports sit at module level, where a cycle
fails at once instead of hiding until some function runs (``jaxquant.nn`` loads its subpackages lazily,
PEP 562, so module-level imports across them do not close a cycle).

Optional third-party dependencies (torch, onnx, matplotlib, ...) may still be imported inside the
function that needs them; this test reads only imports of jaxquant itself. ``ALLOWED`` lists the
modules that keep local ones, each with why; it may only shrink (a listed pair that disappeared fails).
"""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2] / "jaxquant"

ALLOWED = {
    # the LLM loaders: gguf_reader <-> llama refer to each other (llm2's area, issue #17)
    ("jaxquant.models.gguf_reader", "jaxquant.models.llama"),
    ("jaxquant.models.llama", "jaxquant.models.bpe_tokenizer"),
    ("jaxquant.models.llama", "jaxquant.models.gguf_reader"),
    # weight-only calibrators <-> weight_only.api (llm2's area, issue #17)
    ("jaxquant.weight_only.awq", "jaxquant.weight_only.api"),
    ("jaxquant.weight_only.calibration", "jaxquant.weight_only.api"),
    ("jaxquant.weight_only.gptq", "jaxquant.weight_only.api"),
    ("jaxquant.weight_only.smoothquant", "jaxquant.module_paths"),
    ("jaxquant.weight_only.smoothquant", "jaxquant.nn.dynamic"),
    ("jaxquant.weight_only.smoothquant", "jaxquant.qconfig"),
}


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def local_imports(source: str) -> set:
    """The jaxquant modules imported inside a function (or method) of ``source``."""
    found = set()
    for fn in ast.walk(ast.parse(source)):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("jaxquant"):
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("jaxquant"))
    return found


def test_no_function_local_jaxquant_imports():
    found = {(module_name(p), m) for p in ROOT.rglob("*.py") for m in local_imports(p.read_text())}
    new = sorted(found - ALLOWED)
    assert not new, "function-local jaxquant imports (move them to module level): " + ", ".join(
        f"{a} -> {b}" for a, b in new)
    gone = sorted(ALLOWED - found)
    assert not gone, f"remove these fixed pairs from ALLOWED: {gone}"


def test_the_walk_sees_local_imports():
    source = "import numpy\nfrom jaxquant.qtensor import QTensor\n\ndef f():\n    import torch\n" \
             "    from jaxquant.nn import quantized\n    return quantized\n"
    assert local_imports(source) == {"jaxquant.nn"}
