"""Benchmarks of two git revisions side by side in one run: ``run_all.py --quick`` (or chosen scripts)
for an old and a new tree, alternately (A B A B ...), each in its own subprocess, then one table of
the median of every timed row per tree and the ratio new / old.

    python benchmarks/compare_trees.py                         # f188195 (the #13 baseline) vs HEAD
    python benchmarks/compare_trees.py OLD NEW --rounds 3      # any two refs
    python benchmarks/compare_trees.py f188195 HEAD --rounds 2 \\
        --script "bench_observers.py --sizes 10000 --repeats 3"   # a tiny subset

Each ref is checked out with ``git worktree add --detach`` under a fresh ``/tmp/jq-compare-*``
folder (the repository's own files are not touched) and removed at the end; the native extension
is built in place there (``setup.py build_ext --inplace``) when the tree has one, as ``pip install``
would (``--no-build`` skips it). Every run gets ``PYTHONPATH`` set to its tree, so the installed
jaxquant is never the one measured. Alternating the trees round by round spreads the slow drift of
a shared machine over both; quote the ratios, and prefer an idle machine.

Rows are read from the JSON each script writes under ``benchmarks/results/`` (through
``timing.write_json``): every list of row dicts gives one row per dict, labelled by its text fields;
every numeric field whose name says it is a time (``ms``, ``us``, ``seconds``, ``_s``; not a rate
such as ``Gelem_s``) is a metric.
Output: a markdown table and ``benchmarks/results/compare_trees.json`` (``--json``).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Iterator

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
BASELINE = "f188195"  # the tree issue #13 was filed against
TIME_KEY = re.compile(r"(^|[_\s])(ms|us|s|sec|seconds)($|[_\s])")
RATE_KEY = re.compile(r"elem|per_s|flops|/s", re.I)  # throughputs such as jax_Gelem_s are not times


def _is_time(key: str) -> bool:
    return bool(TIME_KEY.search(key.lower())) and not RATE_KEY.search(key)


def _is_unitless_time(key: str, value: Any) -> bool:
    """A float cell of a table whose header gives the unit (bench_ops' ``jax_f32``, ``jq_dyn``):
    every float that is not a ratio or a speed-up."""
    return isinstance(value, float) and not any(t in key.lower() for t in ("/", "speed", "ratio", "agree", "vs"))


def _git(*args: str, cwd: str = REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def checkout(ref: str, build: bool) -> tuple[str, str]:
    """A detached worktree of ``ref`` under /tmp; returns (path, full commit hash)."""
    commit = _git("rev-parse", "--verify", f"{ref}^{{commit}}")
    path = tempfile.mkdtemp(prefix=f"jq-compare-{commit[:8]}-", dir="/tmp")
    os.rmdir(path)  # git worktree add wants to create it
    _git("worktree", "add", "--detach", path, commit)
    if build and os.path.exists(os.path.join(path, "setup.py")):
        print(f"building the native extension of {ref} ({commit[:8]}) in {path}", flush=True)
        proc = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=path,
                              capture_output=True, text=True)
        if proc.returncode:
            print(f"  build failed (that tree runs its pure-XLA kernels):\n{proc.stderr[-2000:]}", flush=True)
    return path, commit


def remove(path: str) -> None:
    subprocess.run(["git", "worktree", "remove", "--force", path], cwd=REPO, capture_output=True)
    shutil.rmtree(path, ignore_errors=True)


def commands(tree: str, scripts: list[str]) -> list[list[str]]:
    if not scripts:
        return [[sys.executable, os.path.join(tree, "benchmarks", "run_all.py"), "--quick",
                 "--json", os.path.join(tree, "benchmarks", "results", "run_all.json")]]
    out = []
    for spec in scripts:
        name, *args = shlex.split(spec)
        out.append([sys.executable, os.path.join(tree, "benchmarks", name), *args])
    return out


def run_tree(tree: str, scripts: list[str], log: Any) -> tuple[dict[str, Any], list[int]]:
    """Run the benchmarks of ``tree`` once; returns {results file name: its JSON} written by the run."""
    env = dict(os.environ, PYTHONPATH=tree)
    results_dir = os.path.join(tree, "benchmarks", "results")
    start = time.time()
    codes = []
    for cmd in commands(tree, scripts):
        codes.append(subprocess.call(cmd, cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT))
    found = {}
    if os.path.isdir(results_dir):
        for name in sorted(os.listdir(results_dir)):
            path = os.path.join(results_dir, name)
            if name.endswith(".json") and name != "run_all.json" and os.path.getmtime(path) >= start - 1:
                with open(path) as f:
                    found[name] = json.load(f)
    return found, codes


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def metrics(doc: Any, prefix: str = "", timed: bool = False) -> Iterator[tuple[str, str, float]]:
    """(row label, metric name, value) for every timed number in a results JSON (``timed``: the
    enclosing key named a time, e.g. ``{"overhead_us": {"jit": 3.1}}``)."""
    if isinstance(doc, dict):
        for key, value in doc.items():
            if key == "environment":
                continue
            if _is_number(value) and (timed or _is_time(key)):
                yield prefix or "-", key, float(value)
            elif isinstance(value, (dict, list)):
                yield from metrics(value, f"{prefix}/{key}" if prefix else key, timed or _is_time(key))
    elif isinstance(doc, list):
        for i, item in enumerate(doc):
            if isinstance(item, dict):
                text = [f"{v}" for k, v in item.items() if isinstance(v, (str, bool)) or (
                    isinstance(v, int) and not isinstance(v, bool) and not _is_time(k))]
                label = f"{prefix} {' '.join(text)}".strip() if text else f"{prefix}[{i}]"
                for key, value in item.items():
                    if _is_number(value) and (_is_time(key) or _is_unitless_time(key, value)):
                        yield label, key, float(value)
            elif isinstance(item, list):
                yield from metrics(item, f"{prefix}[{i}]", timed)


def collect(rounds: list[dict[str, Any]]) -> dict[tuple[str, str, str], list[float]]:
    table: dict[tuple[str, str, str], list[float]] = {}
    for found in rounds:
        for name, doc in found.items():
            for label, metric, value in metrics(doc.get("results", doc) if isinstance(doc, dict) else doc):
                table.setdefault((name, label, metric), []).append(value)
    return table


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("old", nargs="?", default=BASELINE, help=f"git ref of the old tree (default {BASELINE})")
    ap.add_argument("new", nargs="?", default="HEAD", help="git ref of the new tree (default HEAD)")
    ap.add_argument("--rounds", type=int, default=3, help="A B rounds (medians over rounds)")
    ap.add_argument("--script", action="append", default=[],
                    help='run this benchmark script (with its arguments, quoted) instead of run_all.py --quick; '
                         'repeatable, e.g. --script "bench_ops.py --quick --only dense"')
    ap.add_argument("--no-build", action="store_true", help="do not build the native extension in the trees")
    ap.add_argument("--keep", action="store_true", help="keep the /tmp worktrees (and their logs)")
    ap.add_argument("--json", default=os.path.join(HERE, "results", "compare_trees.json"))
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")

    trees = {}
    try:
        for side, ref in (("old", args.old), ("new", args.new)):
            trees[side] = (ref, *checkout(ref, not args.no_build))
        runs: dict[str, list[dict[str, Any]]] = {"old": [], "new": []}
        exit_codes: dict[str, list[int]] = {"old": [], "new": []}
        for r in range(args.rounds):
            for side in ("old", "new"):
                ref, path, commit = trees[side]
                log_path = os.path.join(path, f"compare_trees_round{r}.log")
                print(f"round {r + 1}/{args.rounds}: {side} ({ref}, {commit[:8]}), log {log_path}", flush=True)
                with open(log_path, "w") as log:
                    found, codes = run_tree(path, args.script, log)
                runs[side].append(found)
                exit_codes[side].extend(codes)
                if any(codes):
                    print(f"  a benchmark of {side} exited with {codes}; see {log_path}", flush=True)
        old, new = collect(runs["old"]), collect(runs["new"])
        rows = []
        for key in sorted(set(old) | set(new)):
            o = statistics.median(old[key]) if key in old else None
            n = statistics.median(new[key]) if key in new else None
            rows.append({"file": key[0], "row": key[1], "metric": key[2], "old": o, "new": n,
                         "new/old": n / o if o and n is not None else None,
                         "samples": f"{len(old.get(key, []))}/{len(new.get(key, []))}"})
        print(f"\nold = {args.old} ({trees['old'][2][:8]}), new = {args.new} ({trees['new'][2][:8]}); "
              f"medians over {args.rounds} alternated rounds\n")
        print("| file | row | metric | old | new | new/old |\n|---|---|---|---|---|---|")
        for row in rows:
            print(f"| {row['file']} | {row['row']} | {row['metric']} | {_fmt(row['old'])} | {_fmt(row['new'])} | "
                  f"{_fmt(row['new/old'])} |")
        ratios = [row["new/old"] for row in rows if row["new/old"]]
        if ratios:
            print(f"\nmedian new/old over {len(ratios)} rows both trees measured: {statistics.median(ratios):.3f}")
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"old": {"ref": args.old, "commit": trees["old"][2]},
                       "new": {"ref": args.new, "commit": trees["new"][2]},
                       "rounds": args.rounds, "scripts": args.script or ["run_all.py --quick"],
                       "exit_codes": exit_codes, "rows": rows}, f, indent=2)
        return 1 if any(exit_codes["old"] + exit_codes["new"]) else 0
    finally:
        if not args.keep:
            for _, path, _ in trees.values():
                remove(path)


if __name__ == "__main__":
    sys.exit(main())
