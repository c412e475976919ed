"""The non-matmul part of a decode step: the Llama port before/after a change, paired in one process.

Times one decode token of SmolLM2-135M (batch 1, KV cache) through ``jaxquant.models.llama`` and
through a reference copy of the port given by ``--baseline FILE`` (e.g. an older llama.py from git:
``git show REV:jaxquant/models/llama.py > /tmp/llama_old.py``), on the same weights, for float32,
W8 per-channel and W4 g128 (the native backend on where available: weight-only kernel and fused
decode ops). Also reports the compiled step's op counts (instructions, fusions, dots, custom calls,
copies, dynamic-update-slices; fewer small ops = less per-step dispatch on 2 cores). The
"projections stubbed" rows replace every projection by a broadcast (:class:`StubProjection`): what is
left is the non-matmul part of a step, timed directly.

    python benchmarks/bench_decode_step.py --baseline /tmp/llama_old.py [--quick] [--tiny]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_decode import cached_decode_step  # noqa: E402
from timing import markdown_table, median_ms, paired_ratio, time_interleaved, write_json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import jaxquant as jq  # noqa: E402
from jaxquant.models import llama as new_llama  # noqa: E402


def load_module(path: str):
    """The baseline port, imported from a file the user named on the command line."""
    spec = importlib.util.spec_from_file_location("llama_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the file runs
    spec.loader.exec_module(mod)
    return mod


def hlo_counts(forward, *args) -> dict:
    """Op counts of the compiled step's entry computation (what XLA CPU dispatches one by one):
    instructions, fusions, dots, custom calls, copies and dynamic-update-slices (fused ones included)."""
    text = forward.lower(*args).compile().as_text()
    entry = text[text.index("ENTRY"):]
    entry = entry[:entry.index("\n}")]
    lines = [l for l in entry.splitlines()[1:] if "=" in l]
    count = lambda op: sum(bool(re.search(rf"\b{op}\(", l)) for l in lines)
    return {"HLO instructions": len(lines), "fusions": count("fusion"), "dots": count("dot"),
            "custom calls": count("custom-call"), "copies": count("copy") + text.count("copy_fusion"),
            "dynamic-update-slices": text.count("dynamic-update-slice(")}


class StubProjection(nnx.Module):
    """Stands in for a projection: ``(..., K) -> (..., N)`` by broadcasting ``x[..., :1]`` (one cheap
    kernel, often fused into its consumer), so a step with every projection stubbed times the rest
    of the step: norms, rotary, attention, cache writes and dispatch."""

    def __init__(self, in_features: int, out_features: int):
        self.in_features, self.out_features = in_features, out_features

    def __call__(self, x):
        return jnp.broadcast_to(x[..., :1], x.shape[:-1] + (self.out_features,))


def stub_projections(model):
    """A copy of the Llama ``model`` (arrays shared) whose 211 projections are :class:`StubProjection`."""
    m = nnx.merge(*nnx.split(model))
    cfg = m.config
    hd = cfg.head_dim
    for layer in m.layers:
        a, f = layer.attn, layer.mlp
        a.wq, a.wk = StubProjection(cfg.dim, cfg.n_heads * hd), StubProjection(cfg.dim, cfg.n_kv_heads * hd)
        a.wv, a.wo = StubProjection(cfg.dim, cfg.n_kv_heads * hd), StubProjection(cfg.n_heads * hd, cfg.dim)
        f.gate, f.up = StubProjection(cfg.dim, cfg.hidden_dim), StubProjection(cfg.dim, cfg.hidden_dim)
        f.down = StubProjection(cfg.hidden_dim, cfg.dim)
    m.lm_head = StubProjection(cfg.dim, cfg.vocab_size)
    return m


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", required=True, help="path of the older llama.py to compare against")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--variants", default="f32,W8,W4 g128,projections stubbed",
                    help="comma-separated subset of: f32, W8, W4 g128, projections stubbed")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer random Llama instead of SmolLM2 (smoke test)")
    ap.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                   "decode_step.json"))
    args = ap.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 15)
    old_llama = load_module(args.baseline)
    if args.tiny:
        model = new_llama.Llama(new_llama.LlamaConfig(vocab_size=512, dim=128, n_layers=2, n_heads=4, n_kv_heads=2,
                                                      hidden_dim=256), rngs=nnx.Rngs(0))
    else:
        model, _ = new_llama.load_smollm2()
    cfg = model.config
    # The baseline model shares the new one's arrays (same parameter tree, older __call__ code).
    old_gd, _ = nnx.split(nnx.eval_shape(lambda: old_llama.Llama(cfg, rngs=nnx.Rngs(0))))
    old_model = nnx.merge(old_gd, nnx.state(model))
    native = jq.native_backend_available()
    w8, w4 = jq.int8_weight_only(), jq.int4_weight_only(128, allow_partial_group=True)
    qcfgs = {"f32": lambda m: m, "W8": lambda m: jq.quantize_weight_only(m, w8),
             "W4 g128": lambda m: jq.quantize_weight_only(m, w4), "projections stubbed": stub_projections}
    wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(wanted) - set(qcfgs))
    if unknown:
        ap.error(f"--variants: unknown {unknown}; choose from {list(qcfgs)}")
    qcfgs = {k: qcfgs[k] for k in wanted}
    max_len = args.prompt_len + 8
    fns, rows_info = {}, {}
    for label, qc in qcfgs.items():
        for tag, mod, base in (("before", old_llama, old_model), ("after", new_llama, model)):
            m = qc(base)
            # The native backend on for f32 too: "after" runs the fused decode ops (the same for every
            # variant); the float projections stay XLA dots either way.
            on = native
            step, forward, (state, tok, box, pos), logits = cached_decode_step(
                mod.make_forward, mod.init_cache, m, args.prompt_len, max_len, on)
            with jq.use_native(on):
                counts = hlo_counts(forward, state, tok, box["cache"], pos)
            name = f"{label} {tag}"
            fns[name] = step
            rows_info[name] = dict(counts, logits=jax.device_get(logits))
    times = time_interleaved(fns, repeats=repeats, warmup=1)
    rows = []
    for name in fns:
        label, tag = name.rsplit(" ", 1)
        info = rows_info[name]
        before = rows_info[f"{label} before"]["logits"]
        rel = float(abs(info["logits"] - before).max() / abs(before).max())
        rows.append({"step": name, "ms/token": median_ms(times[name]),
                     "after/before speed-up": paired_ratio(times, f"{label} before", name) if tag == "after" else 1.0,
                     **{k: v for k, v in info.items() if k != "logits"},
                     "max rel logit diff vs before": rel})
    title = "tiny random Llama" if args.tiny else "SmolLM2-135M"
    print(f"\n{title} decode step, before/after (paired, one process); "
          f"{'--quick, ' if args.quick else ''}{repeats} rounds\n")
    print(markdown_table(rows))
    write_json(args.json, rows, quick=args.quick)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
