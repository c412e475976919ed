"""The whole benchmark suite in one command: each script in its own process, one after another.

    python benchmarks/run_all.py            # every benchmark (10-20 minutes on 2 idle cores)
    python benchmarks/run_all.py --quick    # int8 kernels, the Fashion-MNIST CNN and the serving path

Every script prints its markdown tables and writes its JSON under ``benchmarks/results/``; this
runner streams their output, then prints how long each took and writes
``benchmarks/results/run_all.json`` naming each script, its command, exit code and duration.
Run it on an otherwise idle machine: other processes move the absolute times (the paired ratios
less so).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

# (script, arguments of the full run, arguments of the quick run or None to skip it there)
SUITE: list[tuple[str, list[str], list[str] | None]] = [
    ("bench_ops.py", [], ["--quick"]),
    ("bench_fashion_cnn.py", [], ["--quick"]),
    ("bench_serving.py", [], ["--quick"]),
    ("bench_dynamic.py", [], None),
    ("bench_minilm.py", [], None),
    ("bench_efficientnet.py", ["--batches", "1", "8", "--repeats", "9"], None),
    ("bench_qat.py", [], None),
    ("bench_onnxruntime.py", [], None),
    ("bench_observers.py", [], None),
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="kernels, the CNN and the serving path only")
    parser.add_argument("--json", default=os.path.join(HERE, "results", "run_all.json"))
    args = parser.parse_args(argv)

    runs = []
    for script, full, quick in SUITE:
        extra = quick if args.quick else full
        if extra is None:
            continue
        command = [sys.executable, os.path.join(HERE, script), *extra]
        print(f"\n## {script} {' '.join(extra)}\n", flush=True)
        start = time.perf_counter()
        code = subprocess.call(command, cwd=os.path.dirname(HERE))
        runs.append({"script": script, "args": extra, "exit_code": code,
                     "seconds": round(time.perf_counter() - start, 1)})

    print("\n| script | exit code | seconds |\n|---|---|---|")
    for run in runs:
        print(f"| {run['script']} {' '.join(run['args'])} | {run['exit_code']} | {run['seconds']} |")
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"quick": args.quick, "runs": runs}, f, indent=2)
    return max((run["exit_code"] for run in runs), default=0)


if __name__ == "__main__":
    sys.exit(main())
