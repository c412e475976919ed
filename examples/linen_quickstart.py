"""jaxquant.linen quickstart: a Flax Linen CNN through static PTQ and QAT, and a Linen transformer
block through quantize_dynamic.

Data: scikit-learn's bundled 8x8 digits (no download). Run: ``python examples/linen_quickstart.py``
(one to two minutes on 2 CPU cores, most of it compiling; progress bars show each stage) or
``--quick`` (a few epochs and steps, to check that it runs). Prints accuracy of float / static int8 /
QAT int8 and the dynamic transformer block's error against float.
"""
from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from tqdm.auto import tqdm

import jaxquant as jq
import jaxquant.linen as jql


class DigitsCNN(nn.Module):
    """An ordinary @nn.compact model: nothing in it knows about quantization."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(16, (3, 3), use_bias=False)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
        x = nn.Conv(32, (3, 3), strides=2, feature_group_count=2)(x)
        x = nn.relu(x)
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(64)(x))
        return nn.Dense(10)(x)


class TransformerBlock(nn.Module):
    dim: int = 64
    heads: int = 4

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(h, h)
        h = nn.LayerNorm()(x)
        h = nn.Dense(4 * self.dim)(h)
        return x + nn.Dense(self.dim)(nn.gelu(h))


def load_data(seed: int = 0):
    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[..., None]  # (1797, 8, 8, 1), NHWC
    y = digits.target.astype(np.int32)
    idx = np.random.default_rng(seed).permutation(len(x))
    split = 1400
    return (x[idx[:split]], y[idx[:split]]), (x[idx[split:]], y[idx[split:]])


def accuracy(apply_fn, variables, x, y) -> float:
    logits = jq.compile(apply_fn, variables)(jnp.asarray(x))  # serving path (docs/serving.md)
    return float(np.mean(np.argmax(np.asarray(logits), -1) == y))


def train_float(model, x, y, epochs: int, seed: int = 0):
    variables = model.init(jax.random.key(seed), jnp.asarray(x[:2]))
    tx = optax.adam(3e-3)
    opt = tx.init(variables["params"])

    @jax.jit
    def step(params, batch_stats, opt, xb, yb):
        def loss(p):
            logits, upd = model.apply({"params": p, "batch_stats": batch_stats}, xb, train=True,
                                      mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), upd["batch_stats"]
        (_, batch_stats), g = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt = tx.update(g, opt)
        return optax.apply_updates(params, updates), batch_stats, opt

    params, batch_stats = variables["params"], variables["batch_stats"]
    rng = np.random.default_rng(seed)
    batches_per_epoch = len(x) // 64
    with tqdm(total=epochs * batches_per_epoch, desc="float training", unit="step") as bar:
        for _ in range(epochs):
            for b in np.array_split(rng.permutation(len(x)), batches_per_epoch):
                params, batch_stats, opt = step(params, batch_stats, opt, jnp.asarray(x[b]), jnp.asarray(y[b]))
                bar.update()
    return {"params": params, "batch_stats": batch_stats}


def main(epochs: int = 8, qat_steps: int = 60, quick: bool = False) -> dict:
    (x_tr, y_tr), (x_te, y_te) = load_data()
    model = DigitsCNN()
    t0 = time.time()
    print("1/4 training the float CNN (the first steps compile)", flush=True)
    variables = train_float(model, x_tr, y_tr, epochs)
    results = {"float": accuracy(model.apply, variables, x_te, y_te)}

    # Static PTQ: fold BatchNorm, observe, calibrate, convert.
    print("2/4 static PTQ: fuse, prepare, calibrate, convert", flush=True)
    fused, fused_vars = jql.fuse_modules(model, variables, [("Conv_0", "BatchNorm_0")], jnp.asarray(x_tr[:2]))
    prepared = jql.prepare(fused, jql.get_default_qconfig_mapping("x86"))
    calib = [jnp.asarray(x_tr[i:i + 128]) for i in range(0, 512, 128)]
    stats_vars = jql.calibrate(prepared, fused_vars, calib)
    static_model, static_vars = jql.convert(prepared, stats_vars, calib[0])
    results["static int8"] = accuracy(static_model.apply, static_vars, x_te, y_te)

    # QAT: fake-quant fine-tuning of the fused float model, then convert.
    print("3/4 QAT fine-tuning", flush=True)
    qat = jql.prepare_qat(fused, jql.get_default_qat_qconfig_mapping("x86"))
    _, stats = qat.apply(fused_vars, calib[0], mutable=[jql.QUANT_STATS])
    params, stats = fused_vars["params"], stats[jql.QUANT_STATS]
    others = {k: v for k, v in fused_vars.items() if k != "params"}
    tx = optax.adam(5e-4)
    opt = tx.init(params)

    @jax.jit
    def qat_step(params, stats, opt, xb, yb):
        def loss(p):
            logits, upd = qat.apply({**others, "params": p, jql.QUANT_STATS: stats}, xb, mutable=[jql.QUANT_STATS])
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), upd[jql.QUANT_STATS]
        (_, stats), g = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt = tx.update(g, opt)
        return optax.apply_updates(params, updates), stats, opt

    rng = np.random.default_rng(1)
    for _ in tqdm(range(qat_steps), desc="QAT", unit="step"):
        b = rng.choice(len(x_tr), 64, replace=False)
        params, stats, opt = qat_step(params, stats, opt, jnp.asarray(x_tr[b]), jnp.asarray(y_tr[b]))
    qat_model, qat_vars = jql.convert(qat, {**others, "params": params, jql.QUANT_STATS: stats}, calib[0])
    results["QAT int8"] = accuracy(qat_model.apply, qat_vars, x_te, y_te)

    # Dynamic quantization of a transformer block (random weights): Dense + attention's DenseGeneral.
    print("4/4 quantize_dynamic of a transformer block", flush=True)
    block = TransformerBlock()
    tokens = jax.random.normal(jax.random.key(2), (4, 16, 64))
    block_vars = block.init(jax.random.key(3), tokens)
    dyn_model, dyn_vars = jql.quantize_dynamic(block, block_vars, tokens)
    y_float = np.asarray(block.apply(block_vars, tokens))
    y_dyn = np.asarray(jq.compile(dyn_model, dyn_vars)(tokens))
    rel = float(np.linalg.norm(y_dyn - y_float) / np.linalg.norm(y_float))
    n_int8 = sum(1 for path, _ in jax.tree_util.tree_leaves_with_path(dyn_vars[jql.QUANT_PARAMS])
                 if path[-1].key == "weight_int")

    print("| model | test accuracy (sklearn digits, 397 images) |")
    print("|---|---|")
    for name, acc in results.items():
        print(f"| {name} | {acc:.4f} |")
    if quick:
        print("\nCaveat (--quick): one epoch leaves the float CNN undertrained, so int8/QAT rows (QAT trains "
              "further) can beat it; 397 test images make one point 4 images. Run without --quick to compare.")
    print(f"\nTransformer block, quantize_dynamic: {n_int8} int8 layers, relative L2 error vs float {rel:.4f}")
    print(f"(total {time.time() - t0:.1f} s)")
    return {**results, "dynamic_block_rel_err": rel}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--qat-steps", type=int, default=60)
    parser.add_argument("--quick", action="store_true", help="1 epoch and 5 QAT steps: checks that it runs")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.qat_steps = 1, 5
    main(args.epochs, args.qat_steps, quick=args.quick)
