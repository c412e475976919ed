"""Where the time goes: per-XLA-kernel profile of the Fashion-MNIST CNN, float32 vs static int8.

Runs the models of ``bench_fashion_cnn.py`` under ``jax.profiler``, sums each compiled kernel's
time per call (XLA:CPU thunks: ``ffi_call*`` the native backend's custom calls, labelled with their
target, ``ynn_fusion*`` YNNPACK dots/convs/pools, ``*_fusion`` XLA
loops, ``concatenate`` the im2col copy), prints one markdown table per model and batch, and
writes the optimized HLO next to the JSON so each kernel can be looked up.

    python benchmarks/profile_fashion_cnn.py [--batch 64] [--calls 30]

The profiler adds per-kernel overhead; read the shares, and take end-to-end times from
``bench_fashion_cnn.py``. For numbers undisturbed by other processes pin it to a core:
``taskset -c 1 python benchmarks/profile_fashion_cnn.py``.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, os.path.dirname(__file__))
from bench_fashion_cnn import build_models  # noqa: E402
from timing import markdown_table, write_json  # noqa: E402

from jaxquant.datasets.fashion_mnist import load_fashion_mnist, to_float_nhwc  # noqa: E402

# Host-side events of the runtime, not kernels.
_RUNTIME_EVENTS = ("ThunkExecutor", "PjitFunction", "ParseArguments", "Handle", "Allocate", "Common",
                   "Slinky", "PythonRef", "CreateOutputs", "Wait for", "ThreadpoolListener", "end:")


def kernel_times(fn, state, x, calls: int) -> dict[str, float]:
    """{kernel name: microseconds per call} of the compiled ``fn(state, x)``."""
    for _ in range(3):
        jax.block_until_ready(fn(state, x))
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            for _ in range(calls):
                jax.block_until_ready(fn(state, x))
        trace, = glob.glob(f"{d}/**/*.trace.json.gz", recursive=True)
        events = json.load(gzip.open(trace))["traceEvents"]
    totals: dict[str, float] = collections.defaultdict(float)
    for e in events:
        name = e.get("name", "")
        if e.get("ph") == "X" and not name.startswith("$") and not name.startswith(_RUNTIME_EVENTS):
            totals[name] += e["dur"] / calls
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--json", default="benchmarks/results/profile_fashion_cnn.json")
    args = parser.parse_args(argv)

    images, _ = load_fashion_mnist("test")
    images = to_float_nhwc(images[:1000])
    model, int8_model, _, _ = build_models(images, with_torch=False)
    out = {}
    for name, m in (("jax_f32", model), ("jaxquant_int8", int8_model)):
        graphdef, state = nnx.split(m)
        fn = jax.jit(lambda state, x, graphdef=graphdef: nnx.merge(graphdef, state)(x))
        for batch in args.batch:
            x = jnp.asarray(images[:batch])
            hlo_path = os.path.join(os.path.dirname(args.json), f"profile_{name}_b{batch}.hlo.txt")
            os.makedirs(os.path.dirname(hlo_path), exist_ok=True)
            hlo = fn.lower(state, x).compile().as_text()
            with open(hlo_path, "w") as f:
                f.write(hlo)
            targets = dict(re.findall(r"%(ffi_call[.\d]*) = .*?custom_call_target=\"(\w+)\"", hlo))
            times = {f"{k} ({targets[k]})" if k in targets else k: v
                     for k, v in kernel_times(fn, state, x, args.calls).items()}
            total = sum(times.values())
            rows = [{"kernel": k, "us per call": v, "share": v / total} for k, v in times.items() if v >= 0.01 * total]
            print(f"\n### {name}, batch {batch}: {total:.0f} us in {len(times)} kernels (HLO: {hlo_path})\n")
            print(markdown_table(rows))
            out[f"{name}_b{batch}"] = {"total_us": total, "kernels": times}
    write_json(args.json, out)


if __name__ == "__main__":
    main()
