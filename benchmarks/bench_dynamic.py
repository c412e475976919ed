"""Module-level dynamic quantization benchmark: jaxquant ``quantize_dynamic`` vs float32 JAX vs
PyTorch (float32 and ``torch.ao.quantization.quantize_dynamic``, x86 engine), same weights.

    python benchmarks/bench_dynamic.py [--quick] [--json benchmarks/results/bench_dynamic.json]

* Linear: BERT-sized layers (768x768, 768x3072, 3072x768) and 4096x4096 at M in {1, 8, 128, 512}.
* LSTM: one layer, input = hidden in {256, 512}, sequence 64, batch {1, 32}: ``nnx.RNN(LSTMCell)``
  vs its dynamic int8 version (per tensor and per token) vs ``torch.nn.LSTM`` and PyTorch's dynamic LSTM.

Both JAX models run as ``jax.jit`` of a pure function of the model state (``nnx.split`` once), which is
how a deployed model is called; ``nnx.jit``'s per-call graph traversal is not measured. The LSTM rows
also time the documented serving path, ``jaxquant.compile(model)`` (``jq.compile`` columns). Candidates
are timed interleaved in this one process (benchmarks/timing.py): medians in ms per call, and
paired ratios (> 1 means the second name is faster). ``max_rel_diff`` is max |ours - PyTorch's
dynamic output| / max |float output| on the same weights and input, a check that the two int8
models compute the same thing.
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
from flax import nnx  # noqa: E402

import jaxquant as jq  # noqa: E402
from jaxquant.transforms.quantize_dynamic import quantize_dynamic  # noqa: E402
from timing import (import_torch, markdown_table, median_ms, paired_ratio, time_interleaved,  # noqa: E402
                    write_json)

torch = import_torch(threads=2)  # None without torch: its columns become n/a

NAN = float("nan")
LINEAR_SHAPES = [(768, 768), (768, 3072), (3072, 768), (4096, 4096)]
MS = [1, 8, 128, 512]
LSTM_CASES = [(256, 1), (256, 32), (512, 1), (512, 32)]  # (hidden, batch)
SEQ = 64
LIN_COLS = ["K x N", "M", "jax_f32", "jq_dyn", "jq_dyn_token", "torch_f32", "torch_dyn", "f32/dyn",
            "dyn/token", "torch_dyn/dyn", "max_rel_diff"]
LSTM_COLS = ["hidden", "batch", "seq", "jax_f32", "jq_dyn", "jq_dyn_token", "jq.compile f32", "jq.compile dyn",
             "torch_f32", "torch_dyn", "f32/dyn", "dyn/token", "f32/dyn (jq.compile)", "torch_dyn/dyn",
             "max_rel_diff"]


def compiled(model: nnx.Module):
    """``x -> model(x)`` as one ``jax.jit`` program over the model's state (split once)."""
    graphdef, state = nnx.split(model)
    f = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    return lambda x: f(state, x)


def _max_rel(a, b, ref) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(ref)).max())


def _in_inference_mode(fn):
    """``fn`` as a zero-argument callable run under ``torch.inference_mode()``."""
    def call():
        with torch.inference_mode():
            return fn()
    return call


def _timed_row(row: dict, fns: dict, repeats: int, columns: list) -> dict:
    """``row`` with the interleaved medians of ``fns`` and the paired ratios added; prints it as a table line."""
    t = time_interleaved(fns, repeats=repeats)
    row.update({name: median_ms(v) for name, v in t.items()})
    row["f32/dyn"] = paired_ratio(t, "jax_f32", "jq_dyn")
    row["dyn/token"] = paired_ratio(t, "jq_dyn", "jq_dyn_token")
    if "jq.compile dyn" in t:  # the documented serving path (jaxquant.compile) of the same models
        row["f32/dyn (jq.compile)"] = paired_ratio(t, "jq.compile f32", "jq.compile dyn")
    row["torch_dyn/dyn"] = paired_ratio(t, "torch_dyn", "jq_dyn") if torch is not None else NAN
    print(markdown_table([row], columns).splitlines()[-1], flush=True)
    return row


def bench_linear(shapes, ms, repeats):
    rows = []
    rng = np.random.default_rng(0)
    for k, n in shapes:
        lin = nnx.Linear(k, n, rngs=nnx.Rngs(0))
        lin.bias.set_value(jnp.asarray(rng.standard_normal(n).astype(np.float32) * 0.1))
        model = nnx.Sequential(lin)
        f32 = compiled(model)
        dyn = compiled(quantize_dynamic(model))
        tok = compiled(quantize_dynamic(model, per_token=True))
        if torch is not None:
            tl = torch.nn.Linear(k, n)
            with torch.no_grad():
                tl.weight.copy_(torch.tensor(np.asarray(lin.kernel[...]).T.copy()))
                tl.bias.copy_(torch.tensor(np.asarray(lin.bias[...])))
            tdyn = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(tl), {torch.nn.Linear},
                                                          dtype=torch.qint8)
        for m in ms:
            x = rng.standard_normal((m, k)).astype(np.float32)
            xj = jnp.asarray(x)
            fns = {"jax_f32": lambda: f32(xj), "jq_dyn": lambda: dyn(xj), "jq_dyn_token": lambda: tok(xj)}
            row = {"K x N": f"{k}x{n}", "M": m}
            if torch is not None:
                xt = torch.tensor(x)
                fns["torch_f32"] = _in_inference_mode(lambda: tl(xt))
                fns["torch_dyn"] = _in_inference_mode(lambda: tdyn(xt))
                row["max_rel_diff"] = _max_rel(dyn(xj), fns["torch_dyn"]().numpy(), f32(xj))
            rows.append(_timed_row(row, fns, repeats, LIN_COLS))
    return rows


class _LSTM(nnx.Module):
    def __init__(self, features: int, hidden: int):
        self.rnn = nnx.RNN(nnx.LSTMCell(features, hidden, rngs=nnx.Rngs(0)))

    def __call__(self, x):
        return self.rnn(x)


def _torch_lstm_from(model: _LSTM, hidden: int):
    """``torch.nn.LSTM`` (batch_first) with the flax cell's weights (gates i, f, g, o in both)."""
    cell = model.rnn.cell
    t = torch.nn.LSTM(hidden, hidden, batch_first=True)
    w_ih = np.concatenate([np.asarray(g.kernel[...]) for g in (cell.ii, cell.if_, cell.ig, cell.io)], 1).T
    w_hh = np.concatenate([np.asarray(g.kernel[...]) for g in (cell.hi, cell.hf, cell.hg, cell.ho)], 1).T
    b_hh = np.concatenate([np.asarray(g.bias[...]) for g in (cell.hi, cell.hf, cell.hg, cell.ho)])
    with torch.no_grad():
        t.weight_ih_l0.copy_(torch.tensor(w_ih.copy()))
        t.weight_hh_l0.copy_(torch.tensor(w_hh.copy()))
        t.bias_ih_l0.zero_()
        t.bias_hh_l0.copy_(torch.tensor(b_hh))
    return t


def bench_lstm(cases, repeats):
    rows = []
    rng = np.random.default_rng(1)
    for hidden, batch in cases:
        model = _LSTM(hidden, hidden)
        f32 = compiled(model)
        dyn = compiled(quantize_dynamic(model))
        tok = compiled(quantize_dynamic(model, per_token=True))
        served_f32, served_dyn = jq.compile(model), jq.compile(quantize_dynamic(model))
        x = (rng.standard_normal((batch, SEQ, hidden)) * 0.5).astype(np.float32)
        xj = jnp.asarray(x)
        fns = {"jax_f32": lambda: f32(xj), "jq_dyn": lambda: dyn(xj), "jq_dyn_token": lambda: tok(xj),
               "jq.compile f32": lambda: served_f32(xj), "jq.compile dyn": lambda: served_dyn(xj)}
        row = {"hidden": hidden, "batch": batch, "seq": SEQ}
        if torch is not None:
            tl = _torch_lstm_from(model, hidden).eval()
            tdyn = torch.ao.quantization.quantize_dynamic(tl, {torch.nn.LSTM}, dtype=torch.qint8)
            xt = torch.tensor(x)
            fns["torch_f32"] = _in_inference_mode(lambda: tl(xt)[0])
            fns["torch_dyn"] = _in_inference_mode(lambda: tdyn(xt)[0])
            # per-step vs whole-sequence activation scales differ (docs/dynamic_quantization.md), so
            # this is a sanity bound, not a bit-for-bit check
            row["max_rel_diff"] = _max_rel(dyn(xj), fns["torch_dyn"]().numpy(), f32(xj))
        rows.append(_timed_row(row, fns, repeats, LSTM_COLS))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds (under 2 minutes)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                   "bench_dynamic.json"))
    args = ap.parse_args()
    repeats = args.repeats or (5 if args.quick else 15)

    lin_cols, lstm_cols = LIN_COLS, LSTM_COLS
    print("\n## Dynamic int8 Linear (ms per call)\n")
    print("| " + " | ".join(lin_cols) + " |\n|" + "|".join("---" for _ in lin_cols) + "|", flush=True)
    linear = bench_linear(LINEAR_SHAPES, MS, repeats)

    print("\n## Dynamic int8 LSTM, one layer (ms per sequence)\n")
    print("| " + " | ".join(lstm_cols) + " |\n|" + "|".join("---" for _ in lstm_cols) + "|", flush=True)
    lstm = bench_lstm(LSTM_CASES, repeats)

    print("\n" + markdown_table(linear, lin_cols) + "\n\n" + markdown_table(lstm, lstm_cols))
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    write_json(args.json, {"linear": linear, "lstm": lstm}, repeats=repeats,
               notes="ratios are paired medians; a/b > 1 means b is faster")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
