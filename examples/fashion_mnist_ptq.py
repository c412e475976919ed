"""Static post-training quantization of a small CNN on Fashion-MNIST, end to end.

Train a float CNN (Conv-BN-ReLU blocks, max pooling, Linear) with Optax, fuse Conv+BN+ReLU, prepare
with PyTorch's x86 default qconfig, calibrate on training images with one compiled step, convert to
int8 and serve it with jaxquant.compile. Prints float vs int8 accuracy, size on disk and latency.

    python examples/fashion_mnist_ptq.py            # ~2 min on 2 cores
    python examples/fashion_mnist_ptq.py --quick    # a smoke run (used by the tests)

Needs Debian's ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

import jaxquant as jq
from jaxquant.datasets.fashion_mnist import load_fashion_mnist, to_float_nhwc
from jaxquant.models.fashion_cnn import FashionCNN, fusion_patterns


def train_float(model: FashionCNN, images: np.ndarray, labels: np.ndarray, *, epochs: int, batch_size: int = 128,
                learning_rate: float = 2e-3, seed: int = 0) -> list[float]:
    """Adam on cross-entropy; returns the per-step training losses."""
    optimizer = nnx.Optimizer(model, optax.adam(learning_rate), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, y):
        def loss_fn(model):
            logits = model(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    model.train()
    rng = np.random.default_rng(seed)
    steps_per_epoch = len(images) // batch_size
    losses = []
    with tqdm(total=epochs * steps_per_epoch, desc="train float") as bar:
        for _ in range(epochs):
            order = rng.permutation(len(images))
            for i in range(steps_per_epoch):
                idx = order[i * batch_size:(i + 1) * batch_size]
                loss = step(model, optimizer, jnp.asarray(images[idx]), jnp.asarray(labels[idx], jnp.int32))
                losses.append(float(loss))
                bar.update()
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


def accuracy(model, images: np.ndarray, labels: np.ndarray, batch_size: int = 500) -> float:
    serve = jq.compile(model)  # the serving path: split once, one compiled program per batch shape
    correct = 0
    for i in range(0, len(images), batch_size):
        logits = serve(jnp.asarray(images[i:i + batch_size]))
        correct += int(jnp.sum(jnp.argmax(logits, axis=-1) == labels[i:i + batch_size]))
    return 100.0 * correct / len(images)


def latency_ms(models: dict, x: jax.Array, rounds: int = 15, calls: int = 20) -> dict:
    """Median ms per call of each model served with ``jq.compile``, timed interleaved round by round
    (as benchmarks/bench_fashion_cnn.py does), plus the paired float/int8 speed-up."""
    served = {name: jq.compile(m) for name, m in models.items()}
    for serve in served.values():
        serve(x).block_until_ready()
    times = {name: [] for name in served}
    for _ in range(rounds):
        for name, serve in served.items():
            serve(x).block_until_ready()  # warm: the other model's weights were in cache
            t0 = time.perf_counter()
            for _ in range(calls):
                out = serve(x)
            out.block_until_ready()
            times[name].append((time.perf_counter() - t0) * 1e3 / calls)
    result = {f"{name}_ms": float(np.median(t)) for name, t in times.items()}
    result["speedup"] = float(np.median([f / q for f, q in zip(times["float"], times["int8"])]))
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small data and one short epoch (smoke test)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)

    train_x, train_y = load_fashion_mnist("train")
    test_x, test_y = load_fashion_mnist("test")
    if args.quick:
        train_x, train_y, test_x, test_y = train_x[:6000], train_y[:6000], test_x[:2000], test_y[:2000]
    train_x, test_x = to_float_nhwc(train_x), to_float_nhwc(test_x)

    model = FashionCNN(rngs=nnx.Rngs(0))
    train_float(model, train_x, train_y, epochs=1 if args.quick else args.epochs)
    float_acc = accuracy(model, test_x, test_y)

    # Static PTQ: fuse -> prepare -> calibrate (one compiled step) -> convert.
    fused = jq.fuse_modules(model, fusion_patterns(model))
    prepared = jq.prepare(fused, jq.get_default_qconfig("x86"))
    calibration = [jnp.asarray(train_x[i:i + 100]) for i in range(0, 1000 if args.quick else 2000, 100)]
    jq.calibrate(prepared, calibration)
    int8_model = jq.convert(prepared)
    int8_acc = accuracy(int8_model, test_x, test_y)

    # Ship it: a jaxquant checkpoint (int8 weights, scales, zero points, static qparams; no pickle),
    # loaded back into a template built the same way, and a jax.export artifact (symbolic batch).
    with tempfile.TemporaryDirectory() as tmp:
        float_bytes = jq.save(os.path.join(tmp, "float.jq"), model)
        int8_bytes = jq.save(os.path.join(tmp, "int8.jq"), int8_model, qconfig=jq.get_default_qconfig("x86"))
        template = jq.converted_template(prepared, calibration[0])
        reloaded = jq.load(os.path.join(tmp, "int8.jq"), template)
        probe = jnp.asarray(test_x[:64])
        assert np.array_equal(np.asarray(reloaded(probe)), np.asarray(int8_model(probe))), "load is not bit-exact"
        artifact = jq.export(int8_model, probe)
        exported = jax.export.deserialize(bytearray(artifact))
        assert np.array_equal(np.asarray(exported.call(probe[:5])), np.asarray(int8_model(probe[:5])))
    print(f"saved: float {float_bytes / 1024:.0f} KB, int8 {int8_bytes / 1024:.0f} KB "
          f"({int8_bytes / float_bytes:.3f}x); reloaded bit-exact; jax.export artifact {len(artifact) / 1024:.0f} KB")

    latency = {}
    # --quick is a smoke run (and the test suite compiles at XLA O0): a few rounds show the path works
    timing = {"rounds": 3, "calls": 5} if args.quick else {}
    for batch in (1, 64):
        x = jnp.asarray(test_x[:batch])
        latency[batch] = latency_ms({"float": model, "int8": int8_model}, x, **timing)

    results = {
        "float_accuracy": float_acc, "int8_accuracy": int8_acc, "accuracy_drop": float_acc - int8_acc,
        "float_bytes": float_bytes, "int8_bytes": int8_bytes, "size_ratio": int8_bytes / float_bytes,
        "export_bytes": len(artifact),
        "latency": latency,
    }
    print("\n| model | test accuracy (%) | size on disk (KB) | latency b=1 (ms) | latency b=64 (ms) |")
    print("|---|---|---|---|---|")
    print(f"| float32 | {float_acc:.2f} | {float_bytes / 1024:.0f} | {latency[1]['float_ms']:.3f} | "
          f"{latency[64]['float_ms']:.3f} |")
    print(f"| int8 (x86 qconfig) | {int8_acc:.2f} | {int8_bytes / 1024:.0f} | {latency[1]['int8_ms']:.3f} | "
          f"{latency[64]['int8_ms']:.3f} |")
    print(f"\naccuracy drop {float_acc - int8_acc:.2f} points; int8 size {results['size_ratio']:.3f}x float; "
          f"int8 speed-up {latency[1]['speedup']:.2f}x (b=1), {latency[64]['speedup']:.2f}x (b=64), served "
          "with jq.compile (median of paired rounds)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
