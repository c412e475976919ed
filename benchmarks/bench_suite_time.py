"""The test suite's cost per file, in CPU seconds, from a cold XLA compile cache (as CI's fresh clone).

Runs ``python -m pytest`` on the given paths with a fresh, empty compile cache and
``JAXQUANT_TEST_CPU_REPORT`` set (tests/conftest.py then records every test's CPU and wall seconds),
and prints the files that cost most. CPU seconds count every thread and the waited-for subprocesses
(the distributed cases), so a figure measured on a loaded machine stays close to the idle one; the
wall time does not. With ``--compare-xla-flags FLAGS`` the same tests run a second time with those
flags appended (XLA reads its flags once per process, so the runs follow each other) and the table
pairs the two runs per file.

    python benchmarks/bench_suite_time.py                     # the whole suite, pytest -n 2 (~15 min)
    python benchmarks/bench_suite_time.py --quick             # three small files, one process
    python benchmarks/bench_suite_time.py tests/linen -n 0 --compare-xla-flags=--xla_cpu_use_fusion_emitters=true
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import markdown_table, write_json  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK_PATHS = ["tests/test_qconfig.py", "tests/test_choose_qparams.py", "tests/observers/test_parity_minmax.py"]


def run_suite(paths: list[str], workers: int, extra_xla_flags: str = "") -> dict:
    """One pytest run from an empty compile cache. Returns ``{"wall_s", "returncode", "tests":
    [[node id, cpu s, wall s], ...]}``."""
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, JAXQUANT_TEST_XLA_CACHE=os.path.join(tmp, "xla-cache"),
                   JAXQUANT_TEST_CPU_REPORT=os.path.join(tmp, "cpu"))
        if extra_xla_flags:
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + extra_xla_flags).strip()
        xdist = ["-n", str(workers)] if workers > 0 else ["-p", "no:xdist"]
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", *xdist, *paths], cwd=ROOT, env=env)
        wall = time.perf_counter() - start
        rows = []
        for path in glob.glob(os.path.join(tmp, "cpu.*.json")):
            with open(path) as f:
                rows += json.load(f)
    return {"wall_s": wall, "returncode": proc.returncode, "tests": rows}


def per_file(rows: list) -> dict[str, tuple[float, int]]:
    """``{test file: (CPU seconds, number of tests)}``."""
    out: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    for nodeid, cpu, _ in rows:
        entry = out[nodeid.split("::", 1)[0]]
        entry[0] += cpu
        entry[1] += 1
    return {k: (v[0], v[1]) for k, v in out.items()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="*", default=["tests"], help="pytest paths (default: the whole suite)")
    ap.add_argument("-n", "--workers", type=int, default=2, help="pytest-xdist workers; 0: one process")
    ap.add_argument("--quick", action="store_true", help="three small test files in one process")
    ap.add_argument("--top", type=int, default=15, help="files listed")
    ap.add_argument("--compare-xla-flags", default="", help="also run with these XLA_FLAGS appended")
    ap.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results", "suite_time.json"))
    args = ap.parse_args(argv)
    paths, workers = (QUICK_PATHS, 0) if args.quick else (args.paths, args.workers)

    runs = {"default": run_suite(paths, workers)}
    if args.compare_xla_flags:
        runs[args.compare_xla_flags] = run_suite(paths, workers, args.compare_xla_flags)
    files = {name: per_file(run["tests"]) for name, run in runs.items()}
    order = sorted(files["default"], key=lambda f: -files["default"][f][0])[:args.top]
    table = []
    for f in order:
        row = {"file": f, "tests": files["default"][f][1], "CPU s": files["default"][f][0]}
        for name in list(runs)[1:]:
            row[f"CPU s ({name})"] = files[name].get(f, (float("nan"), 0))[0]
        table.append(row)
    print(markdown_table(table))
    for name, run in runs.items():
        cpu = sum(r[1] for r in run["tests"])
        print(f"{name}: {len(run['tests'])} tests, {cpu:.0f} CPU s in tests, {run['wall_s']:.0f} s wall "
              f"(pytest exit {run['returncode']})")
    results = {"paths": paths, "workers": workers, "files": table,
               "runs": {k: {"wall_s": v["wall_s"], "returncode": v["returncode"],
                            "cpu_s": sum(r[1] for r in v["tests"]), "n_tests": len(v["tests"])}
                        for k, v in runs.items()}}
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
