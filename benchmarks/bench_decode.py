"""Decode speed of SmolLM2-135M at batch 1 with a KV cache: float32 vs weight-only W8 / W4 (JAX, jit;
the native weight-only kernel and the pure-XLA int8-activation fallback side by side), with PyTorch (Hugging Face LlamaForCausalLM on the same dequantized weights: float32 and
``torch.ao.quantization.quantize_dynamic`` int8) as peers. Also model memory.

The ``... linears only`` rows time every projection of the model once on a (1, K) input in one jitted
call, grouped as the decode step groups them (the matmul share of a token); a variant's
``non-projection ms/token`` is its token time minus its linears-only time: attention, norms, rotary,
cache writes and dispatch. The float row (``jax_f32``) runs the same fused decode ops as the quantized
native rows (only its projections differ: XLA's float dots); ``jax_f32 pure-XLA`` runs everything on XLA.

One timed call = one new token: ``forward(state, token (1, 1), cache, position)`` at a fixed cache
position (every call does the same work), so tokens/s = 1000 / ms. Candidates run interleaved in one
process (benchmarks/timing.py): medians over rounds and paired speed-ups vs JAX float32.

    python benchmarks/bench_decode.py [--quick] [--tiny] [--json benchmarks/results/decode.json] [--no-torch]
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from timing import import_torch, markdown_table, median_ms, paired_ratio, time_interleaved, write_json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import jaxquant as jq  # noqa: E402
from jaxquant.models.llama import init_cache, load_smollm2, make_forward  # noqa: E402
from jaxquant.native.weight_only_ops import weight_only_gemv_supported  # noqa: E402
from jaxquant.native.decode_ops import decode_ops_supported  # noqa: E402
from jaxquant.weight_only import WeightOnlyLinear  # noqa: E402
from jaxquant.weight_only.modules import project_all  # noqa: E402


def linear_weight_bytes(model) -> int:
    """Bytes of every projection's weight (float kernels, or codes + scales + zero points)."""
    total = 0
    for _, m in jq.named_modules(model):
        if isinstance(m, nnx.Linear):
            total += m.kernel.get_value().nbytes
        elif isinstance(m, WeightOnlyLinear):
            total += m.weight().nbytes
    return total


def linears_only(model):
    """A jitted ``f(state, x)`` applying every projection of ``model`` to ``x[:, :K]`` once, grouped as
    the decode step calls them (Q/K/V and gate/up through ``project_all``, so one native call each), and
    its state. The outputs are returned, not reduced: no kernels beyond the projections' own."""
    groups = []
    for layer in model.layers:
        groups += [(layer.attn.wq, layer.attn.wk, layer.attn.wv), (layer.attn.wo,),
                   (layer.mlp.gate, layer.mlp.up), (layer.mlp.down,)]
    groups.append((model.lm_head,))
    graphdef, state = nnx.split(nnx.List([nnx.List(list(g)) for g in groups]))

    @jax.jit
    def f(state, x):
        outs = []
        for g in nnx.merge(graphdef, state):
            k = g[0].in_features
            outs += project_all(x[:, :k], tuple(g))
        return outs

    return f, state


def cached_decode_step(make_forward, init_cache, model, prompt_len: int, max_len: int, native_on: bool):
    """One timed decode call: a new token at a fixed cache position after a ``prompt_len`` prefill, batch 1.

    ``make_forward`` / ``init_cache`` come from the Llama port under test (so an older port can be
    timed too). Returns ``(step, forward, (state, token, cache_box, position), first_logits)``; ``step()``
    returns the logits. ``forward`` donates its cache, so each call takes the cache the last one
    returned (same position, so every call does the same work); all calls run under the same
    ``jq.use_native`` setting, which jit's cache key holds.
    """
    with jq.use_native(native_on):
        forward, state = make_forward(model)
        cache = init_cache(model.config, 1, max_len)
        _, cache = forward(state, jnp.ones((1, prompt_len), jnp.int32), cache, jnp.int32(0))
        tok, pos = jnp.asarray([[2]], jnp.int32), jnp.int32(prompt_len)
        logits, cache = forward(state, tok, cache, pos)  # compile
        jax.block_until_ready(logits)
    box = {"cache": cache}

    def step():
        with jq.use_native(native_on):
            out, box["cache"] = forward(state, tok, box["cache"], pos)
        return out
    return step, forward, (state, tok, box, pos), logits


def model_bytes(model) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))


def torch_peers(model, prompt_len: int):
    """``{name: step()}`` decoding one token with Hugging Face's Llama on the same weights, or {}."""
    torch = import_torch(threads=2)
    try:
        import transformers
    except ImportError:
        return {}
    if torch is None:
        return {}
    cfg = model.config
    hf_cfg = transformers.LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
                                      num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                                      num_key_value_heads=cfg.n_kv_heads, rms_norm_eps=cfg.norm_eps,
                                      rope_theta=cfg.rope_theta, max_position_embeddings=2048,
                                      tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    t = lambda a: torch.tensor(np.asarray(a))

    def hf_rows(w, heads):  # GGML adjacent-pair rotary rows -> HF rotate-half rows
        out, inp = w.shape
        hd = out // heads
        return w.reshape(heads, hd // 2, 2, inp).transpose(0, 2, 1, 3).reshape(out, inp)

    kT = lambda m: np.asarray(m.kernel.get_value()).T
    sd = {"model.embed_tokens.weight": t(model.embed.embedding.get_value()),
          "model.norm.weight": t(model.norm.weight.get_value()), "lm_head.weight": t(kT(model.lm_head))}
    for i, l in enumerate(model.layers):
        p = f"model.layers.{i}."
        sd.update({p + "input_layernorm.weight": t(l.attn_norm.weight.get_value()),
                   p + "post_attention_layernorm.weight": t(l.ffn_norm.weight.get_value()),
                   p + "self_attn.q_proj.weight": t(hf_rows(kT(l.attn.wq), cfg.n_heads)),
                   p + "self_attn.k_proj.weight": t(hf_rows(kT(l.attn.wk), cfg.n_kv_heads)),
                   p + "self_attn.v_proj.weight": t(kT(l.attn.wv)), p + "self_attn.o_proj.weight": t(kT(l.attn.wo)),
                   p + "mlp.gate_proj.weight": t(kT(l.mlp.gate)), p + "mlp.up_proj.weight": t(kT(l.mlp.up)),
                   p + "mlp.down_proj.weight": t(kT(l.mlp.down))})
    hf.load_state_dict(sd, strict=False)
    int8 = torch.ao.quantization.quantize_dynamic(hf, {torch.nn.Linear}, dtype=torch.qint8)
    ids = torch.tensor([[1] * prompt_len])

    def stepper(m):
        with torch.no_grad():
            out = m(input_ids=ids, use_cache=True)
        past = out.past_key_values
        tok = torch.tensor([[2]])

        def step():
            with torch.no_grad():
                logits = m(input_ids=tok, past_key_values=past, use_cache=True).logits
            past.crop(-1)  # drop the token just added: every call attends over the same length
            return logits
        return step

    return {"torch_f32 (HF)": stepper(hf), "torch_int8_dynamic (HF)": stepper(int8)}


# variant -> its "linears only" row (same weights, same kernels)
LINEARS_OF = {"jax_f32": "jax_f32 linears only", "jax_f32 pure-XLA": "jax_f32 linears only",
              "jax_W8 (per-channel) native": "jax_W8 native linears only",
              "jax_W4 g128 native": "jax_W4 g128 native linears only"}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer random Llama instead of SmolLM2 (smoke test)")
    ap.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                   "decode.json"))
    args = ap.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 15)

    if args.tiny:
        from jaxquant.models.llama import Llama, LlamaConfig
        model = Llama(LlamaConfig(vocab_size=512, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=256),
                      rngs=nnx.Rngs(0))
    else:
        model, _ = load_smollm2()
    w8 = jq.quantize_weight_only(model, jq.int8_weight_only())
    w4 = jq.quantize_weight_only(model, jq.int4_weight_only(128, allow_partial_group=True))
    w4_64 = jq.quantize_weight_only(model, jq.int4_weight_only(64))
    native = jq.native_backend_available() and weight_only_gemv_supported(1)
    fused = jq.native_backend_available() and decode_ops_supported()
    # (name, model, native?): the native rows exist only where the kernel runs. jax_f32 runs with the
    # native backend on: its projections are XLA's float dots either way, and its norms and attention
    # take the same fused decode ops (jaxquant.native.decode_ops) as the quantized native rows, so every
    # row shares the non-matmul code. "jax_f32 pure-XLA" is the same model with everything on XLA.
    plan = [("jax_f32", model, fused)]
    if fused:
        plan.append(("jax_f32 pure-XLA", model, False))
    for label, m in (("W8 (per-channel)", w8), ("W4 g128", w4), ("W4 g64", w4_64)):
        if native:
            plan.append((f"jax_{label} native", m, True))
        plan.append((f"jax_{label} XLA fallback", m, False))
    variants = {name: m for name, m, _ in plan}
    max_len = args.prompt_len + 8
    fns = {}
    for name, m, on in plan:
        fns[name] = cached_decode_step(make_forward, init_cache, m, args.prompt_len, max_len, on)[0]
    # Each "linears only" row is the projections of the variant named in LINEARS_OF; the difference is
    # that variant's non-projection time per token (norms, rotary, attention, cache, dispatch).
    for name, m, on in (("jax_f32 linears only", model, False), ("jax_W8 native linears only", w8, native),
                        ("jax_W4 g128 native linears only", w4, native)):
        if "native" in name and not native:
            continue
        with jq.use_native(on):
            f, state = linears_only(m)
            x = jnp.ones((1, max(model.config.dim, model.config.hidden_dim)), jnp.float32)
            jax.block_until_ready(f(state, x))

        def lin_step(f=f, s=state, x=x, on=on):
            with jq.use_native(on):
                return f(s, x)
        fns[name] = lin_step
    if not args.no_torch:
        try:
            fns.update(torch_peers(model, args.prompt_len))
        except Exception as e:  # noqa: BLE001 - a missing/changed transformers API only drops the peer columns
            print(f"PyTorch peers skipped: {type(e).__name__}: {e}")
    times = time_interleaved(fns, repeats=repeats, warmup=1)
    rows = []
    for name in fns:
        ms = median_ms(times[name])
        row = {"variant": name, "ms/token": ms, "tokens/s": 1000.0 / ms,
               "speed-up vs jax_f32": paired_ratio(times, "jax_f32", name)}
        lin = LINEARS_OF.get(name)
        if lin in times:
            row["non-projection ms/token"] = ms - median_ms(times[lin])
        if name in variants:
            m = variants[name]
            row["linear weights MB"] = linear_weight_bytes(m) / 1e6
            row["vs f32 linear"] = linear_weight_bytes(m) / linear_weight_bytes(model)
            row["model MB"] = model_bytes(m) / 1e6
        rows.append(row)
    title = "tiny random Llama (2 layers, dim 128)" if args.tiny else "SmolLM2-135M"
    print(f"\n{title} decode, batch 1, KV cache (prompt {args.prompt_len}), 2 threads; "
          f"{'--quick, ' if args.quick else ''}{repeats} rounds\n")
    print(markdown_table(rows))
    write_json(args.json, rows, quick=args.quick)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
