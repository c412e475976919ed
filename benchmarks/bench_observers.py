"""Observer update throughput: jaxquant under jax.jit vs torch.ao.quantization observers.

Same float32 tensors for both; medians over interleaved rounds (benchmarks/timing.py).
Run: python benchmarks/bench_observers.py [--sizes 10000 1000000 10000000] [--json out.json]
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from timing import markdown_table, median_ms, paired_ratio, time_interleaved, write_json  # noqa: E402

import jaxquant.observers as jo  # noqa: E402
from jaxquant import dtypes as D  # noqa: E402


def cases():
    import torch
    tq = torch.ao.quantization
    return [
        ("MinMax", jo.MinMaxObserver(), lambda: tq.MinMaxObserver(), None),
        ("MovingAverageMinMax", jo.MovingAverageMinMaxObserver(), lambda: tq.MovingAverageMinMaxObserver(), None),
        ("PerChannelMinMax(C=64)", jo.PerChannelMinMaxObserver(dtype=D.qint8, qscheme=D.per_channel_symmetric),
         lambda: tq.PerChannelMinMaxObserver(dtype=torch.qint8, qscheme=torch.per_channel_symmetric), 64),
        ("Histogram(2048)", jo.HistogramObserver(), lambda: tq.HistogramObserver(), None),
    ]


def main() -> None:
    import torch
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000, 10_000_000])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", default="benchmarks/results/observers.json")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    rng = np.random.default_rng(0)
    rows = []
    for n in args.sizes:
        for name, ours, theirs_factory, channels in cases():
            shape = (channels, n // channels) if channels else (n,)
            x = rng.standard_normal(shape).astype(np.float32)
            xj, xt = jax.device_put(x), torch.from_numpy(x)
            update = jax.jit(ours.update)
            state = update(ours.init(shape), xj)  # steady state: range already initialised
            theirs = theirs_factory()
            theirs(xt)
            t = time_interleaved({"jax": lambda: update(state, xj), "torch": lambda: theirs(xt)},
                                 repeats=args.repeats, warmup=2)
            rows.append({"observer": name, "elements": n, "jax_ms": median_ms(t["jax"]),
                         "torch_ms": median_ms(t["torch"]), "speedup": paired_ratio(t, "torch", "jax"),
                         "jax_Gelem_s": n / (median_ms(t["jax"]) * 1e6)})
            print(rows[-1], flush=True)
        # qparams (search) cost for the histogram, independent of n
    ours = jo.HistogramObserver()
    x = rng.standard_normal(100_000).astype(np.float32)
    st = jax.jit(ours.update)(ours.init(), x)
    theirs = torch.ao.quantization.HistogramObserver()
    theirs(torch.from_numpy(x))
    cq = jax.jit(ours.calculate_qparams)
    t = time_interleaved({"jax": lambda: cq(st), "torch": lambda: theirs.calculate_qparams()}, repeats=args.repeats)
    rows.append({"observer": "Histogram calculate_qparams", "elements": 100_000, "jax_ms": median_ms(t["jax"]),
                 "torch_ms": median_ms(t["torch"]), "speedup": paired_ratio(t, "torch", "jax"), "jax_Gelem_s": float("nan")})
    print(markdown_table(rows, ["observer", "elements", "jax_ms", "torch_ms", "speedup", "jax_Gelem_s"]))
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
