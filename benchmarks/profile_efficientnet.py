"""Where EfficientNet-Lite0 int8's batch-1 time goes: per-XLA-kernel profile, native vs pure XLA.

    python benchmarks/profile_efficientnet.py [--calls 20] [--quick]

Quantizes the pretrained model with the example's recipe (relu6-range; each ReLU6 folded into its conv,
so the clips run inside the conv kernels), then runs the int8 program
under ``jax.profiler`` with the native backend on and off and sums each compiled kernel's time per
call. Kernels are grouped by what they are in the optimized HLO: the oneDNN conv custom calls,
YNNPACK fusions (u8 x s8 dots), XLA loop fusions (im2col slices, depthwise tap loops, requantize
epilogues, residual adds), pads and copies. The profiler adds a per-kernel cost; read
the shares and the kernel counts, and take end-to-end times from ``bench_efficientnet.py``.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import warnings

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_efficientnet import _load_example  # noqa: E402
from profile_fashion_cnn import kernel_times  # noqa: E402
from timing import markdown_table, write_json  # noqa: E402

import jaxquant as jq  # noqa: E402
from jaxquant.datasets.sample_images import sample_images  # noqa: E402
from jaxquant.models import efficientnet_lite as eff  # noqa: E402


def _kinds(hlo_text: str) -> dict[str, str]:
    """Instruction name -> its opcode (custom calls: their target), from the compiled HLO text."""
    kinds = {}
    for line in hlo_text.splitlines():
        head, sep, rest = line.strip().removeprefix("ROOT ").partition(" = ")
        m = re.search(r"\s([a-z][\w\-]*)\(", " " + rest.split("{", 1)[-1]) if sep else None
        if not m:
            continue
        op = m.group(1)
        target = re.search(r'custom_call_target="([^"]+)"', rest)
        kinds[head.lstrip("%")] = f"custom-call {target.group(1)}" if target else op
    return kinds


def _stem(name: str) -> str:
    """``convert_pad_fusion.14`` -> ``convert_pad_fusion``: XLA names fusions after their ops."""
    return re.sub(r"[.:]\d+$", "", name)


def profile(fn, x, calls: int) -> tuple[list[dict], float]:
    hlo = jax.jit(fn).lower(x).compile().as_text()
    kinds = _kinds(hlo)
    jitted = jax.jit(fn)
    times = kernel_times(lambda _s, v: jitted(v), None, x, calls)
    groups: dict[str, list] = collections.defaultdict(lambda: [0, 0.0])
    for name, us in times.items():
        key = f"{kinds.get(name, '?')}: {_stem(name)}"
        groups[key][0] += 1
        groups[key][1] += us
    total = sum(v[1] for v in groups.values())
    rows = [{"opcode: name stem": k, "kernels": v[0], "us per call": v[1], "share": v[1] / total}
            for k, v in sorted(groups.items(), key=lambda kv: -kv[1][1])]
    top = [{"kernel": n, "kind": kinds.get(n, "?"), "us": us} for n, us in list(times.items())[:12]]
    return rows, total, top


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--n-calib", type=int, default=16)
    p.add_argument("--quick", action="store_true", help="5 calls, 4 calibration images")
    p.add_argument("--json", default="benchmarks/results/profile_efficientnet.json")
    args = p.parse_args()
    if args.quick:
        args.calls, args.n_calib = 5, 4
    warnings.filterwarnings("ignore")
    ex = _load_example()
    images = sample_images(1 + args.n_calib)
    model = eff.load_efficientnet_lite0()
    qmodel = ex.quantize_jaxquant(model, images[1:], "relu6-range", "histogram", progress=False)
    x = eff.preprocess(images[:1])
    out = {}
    for label, native in (("native", True), ("XLA", False)):
        if native and not jq.native_backend_available():
            continue
        with jq.use_native(native):
            rows, total, top = profile(lambda v: qmodel(v), x, args.calls)
        out[label] = {"groups": rows, "total_us": total, "top": top}
        print(f"\n### int8 {label}, batch 1: {total / 1e3:.2f} ms of kernels per call\n")
        print(markdown_table(rows))
        print()
        print(markdown_table(top))
    write_json(args.json, out, calls=args.calls)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
