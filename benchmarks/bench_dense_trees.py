"""One Dense row of bench_ops (static int8 Linear, pure XLA) in two source trees, paired and interleaved.

    python benchmarks/bench_dense_trees.py                    # f188195 against this tree, 4096x4096 M=512
    python benchmarks/bench_dense_trees.py --old f188195 --k 4096 --n 4096 --m 512 --repeats 61
    python benchmarks/bench_dense_trees.py --quick            # small shape, 5 rounds

Why: ``compare_trees.py`` read "Dense 4096^2 static M=512" at 1.14x its f188195 time in one 3-round
run and 1.00x in another. Each tree is checked out (``git worktree add --detach`` under /tmp, as
``compare_trees.py`` does) and gets one worker process with ``PYTHONPATH`` at that tree, which builds
the op through its own API exactly as that tree's ``bench_ops.py`` did (f188195: ``static_linear`` on
input qparams folded at pack time; today: ``quantized_linear`` with the input qparams per call, under
``jq.use_native(False)``) on the same weights and inputs. The coordinator then asks the workers for one
timed call each in alternation (A B B A ...), so machine noise hits both alike, and reports medians
and the median of the paired ratios. It also checks the two trees' outputs are bit-identical and
writes each tree's compiled HLO (``jax.jit(f).lower(...).compile().as_text()``) under
``benchmarks/results/`` and says whether their instruction sequences (names stripped) are the same, and
whether the instructions doing the O(M K N) work (dots, custom fusions) are.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def worker(k: int, n: int, m: int, hlo_path: str) -> None:
    """Build the op with this process's jaxquant, write its compiled HLO, then time on request."""
    import contextlib

    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxquant as jq
    import jaxquant.kernels.linear as kl

    rng = np.random.default_rng(0)  # the same draws, in the same order, as bench_ops.bench_dense
    wf = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    sw = (np.abs(wf).max(0) / 127).astype(np.float32)
    wq = np.clip(np.round(wf / sw), -127, 127).astype(np.int8)
    b = rng.standard_normal(n).astype(np.float32)
    rng.standard_normal((m, k))
    xq = jnp.asarray(rng.integers(0, 256, (m, k)).astype(np.uint8))
    if hasattr(kl, "static_linear"):  # f188195: input qparams folded at pack time
        params = kl.prepack_static_linear(wq, sw, 0, b, 0.05, 128, 0.1, 128)
        fn, args, off = jax.jit(kl.static_linear), (xq, params), contextlib.nullcontext
    else:
        from jaxquant import QTensor, quint8
        packed = kl.pack_linear(wq, sw, 0, b)
        fn = jax.jit(lambda x, p: kl.quantized_linear(x, p, jnp.float32(0.1), jnp.int32(128),
                                                       out_dtype=quint8).int_data)
        args = (QTensor(xq, jnp.float32(0.05), jnp.int32(128), quint8), packed)
        off = (lambda: jq.use_native(False)) if hasattr(jq, "use_native") else contextlib.nullcontext
    with off():
        hlo = fn.lower(*args).compile().as_text()
        out = np.asarray(jax.block_until_ready(fn(*args)))
    with open(hlo_path, "w") as f:
        f.write(hlo)
    print(json.dumps({"jaxquant": jq.__file__, "out": out.ravel()[::997].tolist(),
                      "out_sum": int(out.astype(np.int64).sum())}), flush=True)
    for _ in sys.stdin:
        with off():
            jax.block_until_ready(fn(*args))  # untimed: the sample runs warm, as timing.py does
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
        print(json.dumps({"s": time.perf_counter() - t0}), flush=True)


def _shape_of(hlo: str) -> list[str]:
    """The HLO's instruction lines with names, ids and metadata stripped (what the two trees compute)."""
    keep = []
    for line in hlo.splitlines():
        line = re.sub(r", metadata=\{[^}]*\}", "", line.strip())
        line = re.sub(r"%[\w.\-]+", "%v", line)
        if " = " in line and not line.startswith("HloModule"):
            keep.append(line)
    return keep


def _heavy(lines: list[str]) -> list[str]:
    """The instructions that do the O(M K N) work: dots and the custom (oneDNN/YNN) fusions around them."""
    return [line for line in lines if re.search(r" dot\(|kind=kCustom|custom-call", line)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old", default="f188195", help="git ref of the older tree")
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--m", type=int, default=512)
    p.add_argument("--repeats", type=int, default=41)
    p.add_argument("--quick", action="store_true", help="256x256 M=64, 5 rounds")
    p.add_argument("--json", default=os.path.join(HERE, "results", "dense_trees.json"))
    p.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        k, n, m, path = args.worker
        worker(int(k), int(n), int(m), path)
        return
    if args.quick:
        args.k, args.n, args.m, args.repeats = 256, 256, 64, 5
    sys.path.insert(0, HERE)
    from compare_trees import checkout, remove
    from timing import markdown_table, write_json

    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    old_path, old_commit = checkout(args.old, build=False)  # the pure-XLA row needs no extension
    try:
        trees = {args.old: old_path, "this": ROOT}
        procs, ready, hlo = {}, {}, {}
        for label, path in trees.items():
            hlo[label] = os.path.join(HERE, "results", f"dense_trees_{label}.hlo.txt")
            env = {**os.environ, "PYTHONPATH": path}
            procs[label] = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--worker", str(args.k), str(args.n),
                 str(args.m), hlo[label]], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                env=env, cwd=path)
        for label, proc in procs.items():
            ready[label] = json.loads(proc.stdout.readline())
            print(f"{label}: {ready[label]['jaxquant']}", flush=True)
        labels = list(trees)
        times = {label: [] for label in labels}
        for r in range(args.repeats):
            for label in (labels if r % 2 == 0 else labels[::-1]):
                procs[label].stdin.write("run\n")
                procs[label].stdin.flush()
                times[label].append(json.loads(procs[label].stdout.readline())["s"])
        for proc in procs.values():
            proc.stdin.close()
            proc.wait()
    finally:
        remove(old_path)

    same_out = ready[labels[0]]["out"] == ready[labels[1]]["out"] and \
        ready[labels[0]]["out_sum"] == ready[labels[1]]["out_sum"]
    shapes = {label: _shape_of(open(path).read()) for label, path in hlo.items()}
    same_hlo = shapes[labels[0]] == shapes[labels[1]]
    same_dot = _heavy(shapes[labels[0]]) == _heavy(shapes[labels[1]])
    ratio = statistics.median(new / old for old, new in zip(times[labels[0]], times[labels[1]]))
    rows = [{"tree": label, "median ms": 1e3 * statistics.median(times[label]),
             "HLO instructions": len(shapes[label])} for label in labels]
    print(f"\nstatic int8 Dense {args.k}x{args.n} M={args.m}, pure XLA, {args.repeats} interleaved rounds\n")
    print(markdown_table(rows))
    print(f"\nthis / {args.old} (median of paired ratios): {ratio:.3f}")
    print(f"outputs bit-identical: {same_out}; compiled HLO the same (names stripped): {same_hlo}; "
          f"its dots and custom fusions the same: {same_dot}")
    print(f"HLO: {hlo[labels[0]]}, {hlo[labels[1]]}")
    write_json(args.json, rows, old=old_commit, ratio_this_over_old=ratio, same_output=same_out,
               same_hlo=same_hlo, same_dot=same_dot, shape=[args.k, args.n, args.m], repeats=args.repeats)


if __name__ == "__main__":
    main()
