"""Imports only go down DESIGN.md's layer table (dtypes -> primitives -> observers -> fake quantize ->
qconfig -> kernels -> core -> front ends -> transforms -> tools), front ends never import each other.

Every ``import`` in ``jaxquant/`` is read with ``ast`` (module level and function-local alike). The
upward imports that exist today are listed in ``KNOWN_UPWARD`` with the issue that removes them: the
test fails on any new one, and on a listed one that has disappeared (so the list only shrinks).
"""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2] / "jaxquant"

# module prefix -> (rank, layer); the longest matching prefix wins
LAYERS = {
    "jaxquant.dtypes": (0, "dtypes"), "jaxquant.torch_numerics": (0, "dtypes"),
    "jaxquant.optional_deps": (0, "dtypes"),  # imports nothing of jaxquant
    "jaxquant.version": (0, "dtypes"),
    "jaxquant.qtensor": (1, "primitives"), "jaxquant.choose_qparams": (1, "primitives"),
    "jaxquant.observers": (2, "observers"),
    "jaxquant.fake_quant": (3, "fake quantize"),
    "jaxquant.qconfig": (4, "qconfig"), "jaxquant.qconfig_mapping": (4, "qconfig"),
    "jaxquant.kernels": (5, "kernels"),
    "jaxquant.native": (5, "kernels"),  # the native backend the kernel ops dispatch to (imports no jaxquant layer)
    "jaxquant.core": (6, "core"), "jaxquant.fusion.bn_folding": (6, "core"), "jaxquant.module_paths": (6, "core"),
    "jaxquant.nn": (7, "front end nn"), "jaxquant.linen": (7, "front end linen"),
    "jaxquant.graph": (7, "front end graph"),
    "jaxquant.fusion": (8, "transforms"), "jaxquant.transforms": (8, "transforms"),
    # the module-swap tables name the front ends' module types
    "jaxquant.quantization_mappings": (8, "transforms"),
    "jaxquant.serialization": (9, "tools"), "jaxquant.export": (9, "tools"), "jaxquant.onnx_export": (9, "tools"),
    "jaxquant.tools": (9, "tools"), "jaxquant.distributed": (9, "tools"), "jaxquant.serving": (9, "tools"),
    "jaxquant": (10, "package root"),
    "jaxquant.models": (11, "models and data"), "jaxquant.datasets": (11, "models and data"),
    # weight-only / LLM quantization (issue #17): its own package, spread over the same layers
    "jaxquant.weight_only.blockwise": (1, "primitives"), "jaxquant.weight_only.matmul": (5, "kernels"),
    "jaxquant.weight_only.modules": (7, "front end nn"), "jaxquant.weight_only": (8, "transforms"),
}

# (importer, imported) pairs that go up or sideways today, each with why.
KNOWN_UPWARD: set = set()


def layer(module: str):
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len, default=None)
    return None if best is None else LAYERS[best]


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: pathlib.Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # "from jaxquant import torch_numerics" imports jaxquant.torch_numerics; a name that is not
            # a module resolves to its module's layer by prefix
            yield from (f"{node.module}.{a.name}" for a in node.names)


def resolve(target: str) -> str:
    """The longest prefix of ``target`` that is a module or package of jaxquant."""
    parts = target.split(".")
    for n in range(len(parts), 0, -1):
        base = ROOT.parent.joinpath(*parts[:n])
        if base.with_suffix(".py").exists() or (base / "__init__.py").exists():
            return ".".join(parts[:n])
    return target


def upward_imports() -> set:
    found = set()
    for path in ROOT.rglob("*.py"):
        me = module_name(path)
        mine = layer(me)
        assert mine is not None, f"{me} is in no layer of this test's table; add it"
        for target in imports(path):
            if not target.startswith("jaxquant"):
                continue
            target = resolve(target)
            if target == me:
                continue
            theirs = layer(target)
            assert theirs is not None, f"{me} imports {target}, which is in no layer; add it"
            sideways = mine[0] == theirs[0] == 7 and mine[1] != theirs[1]
            if theirs[0] > mine[0] or sideways:
                found.add((me, target))
    return found


def test_imports_only_go_down():
    found = upward_imports()
    new = sorted(found - KNOWN_UPWARD)
    assert not new, ("imports that go up DESIGN.md's layer table (or between front ends): "
                     + ", ".join(f"{a} -> {b}" for a, b in new))
    gone = sorted(KNOWN_UPWARD - found)
    assert not gone, f"remove these fixed pairs from KNOWN_UPWARD: {gone}"


def test_the_walk_sees_imports():
    # the check itself can fail: the kernels import the primitives, and the package root everything
    found = {t for t in imports(ROOT / "kernels" / "linear.py")}
    assert "jaxquant.qtensor.QTensor" in found and "jaxquant.kernels.mixed_dot.dot_general_u8s8" in found
    assert layer("jaxquant.nn.quantized.linear") == (7, "front end nn")
    assert layer("jaxquant.qconfig_mapping") == (4, "qconfig")
