"""Op-level CPU benchmark: jaxquant int8 kernels vs JAX float32 vs PyTorch (f32 and int8, x86).

    python benchmarks/bench_ops.py [--quick] [--json out.json]

Every row times its candidates interleaved in this one process (medians over rounds) and
reports paired ratios (see benchmarks/timing.py). Columns are milliseconds per call. ``jq_*`` columns
are jaxquant's default path (the native backend where it is available and takes the op: oneDNN convs,
the VNNI GEMV up to ``GEMV_MAX_M`` rows, for dynamic Linear with the activation's quantization in the
same call, oneDNN's int8 matmul above it for weights up to ``MATMUL_MAX_WEIGHT`` elements, the AVX-512
max pool); ``jq_*_xla`` force the pure-XLA kernels (``jq.use_native(False)``). ``3136x128`` is the
Fashion CNN's fc1; the MaxPool table times its pools at batch 64.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

import jaxquant as jq  # noqa: E402
from jaxquant.dtypes import quint8  # noqa: E402
from jaxquant.kernels.conv import pack_conv, quantized_conv  # noqa: E402
from jaxquant.kernels.linear import pack_linear, quantized_linear, quantized_linear_dynamic  # noqa: E402
from jaxquant.kernels.pooling import quantized_max_pool2d  # noqa: E402
from jaxquant.qtensor import QTensor  # noqa: E402
from timing import (import_torch, markdown_table, median_ms, paired_ratio, time_interleaved,  # noqa: E402
                    write_json)

torch = import_torch(threads=2)  # None without torch: its columns become n/a
if torch is not None:
    import torch.ao.nn.quantized as nnq

NAN = float("nan")
NATIVE = jq.native_backend_available()


def pure_xla(fn):
    """``fn`` traced and run with the native backend off (a separate jit cache entry)."""
    def run(*args):
        with jq.use_native(False):
            return fn(*args)
    return run


def bench_dense(shapes, ms, repeats):
    rows = []
    rng = np.random.default_rng(0)
    f32 = jax.jit(lambda x, w, b: x @ w + b)
    dyn = jax.jit(quantized_linear_dynamic)
    sta = jax.jit(lambda xq, p: quantized_linear(xq, p, jnp.float32(0.1), jnp.int32(128), out_dtype=quint8).int_data)
    for k, n in shapes:
        wf = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
        sw = (np.abs(wf).max(0) / 127).astype(np.float32)
        wq = np.clip(np.round(wf / sw), -127, 127).astype(np.int8)
        b = rng.standard_normal(n).astype(np.float32)
        wf_j, b_j = jnp.asarray(wf), jnp.asarray(b)
        pd = ps = pack_linear(wq, sw, 0, b)
        if torch is not None:
            wt = torch.quantize_per_channel(torch.tensor(wq.T.astype(np.float32) * sw[:, None]),
                                            torch.tensor(sw, dtype=torch.float64),
                                            torch.zeros(n, dtype=torch.int64), 0, torch.qint8)
            packed = torch.ops.quantized.linear_prepack(wt, torch.tensor(b))
            tq = nnq.Linear(k, n)
            tq.set_weight_bias(wt, torch.tensor(b))
            tq.scale, tq.zero_point = 0.1, 128
            wf_t, b_t = torch.tensor(wf.T.copy()), torch.tensor(b)
        for m in ms:
            x = rng.standard_normal((m, k)).astype(np.float32)
            xq = rng.integers(0, 256, (m, k)).astype(np.uint8)
            x_j, xq_j = jnp.asarray(x), QTensor(jnp.asarray(xq), jnp.float32(0.05), jnp.int32(128), quint8)
            fns = {
                "jax_f32": lambda: f32(x_j, wf_j, b_j),
                "jq_dyn": lambda: dyn(x_j, pd),
                "jq_static": lambda: sta(xq_j, ps),
            }
            if NATIVE:
                fns["jq_dyn_xla"] = lambda: pure_xla(dyn)(x_j, pd)
                fns["jq_static_xla"] = lambda: pure_xla(sta)(xq_j, ps)
            if torch is not None:
                x_t = torch.tensor(x)
                xq_t = torch._make_per_tensor_quantized_tensor(torch.tensor(xq), 0.05, 128)

                def t_f32():
                    with torch.no_grad():
                        return torch.nn.functional.linear(x_t, wf_t, b_t)
                fns["torch_f32"] = t_f32
                fns["torch_dyn"] = lambda: torch.ops.quantized.linear_dynamic(x_t, packed, True)
                fns["torch_static"] = lambda: tq(xq_t)
            t = time_interleaved(fns, repeats=repeats)
            med = {name: median_ms(v) for name, v in t.items()}
            row = {"K x N": f"{k}x{n}", "M": m, **med,
                   "f32/dyn": paired_ratio(t, "jax_f32", "jq_dyn"),
                   "f32/static": paired_ratio(t, "jax_f32", "jq_static")}
            if NATIVE:
                row["xla/native dyn"] = paired_ratio(t, "jq_dyn_xla", "jq_dyn")
                row["xla/native static"] = paired_ratio(t, "jq_static_xla", "jq_static")
            if torch is not None:
                row["dyn/torch_dyn"] = paired_ratio(t, "jq_dyn", "torch_dyn")
                row["static/torch_static"] = paired_ratio(t, "jq_static", "torch_static")
            rows.append(row)
            print(markdown_table([row]).splitlines()[-1], flush=True)
    return rows


CONVS = [  # name, H, cin, cout, k, stride, groups
    ("3x3 64->64 @56", 56, 64, 64, 3, 1, 1),
    ("3x3 128->128 @28", 28, 128, 128, 3, 1, 1),
    ("1x1 256->64 @56", 56, 256, 64, 1, 1, 1),
    ("3x3 s2 128->256 @56", 56, 128, 256, 3, 2, 1),
    ("dw3x3 32 @112", 112, 32, 32, 3, 1, 32),
    ("dw3x3 576 @14", 14, 576, 576, 3, 1, 576),
]


def _depthwise_taps_f32(x, w, stride, pad):
    """float32 depthwise conv (NHWC, ``w`` (k, k, 1, C)) as a k*k shift-multiply-add loop."""
    k = w.shape[0]
    x = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    ho = (x.shape[1] - k) // stride + 1
    wo = (x.shape[2] - k) // stride + 1
    acc = 0.0
    for i in range(k):
        for j in range(k):
            xs = lax.slice(x, (0, i, j, 0), (x.shape[0], i + (ho - 1) * stride + 1, j + (wo - 1) * stride + 1,
                                             x.shape[3]), (1, stride, stride, 1))
            acc = acc + xs * w[i, j, 0]
    return acc


def bench_conv(convs, batches, repeats):
    rows = []
    rng = np.random.default_rng(1)
    for name, h, cin, cout, k, s, g in convs:
        pad = k // 2
        wf = (rng.standard_normal((k, k, cin // g, cout)) * 0.05).astype(np.float32)
        sw = (np.abs(wf).reshape(-1, cout).max(0) / 127).astype(np.float32)
        wq = np.clip(np.round(wf / sw), -127, 127).astype(np.int8)
        b = rng.standard_normal(cout).astype(np.float32)
        p = pack_conv(wq, sw, 0, b, strides=s, padding=((pad, pad), (pad, pad)), groups=g)
        f32 = jax.jit(lambda x, w, b: lax.conv_general_dilated(
            x, w, (s, s), ((pad, pad), (pad, pad)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=g) + b)
        q8 = jax.jit(lambda xq, p: quantized_conv(xq, p, jnp.float32(0.1), jnp.int32(128), out_dtype=quint8).int_data)
        wf_j, b_j = jnp.asarray(wf), jnp.asarray(b)
        depthwise = g == cin == cout
        if depthwise:
            # XLA's feature_group_count conv is slow on CPU; the best float32 depthwise conv in JAX is
            # the same k*k shift-multiply-add loop jaxquant uses for int8, so both are timed.
            f32_taps = jax.jit(lambda x, w, b: _depthwise_taps_f32(x, w, s, pad) + b)
        if torch is not None:
            w_oihw = torch.tensor(wf.transpose(3, 2, 0, 1).copy())
            tf = torch.nn.Conv2d(cin, cout, k, s, pad, groups=g).eval()
            with torch.no_grad():
                tf.weight.copy_(w_oihw)
                tf.bias.copy_(torch.tensor(b))
            tf = tf.to(memory_format=torch.channels_last)
            wt = torch.quantize_per_channel(
                torch.tensor(wq.transpose(3, 2, 0, 1).astype(np.float32) * sw[:, None, None, None]),
                torch.tensor(sw, dtype=torch.float64), torch.zeros(cout, dtype=torch.int64), 0, torch.qint8)
            tq = nnq.Conv2d(cin, cout, k, s, pad, groups=g)
            tq.set_weight_bias(wt, torch.tensor(b))
            tq.scale, tq.zero_point = 0.1, 128
        for nb in batches:
            x = rng.standard_normal((nb, h, h, cin)).astype(np.float32)
            xq = rng.integers(0, 256, (nb, h, h, cin)).astype(np.uint8)
            x_j, xq_j = jnp.asarray(x), QTensor(jnp.asarray(xq), jnp.float32(0.05), jnp.int32(128), quint8)
            fns = {"jax_f32": lambda: f32(x_j, wf_j, b_j), "jq_int8": lambda: q8(xq_j, p)}
            if NATIVE:
                fns["jq_int8_xla"] = lambda: pure_xla(q8)(xq_j, p)
            if depthwise:
                fns["jax_f32_taps"] = lambda: f32_taps(x_j, wf_j, b_j)
            if torch is not None:
                x_t = torch.tensor(x).permute(0, 3, 1, 2)  # NHWC memory = channels_last
                xq_t = torch._make_per_tensor_quantized_tensor(
                    torch.tensor(xq), 0.05, 128).permute(0, 3, 1, 2)

                def t_f32():
                    with torch.no_grad():
                        return tf(x_t)
                fns["torch_f32"] = t_f32
                fns["torch_int8"] = lambda: tq(xq_t)
            t = time_interleaved(fns, repeats=repeats)
            best_f32 = t["jax_f32"]
            if depthwise:
                best_f32 = [min(a, b_) for a, b_ in zip(t["jax_f32"], t["jax_f32_taps"])]
            row = {"conv": name, "batch": nb, **{n_: median_ms(v) for n_, v in t.items()},
                   "best_f32/int8": paired_ratio({"best": best_f32, **t}, "best", "jq_int8"),
                   "kind": "native" if NATIVE and p.native_weight is not None else p.kind}
            if NATIVE:
                row["xla/native"] = paired_ratio(t, "jq_int8_xla", "jq_int8")
            if torch is not None:
                row["int8/torch_int8"] = paired_ratio(t, "jq_int8", "torch_int8")
            rows.append(row)
            print(markdown_table([row]).splitlines()[-1], flush=True)
    return rows


POOLS = [  # name, (N, H, W, C), kernel, stride, padding
    ("2x2 s2 @28 c32 b64", (64, 28, 28, 32), 2, 2, 0),
    ("2x2 s2 @14 c64 b64", (64, 14, 14, 64), 2, 2, 0),
    ("3x3 s2 p1 @56 c64 b1", (1, 56, 56, 64), 3, 2, 1),
]


def bench_pool(pools, repeats):
    """uint8 NHWC max pooling: jaxquant (native / pure XLA), JAX f32 reduce_window, PyTorch quint8 and f32."""
    rows = []
    rng = np.random.default_rng(0)
    for name, shape, k, st, pad in pools:
        q = jax.jit(lambda x, k=k, st=st, pad=pad: quantized_max_pool2d(x, (k, k), (st, st), (pad, pad)))
        f32 = jax.jit(lambda x, k=k, st=st, pad=pad: lax.reduce_window(
            x, -jnp.inf, lax.max, (1, k, k, 1), (1, st, st, 1), ((0, 0), (pad, pad), (pad, pad), (0, 0))))
        xq = rng.integers(0, 256, shape).astype(np.uint8)
        xq_j, xf_j = jnp.asarray(xq), jnp.asarray(xq.astype(np.float32))
        fns = {"jax_f32": lambda: f32(xf_j), "jq_int8": lambda: q(xq_j)}
        if NATIVE:
            fns["jq_int8_xla"] = lambda: pure_xla(q)(xq_j)
        if torch is not None:
            # channels-last NCHW views: the layout PyTorch's quantized CNNs run in
            xt = torch.tensor(xq.astype(np.float32)).permute(0, 3, 1, 2)
            xqt = torch._make_per_tensor_quantized_tensor(torch.tensor(xq), 0.05, 3).permute(0, 3, 1, 2)
            fns["torch_f32"] = lambda: torch.nn.functional.max_pool2d(xt, k, st, pad)
            fns["torch_int8"] = lambda: torch.nn.functional.max_pool2d(xqt, k, st, pad)
        t = time_interleaved(fns, repeats=repeats)
        row = {"pool": name, **{n: median_ms(v) for n, v in t.items()},
               "f32/int8": paired_ratio(t, "jax_f32", "jq_int8")}
        if NATIVE:
            row["xla/native"] = paired_ratio(t, "jq_int8_xla", "jq_int8")
        if torch is not None:
            row["int8/torch_int8"] = paired_ratio(t, "jq_int8", "torch_int8")
        rows.append(row)
        print(markdown_table([row]).splitlines()[-1], flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes and repeats (< 2 min)")
    ap.add_argument("--json", default=None,
                    help="results file (default benchmarks/results/ops.json, ops_quick.json with --quick)")
    ap.add_argument("--only", choices=("dense", "conv", "pool"), default=None, help="run one of the tables")
    args = ap.parse_args()
    if args.quick:
        shapes, ms, rep = [(768, 768), (3136, 128), (4096, 4096)], [1, 64, 512], 5
        convs, batches, crep = [CONVS[0], CONVS[2], CONVS[4]], [1], 5
    else:
        shapes, ms, rep = [(768, 768), (768, 3072), (3072, 768), (3136, 128), (4096, 4096)], [1, 8, 64, 128, 512], 11
        convs, batches, crep = CONVS, [1, 32], 7
    print(f"native backend: {'on' if NATIVE else 'off (' + jq.native_backend_reason() + ')'}\n")
    print("## Dense (ms per call; ratios > 1 mean the first named is slower)\n")
    dense = [] if args.only not in (None, "dense") else bench_dense(shapes, ms, rep)
    print("\n" + markdown_table(dense) + "\n")
    print("## Conv (NHWC, ms per call)\n")
    conv = [] if args.only not in (None, "conv") else bench_conv(convs, batches, crep)
    print("\n" + markdown_table(conv) + "\n")
    print("## MaxPool (uint8 NHWC, ms per call)\n")
    pool = [] if args.only not in (None, "pool") else bench_pool(POOLS, 5 if args.quick else 11)
    print("\n" + markdown_table(pool))
    default = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                           "ops_quick.json" if args.quick else "ops.json")
    write_json(args.json or default, {"dense": dense, "conv": conv, "pool": pool}, quick=args.quick)


if __name__ == "__main__":
    main()
