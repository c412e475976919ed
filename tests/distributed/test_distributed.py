"""Runs the multi-device cases (``_cases.py``) in a subprocess with 8 forced host CPU devices and
reports each case as its own test here.

jax fixes its device count when its backend first starts, which in a whole-suite run has already
happened in this process with one CPU device; a fresh interpreter with XLA_FLAGS set is the only
reliable way to get 8.
"""
import ast
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

HERE = Path(__file__).parent
CASES = HERE / "_cases.py"
ROOT = HERE.parent.parent


def _case_names() -> list[str]:
    tree = ast.parse(CASES.read_text())
    return [n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")]


@pytest.fixture(scope="module")
def case_results(tmp_path_factory):
    report = tmp_path_factory.mktemp("distributed") / "junit.xml"
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    env.pop("PYTEST_XDIST_WORKER", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(CASES), "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
         f"--junitxml={report}", "-o", "junit_family=xunit2"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500,
    )
    if not report.exists():
        pytest.fail(f"the multi-device subprocess produced no report:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    results: dict[str, list[tuple[str, str]]] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        name = case.get("name", "")
        base = name.split("[")[0]
        outcome, text = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome, text = "failed", (child.get("message") or "") + "\n" + (child.text or "")
            elif child.tag == "skipped":
                kind = "xfailed" if child.get("type") == "pytest.xfail" else "skipped"
                outcome, text = kind, child.get("message") or ""
        results.setdefault(base, []).append((f"{name}: {outcome}", text))
    return results, proc


@pytest.mark.slow
@pytest.mark.parametrize("case", _case_names())
def test_multi_device_case(case, case_results):
    results, proc = case_results
    if case not in results:
        pytest.fail(f"{case} did not run in the subprocess (collection error?):\n{proc.stdout[-3000:]}")
    failed = [(n, t) for n, t in results[case] if n.endswith(": failed")]
    assert not failed, "\n\n".join(f"{n}\n{t[-3000:]}" for n, t in failed)
    if all(n.endswith(": xfailed") for n, _ in results[case]):
        pytest.xfail(results[case][0][1])
