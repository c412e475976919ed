"""EfficientNet-Lite0: float JAX vs jaxquant int8 vs PyTorch float / int8 (x86 eager static PTQ).

    python benchmarks/bench_efficientnet.py [--batches 1 8 32] [--repeats 15] [--json out.json] [--quick]

Latency: median over ``--repeats`` rounds, each round calling every model once in turn (one
process, interleaved) so machine noise hits all of them alike. Accuracy: top-1 agreement with the
float JAX model on ``--n-eval`` real images (no labels exist for them). The quantization recipe is
the example's (``examples/efficientnet_lite0_ptq.py``), calibrated on ``--n-calib`` images.
Prints a markdown table and writes the numbers as JSON. "jaxquant int8 native" is the default path
(the native backend where available: oneDNN convs, VNNI GEMV); "jaxquant int8 XLA" the pure-XLA
kernels (``jq.use_native(False)``). Both run the example's model, whose ReLU6 modules are folded into
their convs after convert (``jq.fuse_quantized_activations``); "int8 XLA, ReLU6 separate" is the same
int8 model without that fold on the pure-XLA kernels, the program jaxquant ran before the native
backend (issue #16's "today's int8"). All three give the same logits (checked on the eval images). Samples come from ``timing.time_interleaved`` (each after one
untimed warm call, rotated order), so the speed-ups below the table are paired per round.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
import warnings

import jax
import numpy as np

import jaxquant as jq
from jaxquant.datasets.sample_images import sample_images
from jaxquant.models import efficientnet_lite as eff

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import import_torch, markdown_table, median_ms, paired_ratio, time_interleaved  # noqa: E402


def _load_example():
    path = os.path.join(os.path.dirname(__file__), "..", "examples", "efficientnet_lite0_ptq.py")
    spec = importlib.util.spec_from_file_location("efficientnet_lite0_ptq", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--n-eval", type=int, default=200)
    p.add_argument("--n-calib", type=int, default=64)
    p.add_argument("--recipe", default="relu6-range")
    p.add_argument("--act-observer", choices=("histogram", "minmax"), default="histogram")
    p.add_argument("--json", default="benchmarks/results/efficientnet.json")
    p.add_argument("--quick", action="store_true", help="batch 1, 5 rounds, 8 eval / 4 calibration images")
    args = p.parse_args()
    if args.quick:
        args.batches, args.repeats, args.n_eval, args.n_calib = [1], 5, 8, 4
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    torch = import_torch(threads=2)
    if torch is None:
        p.error("the PyTorch rows need torch: pip install -e '.[test]'")

    ex = _load_example()
    images = sample_images(args.n_eval + args.n_calib)
    evals, calib = images[:args.n_eval], images[args.n_eval:]

    model = eff.load_efficientnet_lite0()
    t0 = time.perf_counter()
    qmodel_sep = ex.quantize_jaxquant(model, calib, args.recipe, args.act_observer, fold_relu6=False)
    qmodel = jq.fuse_quantized_activations(qmodel_sep, eff.activation_patterns(qmodel_sep))
    jq_ptq_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    tq_net = ex.quantize_torch(calib, args.recipe, args.act_observer)
    torch_ptq_s = time.perf_counter() - t0
    tnet = eff.torch_efficientnet_lite0()

    float_fn = jax.jit(lambda x: model(x))
    int8_fn = jax.jit(lambda x: qmodel(x))
    serve_float, serve_int8 = jq.compile(model), jq.compile(qmodel)  # the documented serving path
    native = jq.native_backend_available()
    print(f"native backend: {'on' if native else 'off (' + jq.native_backend_reason() + ')'}")
    int8_jit_xla = jax.jit(lambda x: qmodel(x))

    def int8_xla_fn(x):  # the pure-XLA int8 kernels (traced with the native backend off)
        with jq.use_native(False):
            return int8_jit_xla(x)
    int8_jit_sep = jax.jit(lambda x: qmodel_sep(x))

    def int8_sep_fn(x):  # before #16: pure XLA, each ReLU6 its own module
        with jq.use_native(False):
            return int8_jit_sep(x)
    ref = ex.jax_logits(float_fn, evals, desc="float JAX")
    same = np.array_equal(ex.jax_logits(int8_fn, evals), ex.jax_logits(int8_sep_fn, evals))
    print(f"int8 logits with the ReLU6 folded equal the separate-ReLU6 pure-XLA logits: {same}")
    accuracy = {
        "float JAX": {"top1_agreement": 1.0, "top1_in_float_top5": 1.0},  # the reference itself
        "jaxquant int8 native": ex.agreement(ex.jax_logits(int8_fn, evals, desc="jaxquant int8"), ref),
        **({"jaxquant int8 XLA": ex.agreement(ex.jax_logits(int8_xla_fn, evals, desc="jaxquant int8 XLA"), ref)}
           if native else {}),
        "PyTorch float": ex.agreement(ex.torch_logits(tnet, evals, desc="torch float"), ref),
        "PyTorch int8 x86": ex.agreement(ex.torch_logits(tq_net, evals, desc="torch int8"), ref),
    }

    latency: dict[int, dict[str, float]] = {}
    speedups: dict[int, dict[str, float]] = {}
    for b in args.batches:
        x = eff.preprocess(evals[np.arange(b) % len(evals)])
        # channels_last: fbgemm's int8 convs are NHWC; an NCHW input is converted at every layer.
        xt = ex.to_nchw(evals[np.arange(b) % len(evals)]).contiguous(memory_format=torch.channels_last)

        def run_torch(net, xt=xt):
            with torch.no_grad():
                net(xt)

        fns = {"float JAX": lambda x=x: float_fn(x).block_until_ready(),
               "jaxquant int8 native": lambda x=x: int8_fn(x).block_until_ready(),
               "float jq.compile": lambda x=x: serve_float(x).block_until_ready(),
               "int8 jq.compile": lambda x=x: serve_int8(x).block_until_ready(),
               "PyTorch float": lambda: run_torch(tnet),
               "PyTorch int8 x86": lambda: run_torch(tq_net)}
        if native:
            fns["jaxquant int8 XLA"] = lambda x=x: int8_xla_fn(x).block_until_ready()
        fns["int8 XLA, ReLU6 separate"] = lambda x=x: int8_sep_fn(x).block_until_ready()
        times = time_interleaved(fns, repeats=args.repeats, warmup=1, min_sample_s=0.0)
        latency[b] = {n: median_ms(t) for n, t in times.items()}
        int8 = "jaxquant int8 XLA" if native else "jaxquant int8 native"
        speedups[b] = {"int8 native vs int8 XLA": paired_ratio(times, int8, "jaxquant int8 native"),
                       "int8 native vs int8 XLA ReLU6 separate (before #16)": paired_ratio(
                           times, "int8 XLA, ReLU6 separate", "jaxquant int8 native"),
                       "int8 native vs float JAX": paired_ratio(times, "float JAX", "jaxquant int8 native"),
                       "int8 native vs PyTorch int8": paired_ratio(times, "PyTorch int8 x86", "jaxquant int8 native"),
                       "int8 XLA vs float JAX": paired_ratio(times, "float JAX", int8)}

    names = ["float JAX", "jaxquant int8 native"] + (["jaxquant int8 XLA"] if native else []) + [
        "int8 XLA, ReLU6 separate", "float jq.compile", "int8 jq.compile", "PyTorch float", "PyTorch int8 x86"]
    print(f"\nEfficientNet-Lite0, recipe '{args.recipe}', median of {args.repeats} interleaved "
          f"rounds, {torch.get_num_threads()} torch threads, jax {jax.__version__}, "
          f"torch {torch.__version__}\n")
    print("| model | " + " | ".join(f"batch {b} (ms)" for b in args.batches)
          + " | top-1 agreement | top-1 in float top-5 |")
    print("|---|" + "---|" * (len(args.batches) + 2))
    for n in names:
        # the jq.compile rows serve the same model as the rows above them: no accuracy of their own
        acc = accuracy.get("jaxquant int8 native" if n == "int8 XLA, ReLU6 separate" and same else n)
        cols = (f"{acc['top1_agreement']:.3f} | {acc['top1_in_float_top5']:.3f}" if acc is not None
                else "(same model) | (same model)")
        print(f"| {n} | " + " | ".join(f"{latency[b][n]:.1f}" for b in args.batches) + f" | {cols} |")
    print("\nspeed-ups (paired per round; > 1: the first is faster)\n")
    print(markdown_table([{"batch": b, **v} for b, v in speedups.items()]))
    sizes = {"float": jq.model_size_bytes(model), "jaxquant int8": jq.model_size_bytes(qmodel)}
    print(f"\nsize: float {sizes['float'] / 1e6:.2f} MB, jaxquant int8 "
          f"{sizes['jaxquant int8'] / 1e6:.2f} MB; PTQ wall time (fuse+prepare+calibrate+convert) "
          f"jaxquant {jq_ptq_s:.1f} s, PyTorch {torch_ptq_s:.1f} s")

    with open(args.json, "w") as f:
        json.dump({"model": "efficientnet-lite0", "recipe": args.recipe,
                   "act_observer": args.act_observer,
                   "n_eval": args.n_eval, "n_calib": args.n_calib, "repeats": args.repeats,
                   "latency_ms_median": {str(b): v for b, v in latency.items()},
                   "speedups_paired": {str(b): v for b, v in speedups.items()},
                   "accuracy_vs_float_jax": accuracy, "size_bytes": sizes,
                   "folded_relu6_logits_equal_separate": bool(same),
                   "ptq_seconds": {"jaxquant": jq_ptq_s, "pytorch": torch_ptq_s},
                   "jax": jax.__version__, "torch": torch.__version__,
                   "machine": platform.processor() or platform.machine()}, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
