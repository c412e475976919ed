"""How a model is called, timed: ``nnx.jit`` over the module vs ``jax.jit`` over split state vs
``jaxquant.compile`` (the documented serving path), side by side in one process.

Same compiled computation in all three; only the calling convention differs. Rows: a trivial model
(per-call overhead), the Fashion-MNIST CNN at batch 1 (float and static int8) and a 4096x4096 Dense
layer at M=1 (float and dynamic int8). Also reports how many bytes of model state the ``nnx.jit``
program copies to its outputs on every call (read from its compiled HLO).

    python benchmarks/bench_serving.py [--quick] [--json out.json]
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(__file__))
from timing import markdown_table, median_ms, paired_ratio, time_interleaved, write_json  # noqa: E402

import jaxquant as jq  # noqa: E402

_BYTES = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s8": 1, "u8": 1, "pred": 1, "s64": 8, "f64": 8}


def split_jit(model):
    """``x -> model(x)`` as ``jax.jit`` over the state split once (what the other benchmarks time)."""
    graphdef, state = nnx.split(model)
    f = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    return lambda x: f(state, x)


def nnx_jit(model):
    """The idiom the README used to show: graph-mode ``nnx.jit`` over the module, wrapper reused. On a
    clone: each call writes copies of every array back into the module it was given, and the others
    should keep their (cache-warm) buffers."""
    model = nnx.clone(model)
    f = nnx.jit(lambda m, x: m(x))
    return lambda x: f(model, x)


def nnx_jit_state_copies(model, x) -> int:
    """Bytes of ``copy`` instructions in the entry computation of the ``nnx.jit`` program: the state it
    hands back as outputs (XLA copies an input it returns unless the input was donated)."""
    hlo = nnx.jit(lambda m, x: m(x)).lower(nnx.clone(model), x).compile().as_text()
    entry = hlo[hlo.index("ENTRY"):]
    total = 0
    for line in entry.splitlines():
        m = re.search(r"= (\w+)\[([\d,]*)\]\{[^}]*\} copy\(", line)
        if m:
            total += _BYTES.get(m.group(1), 4) * int(np.prod([int(d) for d in m.group(2).split(",") if d] or [1]))
    return total


def call_overhead_us(served, x, calls: int) -> dict[str, float]:
    """Per-call cost of ``served(x)`` vs calling its XLA executable directly (same arrays, same program),
    back to back; the difference is what the serving wrapper adds."""
    executable = served.compiled(x)
    leaves = served._leaves  # noqa: SLF001 - the benchmark measures the wrapper against its own executable

    def loop(f):
        jax.block_until_ready(f())
        t0 = time.perf_counter()
        for _ in range(calls):
            out = f()
        jax.block_until_ready(out)
        return (time.perf_counter() - t0) / calls * 1e6

    rounds = {"served": [], "executable": []}
    for _ in range(7):
        rounds["served"].append(loop(lambda: served(x)))
        rounds["executable"].append(loop(lambda: executable(leaves, x)))
    med = {k: float(np.median(v)) for k, v in rounds.items()}
    return {"served us": med["served"], "executable us": med["executable"],
            "overhead us": float(np.median([a - b for a, b in zip(rounds["served"], rounds["executable"])]))}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default="benchmarks/results/serving.json")
    args = parser.parse_args(argv)
    repeats = 5 if args.quick else 21

    # -- per-call overhead on a trivial model
    trivial = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
    xt = jnp.ones((1, 4), jnp.float32)
    overhead = {"float Linear(4, 4)": call_overhead_us(jq.compile(trivial), xt, 2000 if args.quick else 20000),
                "dynamic int8 Linear(4, 4)": call_overhead_us(jq.compile(jq.quantize_dynamic(trivial)), xt,
                                                              2000 if args.quick else 20000)}

    # -- whole models, three calling conventions
    from bench_fashion_cnn import build_models
    from jaxquant.datasets.fashion_mnist import load_fashion_mnist, to_float_nhwc

    images = to_float_nhwc(load_fashion_mnist("test")[0][:500])
    cnn, cnn_int8, _, _ = build_models(images, with_torch=False)
    dense = nnx.Linear(4096, 4096, rngs=nnx.Rngs(0))
    cases = [
        ("trivial Linear(4, 4), M=1", trivial, xt),
        ("Fashion CNN float, batch 1", cnn, jnp.asarray(images[:1])),
        ("Fashion CNN static int8, batch 1", cnn_int8, jnp.asarray(images[:1])),
        ("Dense 4096^2 float, M=1", dense, jnp.ones((1, 4096), jnp.float32)),
        ("Dense 4096^2 dynamic int8, M=1", jq.quantize_dynamic(dense), jnp.ones((1, 4096), jnp.float32)),
    ]
    rows, raw = [], {}
    for name, model, x in cases:
        served = jq.compile(model)
        ref = np.asarray(split_jit(model)(x))
        np.testing.assert_array_equal(np.asarray(served(x)), ref)  # same program, same numbers
        times = time_interleaved({"nnx.jit": lambda f=nnx_jit(model): f(x),
                                  "jax.jit split": lambda f=split_jit(model): f(x),
                                  "jq.compile": lambda: served(x)}, repeats=repeats)
        raw[name] = times
        rows.append({
            "model": name,
            **{f"{k} ms": median_ms(v) for k, v in times.items()},
            "jq.compile / jax.jit split": paired_ratio(times, "jq.compile", "jax.jit split"),
            "nnx.jit / jax.jit split": paired_ratio(times, "nnx.jit", "jax.jit split"),
            "nnx.jit state copied per call MB": nnx_jit_state_copies(model, x) / 2**20,
        })
    print("Per-call overhead of the serving path (trivial model, back-to-back calls, microseconds):\n")
    print(markdown_table([{"model": k, **v} for k, v in overhead.items()]))
    print("\nCalling conventions, same compiled program (medians; ratios paired per round):\n")
    print(markdown_table(rows))
    write_json(args.json, {"overhead_us": overhead, "rows": rows, "raw_seconds": raw})


if __name__ == "__main__":
    main()
