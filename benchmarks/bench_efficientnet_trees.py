"""EfficientNet-Lite0 int8 at batch 1 across source trees (regression hunt), interleaved.

    python benchmarks/bench_efficientnet_trees.py [--tree old=/path/to/checkout ...] [--quick]

One worker process per source tree (``PYTHONPATH`` pointing at it, so each imports its own
jaxquant); the worker quantizes the pretrained model with that tree's own example recipe
(``examples/efficientnet_lite0_ptq.py``: relu6-range, histogram observers) and serves it under
``jax.jit``. This tree's worker has three variants (native int8, pure-XLA int8, f32), an older
tree's worker two (its int8, f32). The coordinator then runs rounds: in each round every variant of
every worker is called once untimed and once timed, in a rotated order, while the other workers
wait on their pipe, so machine noise hits all variants alike (as ``timing.time_interleaved``).
It also checks that every int8 variant returns the same logits on the same image (pure-XLA int8
must be bit-identical across trees: tests/regression pins it).

Create an old tree with ``git worktree add --detach /tmp/jq-old 0394f74``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def worker(tree: str, n_calib: int) -> None:
    """Quantize with ``tree``'s example recipe, then answer ``{"run": name}`` lines with one timing."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import importlib.util
    import warnings

    import jax
    import numpy as np

    warnings.filterwarnings("ignore")
    import jaxquant as jq
    from jaxquant.datasets.sample_images import sample_images
    from jaxquant.models import efficientnet_lite as eff

    path = os.path.join(tree, "examples", "efficientnet_lite0_ptq.py")
    spec = importlib.util.spec_from_file_location("ex_ptq", path)
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)

    images = sample_images(1 + n_calib)
    model = eff.load_efficientnet_lite0()
    qmodel = ex.quantize_jaxquant(model, images[1:], "relu6-range", "histogram", progress=False)
    x = eff.preprocess(images[:1])
    f32 = jax.jit(lambda v: model(v))
    int8 = jax.jit(lambda v: qmodel(v))
    fns = {"f32": lambda: f32(x)}
    if hasattr(jq, "use_native") and jq.native_backend_available():
        int8_xla = jax.jit(lambda v: qmodel(v))

        def xla():
            with jq.use_native(False):
                return int8_xla(x)
        fns["int8 native"] = lambda: int8(x)
        fns["int8 XLA"] = xla
    else:
        fns["int8 XLA"] = lambda: int8(x)
    logits = {}
    for name, fn in fns.items():
        logits[name] = np.asarray(jax.block_until_ready(fn())).ravel().tolist()
        jax.block_until_ready(fn())
    print(json.dumps({"ready": list(fns), "logits": logits, "jaxquant": jq.__file__}), flush=True)
    for line in sys.stdin:
        name = json.loads(line)["run"]
        jax.block_until_ready(fns[name]())  # untimed: the sample runs warm, as timing.py does
        t0 = time.perf_counter()
        jax.block_until_ready(fns[name]())
        print(json.dumps({"s": time.perf_counter() - t0}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tree", action="append", default=[], metavar="LABEL=PATH",
                   help="an older checkout to compare (repeatable); this tree is always included")
    p.add_argument("--repeats", type=int, default=31)
    p.add_argument("--n-calib", type=int, default=16)
    p.add_argument("--quick", action="store_true", help="5 rounds, 4 calibration images")
    p.add_argument("--json", default=os.path.join(HERE, "results", "efficientnet_trees.json"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.repeats, args.n_calib = 5, 4
    if args.worker:
        worker(args.worker, args.n_calib)
        return
    sys.path.insert(0, HERE)
    from timing import markdown_table, write_json

    trees = [("this", ROOT)] + [tuple(t.split("=", 1)) for t in args.tree]
    procs = {}
    for label, path in trees:
        env = {**os.environ, "PYTHONPATH": os.path.abspath(path)}
        procs[label] = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", os.path.abspath(path),
             "--n-calib", str(args.n_calib)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=path)
    ready, logits = {}, {}
    for label, proc in procs.items():  # the workers quantize and compile in parallel
        msg = json.loads(proc.stdout.readline())
        ready[label] = msg["ready"]
        for name, v in msg["logits"].items():
            logits[f"{label}: {name}"] = v
        print(f"{label}: {msg['jaxquant']} -> {msg['ready']}", flush=True)
    cands = [(label, name) for label in procs for name in ready[label]]
    times = {c: [] for c in cands}
    for r in range(args.repeats):
        order = cands[r % len(cands):] + cands[:r % len(cands)]
        for label, name in order:
            proc = procs[label]
            proc.stdin.write(json.dumps({"run": name}) + "\n")
            proc.stdin.flush()
            times[(label, name)].append(json.loads(proc.stdout.readline())["s"])
    for proc in procs.values():
        proc.stdin.close()
        proc.wait()

    import numpy as np
    ref_key = "this: int8 XLA"
    ref = np.asarray(logits[ref_key])
    base = ("this", "int8 XLA")
    rows = []
    for c in cands:
        key = f"{c[0]}: {c[1]}"
        ratio = statistics.median(b / t for b, t in zip(times[base], times[c]))
        diff = float(np.max(np.abs(np.asarray(logits[key]) - ref)))
        rows.append({"tree": c[0], "variant": c[1], "median ms": 1e3 * statistics.median(times[c]),
                     "speed-up vs this int8 XLA (paired)": ratio,
                     "max |logit - this int8 XLA|": "(float model)" if c[1] == "f32" else diff})
    print(f"\nEfficientNet-Lite0 batch 1, {args.repeats} interleaved rounds\n")
    print(markdown_table(rows))
    write_json(args.json, rows, trees=dict(trees), repeats=args.repeats)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
