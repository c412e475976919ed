"""onnxruntime int8 (QDQ export) vs jaxquant int8 vs JAX float32 on the FashionCNN, batch 1 and 32.

Random-init weights (speed does not depend on them), static PTQ with PyTorch's x86 recipe (MinMax
activations), ONNX exported with ``jaxquant.onnx_export.export_onnx``. All candidates are timed
interleaved in one process; medians of per-call times and paired speed-ups against JAX float32.
onnxruntime runs with 2 intra-op threads (the machine's cores) and full graph optimisation, which
fuses the DequantizeLinear/QuantizeLinear pairs into QLinearConv / QGemm.

    python benchmarks/bench_onnxruntime.py [--repeats 15] [--json benchmarks/results/onnxruntime.json]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import block, markdown_table, median_ms, paired_ratio, time_interleaved, write_json  # noqa: E402

import jaxquant as jq  # noqa: E402
from jaxquant.models.fashion_cnn import FashionCNN, fusion_patterns  # noqa: E402
from jaxquant.onnx_export import export_onnx  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--json", default="benchmarks/results/onnxruntime.json")
    args = parser.parse_args()
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    model = FashionCNN(rngs=nnx.Rngs(0))
    model.eval()
    fused = jq.fuse_modules(model, fusion_patterns(model))
    qconfig = jq.QConfig(activation=jq.MinMaxObserver.with_args(reduce_range=True),
                         weight=jq.default_per_channel_weight_observer)
    prepared = jq.prepare(fused, qconfig)
    jq.calibrate(prepared, [jnp.asarray(rng.uniform(size=(32, 28, 28, 1)).astype(np.float32)) for _ in range(4)],
                 progress=False)
    int8_model = jq.convert(prepared)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "cnn.onnx")
        export_onnx(int8_model, np.zeros((2, 28, 28, 1), np.float32), path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    jit_float, jit_int8 = jax.jit(model), jax.jit(int8_model)
    rows = []
    for n in args.batches:
        x = rng.uniform(size=(n, 28, 28, 1)).astype(np.float32)
        xj = jnp.asarray(x)
        y_q = np.asarray(jit_int8(xj))
        y_ort = sess.run(None, {"input": x})[0]
        step = float(int8_model.fc2.out_scale.get_value())
        times = time_interleaved({
            "jax_float32": lambda: block(jit_float(xj)),
            "jaxquant_int8": lambda: block(jit_int8(xj)),
            "onnxruntime_int8": lambda: sess.run(None, {"input": x}),
        }, repeats=args.repeats)
        rows.append({
            "batch": n,
            "jax_float32_ms": median_ms(times["jax_float32"]),
            "jaxquant_int8_ms": median_ms(times["jaxquant_int8"]),
            "onnxruntime_int8_ms": median_ms(times["onnxruntime_int8"]),
            "jaxquant_int8_speedup": paired_ratio(times, "jax_float32", "jaxquant_int8"),
            "onnxruntime_int8_speedup": paired_ratio(times, "jax_float32", "onnxruntime_int8"),
            "max_diff_in_steps": float(np.max(np.abs(y_q - y_ort)) / step),
        })
    print(markdown_table(rows))
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    write_json(args.json, rows, model="FashionCNN(width=32), static int8, per-channel weights",
               onnxruntime=ort.__version__)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
