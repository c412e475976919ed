"""Threads for the native backend on this machine: OpenMP thread count and wait policy.

oneDNN (GNU OpenMP) and the VNNI GEMV run their parallel regions inside XLA's custom calls, while XLA
runs the rest of the program on its own thread pool. Each configuration runs in a fresh process
(libgomp reads its environment once) and times: a 3x3 64->64 conv at 56x56 (batch 1 and 8), a chain of
conv -> XLA max-pool -> conv (where spinning OpenMP workers would steal the cores from XLA's next
kernel), and the 4096x4096 GEMV at M=1.

    python benchmarks/bench_native_threads.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r'''
import json, sys, time
import numpy as np, jax, jax.numpy as jnp
sys.path.insert(0, sys.argv[1])
from timing import median_ms
import jaxquant as jq
from jaxquant.kernels.conv import pack_conv, quantized_conv
from jaxquant.kernels.linear import pack_linear, quantized_linear_dynamic
repeats = int(sys.argv[2])
rng = np.random.default_rng(0)
w = rng.integers(-127, 128, (3, 3, 64, 64), dtype=np.int8)
p = pack_conv(w, np.float32(2e-3), 0, None, padding="SAME")
def static_conv(x, p):
    xq = jq.QTensor(x, jnp.float32(0.05), jnp.int32(128), jq.quint8)
    return quantized_conv(xq, p, jnp.float32(0.1), jnp.int32(128), out_dtype=jq.quint8, relu=True).int_data
conv = jax.jit(static_conv)
def chain(x):
    y = static_conv(x, p)
    y = jax.lax.reduce_window(y, np.uint8(0), jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    y = jnp.repeat(jnp.repeat(y, 2, 1), 2, 2)
    return static_conv(y, p)
chain = jax.jit(chain)
wl = rng.integers(-127, 128, (4096, 4096), dtype=np.int8)
pl = pack_linear(wl, np.full(4096, 1e-3, np.float32), 0, None)
dyn = jax.jit(quantized_linear_dynamic)
cases = {
    "conv b1": (conv, (jnp.asarray(rng.integers(0, 256, (1, 56, 56, 64)).astype(np.uint8)), p)),
    "conv b8": (conv, (jnp.asarray(rng.integers(0, 256, (8, 56, 56, 64)).astype(np.uint8)), p)),
    "conv-pool-conv b1": (chain, (jnp.asarray(rng.integers(0, 256, (1, 56, 56, 64)).astype(np.uint8)),)),
    "gemv 4096^2 M=1": (dyn, (jnp.asarray(rng.standard_normal((1, 4096)).astype(np.float32)), pl)),
}
out = {}
for name, (f, args) in cases.items():
    f(*args).block_until_ready()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter(); f(*args).block_until_ready(); ts.append(time.perf_counter() - t)
    out[name] = median_ms(ts)
print(json.dumps({"native": jq.native_backend_available(), "ms": out}))
'''

CONFIGS = [
    ("OMP 2 threads, active wait (libgomp default)", {"OMP_NUM_THREADS": "2"}),
    ("OMP 2 threads, passive wait", {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"}),
    ("OMP 1 thread", {"OMP_NUM_THREADS": "1"}),
]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    here = os.path.dirname(os.path.abspath(__file__))
    rows = []
    for name, env in CONFIGS:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_"))}
        full_env.update(env)
        res = subprocess.run([sys.executable, "-c", CHILD, here, "15" if args.quick else "51"], env=full_env,
                             capture_output=True, text=True, check=True)
        result = json.loads(res.stdout.strip().splitlines()[-1])
        if not result["native"]:
            print("native backend unavailable: nothing to measure")
            return
        rows.append((name, result["ms"]))
        print(name, {k: round(v, 3) for k, v in result["ms"].items()}, flush=True)
    cols = list(rows[0][1])
    print("\n| configuration | " + " | ".join(f"{c} (ms)" for c in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for name, ms in rows:
        print(f"| {name} | " + " | ".join(f"{ms[c]:.3f}" for c in cols) + " |")


if __name__ == "__main__":
    main()
