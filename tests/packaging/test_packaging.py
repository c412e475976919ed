"""Packaging: what a core install promises (catalogue F09-F10).

The fresh-venv check itself (``pip install -e .`` without extras, then the README's five-line PTQ
and ``jq.export``: tests/packaging/core_install_smoke.py) takes minutes and downloads wheels, so it
runs as a step of .ci/run; these tests check the metadata it relies on.
"""
import importlib.resources
import pathlib
import sys
import tomllib

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _requirement(name: str) -> str:
    return next(r for r in PYPROJECT["dependencies"] if r.split(">")[0].split("<")[0].split("=")[0].strip() == name)


def test_core_dependencies_cover_jq_export():
    # jax.export serialization imports flatbuffers, which jax does not depend on.
    assert _requirement("flatbuffers")


def test_private_jax_and_flax_apis_are_pinned_to_the_tested_minor():
    import flax
    import jax

    assert _requirement("jax") == "jax>=0.10,<0.11" and jax.__version__.startswith("0.10.")
    assert _requirement("flax") == "flax>=0.12,<0.13" and flax.__version__.startswith("0.12.")


def test_requires_python_matches_jax():
    assert PYPROJECT["requires-python"] == ">=3.11"
    assert sys.version_info >= (3, 11)


def test_license_and_py_typed():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    assert importlib.resources.files("jaxquant").joinpath("py.typed").is_file()
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "py.typed" in package_data["jaxquant"]


def test_extras_exist():
    extras = PYPROJECT["optional-dependencies"]
    assert {"onnx", "onnxruntime"} <= set(extras["onnx"]) and "matplotlib" in extras["plot"]


def test_F09_export_onnx_without_onnx_names_the_extra(monkeypatch):
    from jaxquant.onnx_export import export_onnx

    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx -> ModuleNotFoundError
    with pytest.raises(ModuleNotFoundError, match=r"export_onnx needs .*'onnx'.*pip install 'jaxquant\[onnx\]'"):
        export_onnx(object(), np.zeros((1, 2), np.float32))


def test_F10_plot_without_matplotlib_names_the_extra(monkeypatch):
    from jaxquant.tools.numeric_debugger import NumericComparison

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    report = NumericComparison.__new__(NumericComparison)
    with pytest.raises(ModuleNotFoundError, match=r"plot needs .*'matplotlib'.*pip install 'jaxquant\[plot\]'"):
        report.plot()


def test_missing_dependency_of_an_installed_package_is_not_masked(tmp_path, monkeypatch):
    from jaxquant.optional_deps import require

    # a package that is installed but whose own dependency is missing: that dependency is named
    (tmp_path / "pkg_with_broken_dep.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_xyz") as info:
        require("pkg_with_broken_dep", "x", "feature")
    assert "jaxquant[x]" not in str(info.value)
