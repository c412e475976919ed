"""The native weight-only GEMV alone (``jaxquant/native/csrc/weight_only_gemv.cc``) on SmolLM2-135M's
projection shapes: float32 ``x (M, K)`` times int8 / int4 codes, M = 1..8.

Per shape, format and M it reports the time of one GEMV, the GB/s of codes streamed and the GMAC/s,
for two cache states:

* ``hot``: the same weight every call (it stays in L1/L2, so this is the kernel's compute rate);
* ``streamed``: a ring of distinct copies of the weight totalling ``--stream-mb`` MB (well past
  L2, as in a decode step, where each of the 30 layers' weights is read once per token).

Default rows (``alone``): the kernel on one thread through ``jq_wo_gemv_run`` (no XLA, no helper
threads), timed in thread CPU time, which other jobs on a busy machine disturb far less than wall
time (streamed rows include one ctypes call per GEMV, about a microsecond). ``plain read`` rows
time an AVX-512 read of the same amount of bytes on 1 and 2 threads: the memory system's ceiling.

With ``--xla``: the kernel through XLA as a model runs it (2 threads: the caller and XLA's pool),
wall time. One sample is one jitted call of ``--chain`` dependent GEMVs (JAX's dispatch is paid
once per chain, as inside a jitted decode step). ``token`` rows run every projection of one
SmolLM2 token (30 layers, 4 calls each, and the LM head; random weights of the model's shapes) in
one jitted call: their ``us/GEMV`` column is the whole token's projection time. With
``--baseline-so PATH`` the same XLA rows run through another build of the extension (e.g. the
kernel before a change) interleaved in the same process, with the paired speed-up.

    python benchmarks/bench_weight_only_gemv.py [--quick] [--xla [--baseline-so /tmp/before.so]]
        [--json benchmarks/results/weight_only_gemv.json]
"""
from __future__ import annotations

import argparse
import ctypes
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from timing import markdown_table, median_ms, paired_ratio, time_interleaved, write_json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxquant.native import _lib  # noqa: E402
from jaxquant.native.weight_only_ops import _target_ready  # noqa: E402
from jaxquant.weight_only import quantize_blockwise  # noqa: E402

# SmolLM2-135M: hidden 576, 9 heads x 64 (q, o), 3 KV heads x 64 (k, v), MLP 1536.
SHAPES = {
    "q/o 576x576": [(576, 576)],
    "k/v 576x192": [(576, 192)],
    "gate/up 576x1536": [(576, 1536)],
    "down 1536x576": [(1536, 576)],
    "qkv fused": [(576, 576), (576, 192), (576, 192)],
    "gate+up fused": [(576, 1536), (576, 1536)],
}
FORMATS = {  # name: (bits, group_size, symmetric)
    "W8 per-channel": (8, None, True),
    "W4 g128": (4, 128, True),
    "W4 g32 asym": (4, 32, False),
}


def _register_baseline(path: str) -> str:
    """Register the weight-only target of another build of the extension; returns its target name."""
    lib = ctypes.CDLL(os.path.abspath(path))
    name = "jaxquant_weight_only_gemv_baseline"
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(lib.JqWeightOnlyGemv), platform="cpu")
    return name


def _gemv_chain(target: str, bits: int, group_size: int, ns: list, n_weights: int):
    """A jitted ``f(x, *weights)``: one custom call per weight set, each on its own (or the same)
    buffers. Each call's input depends on the previous call's output (as in a decode step), so XLA
    runs them one after another, not concurrently."""

    @jax.jit
    def f(x, *ws):
        d = jnp.ones((), jnp.float32)
        per = 3 * len(ns)
        for i in range(n_weights):
            ops = ws[i * per:(i + 1) * per]
            outs = jax.ffi.ffi_call(target, [jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32) for n in ns],
                                    vmap_method="sequential")(x * d, *ops, bits=np.int64(bits),
                                                              group_size=np.int64(group_size))
            d = 1.0 + 1e-30 * outs[0][0, 0]
        return d
    return f


def _token_fn(target: str, bits: int, layers: list):
    """A jitted ``f(x576, x1536, layers)``: every projection of a SmolLM2-135M token, grouped as the
    decode step calls them (Q/K/V fused, O, gate/up fused, down: 4 calls per layer) and the LM head
    (576 -> 49152, tied to the embedding), each call's input depending on the previous output."""

    def call(x, ws):
        outs = jax.ffi.ffi_call(target, [jax.ShapeDtypeStruct((x.shape[0], w.out_features), jnp.float32) for w in ws],
                                vmap_method="sequential")(
            x, *[a for w in ws for a in (w.data, w.scale, w.zero_point)], bits=np.int64(bits),
            group_size=np.int64(ws[0].group_size))
        return 1.0 + 1e-30 * outs[0][0, 0]

    @jax.jit
    def f(x576, x1536, layers, lm_head):
        d = jnp.ones((), jnp.float32)
        for qkv, o, gu, down in layers:
            d = call(x576 * d, qkv)
            d = call(x576 * d, o)
            d = call(x576 * d, gu)
            d = call(x1536 * d, down)
        return call(x576 * d, lm_head)
    return f


class _KernelAlone:
    """The kernel on the calling thread through ``jq_wo_gemv_run`` (no XLA, no helper threads), on
    numpy copies of one weight's arrays."""

    def __init__(self, lib, q):
        self.lib, self.q = lib, q
        self.data, self.scale = np.ascontiguousarray(q.data), np.ascontiguousarray(q.scale)
        self.zp = np.ascontiguousarray(q.zero_point)
        lib.jq_wo_gemv_run.restype = ctypes.c_int
        lib.jq_wo_gemv_run.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 7

    def __call__(self, x: np.ndarray, out: np.ndarray, reps: int = 1) -> None:
        q = self.q
        rc = self.lib.jq_wo_gemv_run(x.ctypes.data, self.data.ctypes.data, self.scale.ctypes.data, self.zp.ctypes.data,
                                     out.ctypes.data, x.shape[0], x.shape[1], q.out_features, q.n_groups, q.group_size,
                                     q.bits, reps)
        if rc != 0:
            raise RuntimeError("jq_wo_gemv_run refused the shapes")


def _cpu_seconds(fn, repeats: int, min_s: float = 0.02) -> list:
    """Thread CPU seconds per call of ``fn`` over ``repeats`` samples (each at least ``min_s`` long):
    time the machine's other jobs take from this thread is not counted, unlike wall time."""
    return _cpu_interleaved({"f": fn}, repeats, min_s)["f"]


def _cpu_interleaved(fns: dict, repeats: int, min_s: float = 0.02) -> dict:
    """:func:`_cpu_seconds` of several callables, interleaved round by round (for paired ratios)."""
    inner = {}
    for name, fn in fns.items():
        fn()
        t0 = time.thread_time()
        fn()
        inner[name] = max(1, int(min_s / max(time.thread_time() - t0, 1e-6)))
    out = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.thread_time()
            for _ in range(inner[name]):
                fn()
            out[name].append((time.thread_time() - t0) / inner[name])
    return out


def _read_fn(lib, buf: np.ndarray, threads: int):
    lib.jq_wo_read_bytes.restype = ctypes.c_int64
    lib.jq_wo_read_bytes.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
    ptr, n = buf.ctypes.data, buf.nbytes
    return lambda: lib.jq_wo_read_bytes(ptr, n, threads)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="M = 1 and 4, fewer shapes and rounds")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--chain", type=int, default=16, help="GEMVs per jitted call (hot)")
    ap.add_argument("--stream-mb", type=float, default=48.0, help="MB of distinct weight copies per streamed ring")
    ap.add_argument("--baseline-so", default=None,
                    help="another build of the extension (or of weight_only_gemv.cc alone) to compare against")
    ap.add_argument("--xla", action="store_true",
                    help="also time the kernel through XLA (jitted chains: hot, streamed, whole token; 2 threads)")
    ap.add_argument("--no-token", action="store_true", help="skip the whole-token rows")
    ap.add_argument("--only-token", action="store_true", help="only the whole-token rows (and the plain read)")
    ap.add_argument("--json", default="benchmarks/results/weight_only_gemv.json")
    args = ap.parse_args()
    if not _target_ready():
        sys.exit("the native weight-only kernel is unavailable (extension not built or no AVX-512)")
    repeats = args.repeats or (5 if args.quick else 9)
    ms_list = [1, 4] if args.quick else [1, 2, 4, 8]
    shapes = (["q/o 576x576", "down 1536x576", "qkv fused", "gate+up fused"] if args.quick else list(SHAPES))
    targets = {"new": "jaxquant_weight_only_gemv"}
    if args.baseline_so:
        targets["before"] = _register_baseline(args.baseline_so)
    lib = _lib()
    alone_libs = {"new": lib}
    if args.baseline_so:
        blib = ctypes.CDLL(os.path.abspath(args.baseline_so))
        if hasattr(blib, "jq_wo_gemv_run"):  # builds from before jq_wo_gemv_run existed have XLA rows only
            alone_libs["before"] = blib
    rng = np.random.default_rng(0)
    rows = []
    for shape in ([] if args.only_token else shapes):
        kn = SHAPES[shape]
        k = kn[0][0]
        for fmt, (bits, gs, sym) in FORMATS.items():
            qs = [quantize_blockwise(jnp.asarray(rng.standard_normal((k, n)), jnp.float32) * 0.05, bits=bits,
                                     group_size=gs, symmetric=sym, allow_partial_group=True) for _, n in kn]
            group_size, ns = qs[0].group_size, [q.out_features for q in qs]
            one = [a for q in qs for a in (q.data, q.scale, q.zero_point)]
            code_bytes = sum(q.data.nbytes for q in qs)
            macs = sum(k * n for n in ns)
            n_copies = min(256, max(args.chain, int(args.stream_mb * 2**20 // code_bytes)))
            # The kernel alone on one thread, in thread CPU time: hot (one copy) and streamed (a ring).
            alone = {lname: [_KernelAlone(alib, q) for q in qs] for lname, alib in alone_libs.items()}
            alone_ring = [[_KernelAlone(lib, q) for q in qs] for _ in range(n_copies)]
            for m in ms_list:
                xn = rng.standard_normal((m, k)).astype(np.float32)
                outs = [np.empty((m, n), np.float32) for n in ns]

                def hot(fs, reps=16):
                    for f, o in zip(fs, outs):
                        f(xn, o, reps)

                def streamed(fs_ring):
                    for fs in fs_ring:
                        for f, o in zip(fs, outs):
                            f(xn, o)
                fns = {f"{lname} alone hot (1 thread, CPU time)": (lambda fs=fs: hot(fs)) for lname, fs in alone.items()}
                fns["new alone streamed (1 thread, CPU time)"] = lambda: streamed(alone_ring)
                if "before" in alone:
                    before_ring = [[_KernelAlone(alone_libs["before"], f.q) for f in fs]
                                   for fs in alone_ring]  # the same buffers, the other build's kernel
                    for fs_b, fs in zip(before_ring, alone_ring):
                        for fb, f in zip(fs_b, fs):
                            fb.data, fb.scale, fb.zp = f.data, f.scale, f.zp
                    fns["before alone streamed (1 thread, CPU time)"] = lambda: streamed(before_ring)
                times = _cpu_interleaved(fns, repeats)
                for name, ts in times.items():
                    per = 16 if " hot " in name else n_copies
                    t = median_ms(ts) / per
                    row = {"shape": shape, "format": fmt, "M": m, "kernel": name, "us/GEMV": 1e3 * t,
                           "GB/s codes": code_bytes / (t * 1e-3) / 1e9, "GMAC/s": m * macs / (t * 1e-3) / 1e9}
                    if name.startswith("new") and name.replace("new", "before") in times:
                        row["speed-up vs before"] = paired_ratio(times, name.replace("new", "before"), name)
                    rows.append(row)
                print(markdown_table(rows[-len(times):]), flush=True)
            if not args.xla:
                continue
            # Distinct buffers: a copy per chain position (device_put of a fresh numpy copy).
            ring = [jnp.asarray(np.array(a)) for _ in range(n_copies) for a in one]
            hot_ops = one * args.chain
            for m in ms_list:
                x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
                fns, per = {}, {}
                for tname, target in targets.items():
                    fh = _gemv_chain(target, bits, group_size, ns, args.chain)
                    fs = _gemv_chain(target, bits, group_size, ns, n_copies)
                    fns[f"{tname} hot"] = lambda fh=fh: fh(x, *hot_ops)
                    fns[f"{tname} streamed"] = lambda fs=fs: fs(x, *ring)
                    per[f"{tname} hot"], per[f"{tname} streamed"] = args.chain, n_copies
                times = time_interleaved(fns, repeats=repeats, min_sample_s=0.01)
                for name, ts in times.items():
                    t = median_ms(ts) / per[name]
                    row = {"shape": shape, "format": fmt, "M": m, "kernel": name, "us/GEMV": 1e3 * t,
                           "GB/s codes": code_bytes / (t * 1e-3) / 1e9, "GMAC/s": m * macs / (t * 1e-3) / 1e9}
                    if name.startswith("new") and "before" in targets:
                        other = name.replace("new", "before")
                        row["speed-up vs before"] = paired_ratio(
                            {k2: [v / per[k2] for v in times[k2]] for k2 in (name, other)}, other, name)
                    rows.append(row)
                print(markdown_table(rows[-len(times):]), flush=True)
    # A whole token's projections (30 layers of random weights of SmolLM2-135M's shapes).
    if args.xla and not args.no_token:
        for fmt, (bits, gs, sym) in FORMATS.items():
            if args.quick and fmt == "W4 g32 asym":
                continue
            qz = lambda k, n: quantize_blockwise(jnp.asarray(rng.standard_normal((k, n)) * 0.05, jnp.float32),
                                                 bits=bits, group_size=gs, symmetric=sym, allow_partial_group=True)
            layers = [((qz(576, 576), qz(576, 192), qz(576, 192)), (qz(576, 576),), (qz(576, 1536), qz(576, 1536)),
                       (qz(1536, 576),)) for _ in range(30)]
            lm_head = (qz(576, 49152),)
            code_bytes = sum(w.data.nbytes for layer in layers for ws in layer for w in ws) + lm_head[0].data.nbytes
            for m in ms_list:
                x576 = jnp.asarray(rng.standard_normal((m, 576)), jnp.float32)
                x1536 = jnp.asarray(rng.standard_normal((m, 1536)), jnp.float32)
                fns = {f"{tname} token": (lambda f=_token_fn(target, bits, layers): f(x576, x1536, layers, lm_head))
                       for tname, target in targets.items()}
                times = time_interleaved(fns, repeats=repeats, min_sample_s=0.02)
                for name, ts in times.items():
                    t = median_ms(ts)
                    row = {"shape": "SmolLM2 token (121 calls)", "format": fmt, "M": m, "kernel": name,
                           "us/GEMV": 1e3 * t, "GB/s codes": code_bytes / (t * 1e-3) / 1e9,
                           "GMAC/s": m * (30 * 3538944 + 576 * 49152) / (t * 1e-3) / 1e9}
                    if name == "new token" and "before" in targets:
                        row["speed-up vs before"] = paired_ratio(times, "before token", "new token")
                    rows.append(row)
                print(markdown_table(rows[-len(times):]), flush=True)
            del layers, lm_head
    # The memory system's ceiling: a plain AVX-512 read of the same amount of bytes.
    if hasattr(lib, "jq_wo_read_bytes"):
        for label, mb in (("hot (1 MB)", 1.0), ("streamed", args.stream_mb)):
            buf = rng.integers(0, 255, size=int(mb * 2**20), dtype=np.uint8)
            # One thread in thread CPU time (comparable with the "alone" rows), two in wall time.
            times = {f"read {label}, 1 thread, CPU time": _cpu_seconds(_read_fn(lib, buf, 1), repeats)}
            times.update({f"read {label}, 2 threads, wall": ts for ts in
                          time_interleaved({"r": _read_fn(lib, buf, 2)}, repeats=repeats, min_sample_s=0.01).values()})
            for name, ts in times.items():
                rows.append({"shape": f"{mb:g} MB", "format": "plain read", "M": "", "kernel": name,
                             "us/GEMV": 1e3 * median_ms(ts), "GB/s codes": buf.nbytes / (median_ms(ts) * 1e-3) / 1e9})
            print(markdown_table(rows[-len(times):]), flush=True)
    print("\n## all rows (measured under load unless the machine was idle)\n")
    print(markdown_table(rows))
    write_json(args.json, rows, quick=args.quick, chain=args.chain, stream_mb=args.stream_mb)


if __name__ == "__main__":
    main()
