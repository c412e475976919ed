"""Quantization-aware training of FashionCNN on Fashion-MNIST with an Optax loop.

float training -> static PTQ int8 -> QAT fine-tune (fake quant + BN in the loop) -> int8, and the same
with 4-bit weights (quant_min=-8, quant_max=7), where PTQ loses visibly and QAT recovers.
Prints a markdown accuracy table and writes the training curves to examples/outputs/qat_curves.png.

    python examples/fashion_mnist_qat.py            # a few minutes on 2 cores
    python examples/fashion_mnist_qat.py --quick    # small subset, for the test suite
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from jaxquant.datasets.fashion_mnist import load_fashion_mnist, to_float_nhwc
from jaxquant.dtypes import per_channel_symmetric, qint8
from jaxquant.fake_quant.fake_quantize import FusedMovingAvgObsFakeQuantize
from jaxquant.fusion import fuse_modules, fuse_modules_qat
from jaxquant.models.fashion_cnn import FashionCNN, fusion_patterns
from jaxquant.observers.per_channel import MovingAveragePerChannelMinMaxObserver, PerChannelMinMaxObserver
from jaxquant.qconfig import QConfig, get_default_qat_qconfig, get_default_qconfig
from jaxquant.transforms import calibrate, convert, prepare
from jaxquant.transforms.prepare_qat import check_qat_state, disable_observer, freeze_bn_stats, prepare_qat


def batches(x, y, batch, rng):
    idx = rng.permutation(len(x))
    for i in range(0, len(x) - batch + 1, batch):
        j = idx[i:i + batch]
        yield jnp.asarray(x[j]), jnp.asarray(y[j])


def make_train_step():
    @nnx.jit
    def step(model, opt, x, y):
        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss
    return step


def train(model, x, y, epochs, lr, batch, desc, on_epoch=None, seed=0):
    model.train()
    opt = nnx.Optimizer(model, optax.adamw(lr), wrt=nnx.Param)
    step, rng, curve = make_train_step(), np.random.default_rng(seed), []
    for epoch in range(epochs):
        if on_epoch is not None:
            on_epoch(model, epoch)
        bar = tqdm(list(batches(x, y, batch, rng)), desc=f"{desc} epoch {epoch + 1}/{epochs}", leave=False)
        for xb, yb in bar:
            loss = float(step(model, opt, xb, yb))
            curve.append(loss)
            bar.set_postfix(loss=f"{loss:.3f}")
        if not np.isfinite(curve[-1]):
            check_qat_state(model)  # names the layer whose state went NaN
    model.eval()
    return curve


def accuracy(model, x, y, batch=500):
    fwd = lambda m, x: m(x)  # noqa: E731
    correct = 0
    for i in range(0, len(x), batch):
        correct += int(np.sum(np.argmax(np.asarray(fwd(model, jnp.asarray(x[i:i + batch]))), -1) == y[i:i + batch]))
    return 100.0 * correct / len(x)


def weight_4bit_qconfigs():
    ptq = get_default_qconfig("x86")
    ptq4 = QConfig(activation=ptq.activation, weight=PerChannelMinMaxObserver.with_args(
        dtype=qint8, qscheme=per_channel_symmetric, quant_min=-8, quant_max=7))
    qat = get_default_qat_qconfig("x86")
    qat4 = QConfig(activation=qat.activation, weight=FusedMovingAvgObsFakeQuantize.with_args(
        observer=MovingAveragePerChannelMinMaxObserver, quant_min=-8, quant_max=7, dtype=qint8,
        qscheme=per_channel_symmetric))
    return ptq, ptq4, qat, qat4


def ptq(model, qconfig, x_cal):
    fused = fuse_modules(model, fusion_patterns(model))
    fused.eval()
    observed = prepare(fused, qconfig)
    calibrate(observed, [jnp.asarray(x_cal[i:i + 250]) for i in range(0, len(x_cal), 250)], progress=False)
    return convert(observed)


def qat(model, qconfig, x, y, epochs, lr, batch):
    m = fuse_modules_qat(model, fusion_patterns(model))
    m.train()
    m = prepare_qat(m, qconfig)

    def schedule(model, epoch):  # PyTorch's recipe: freeze observers / BN stats for the last epoch
        if epochs > 1 and epoch == epochs - 1:
            disable_observer(model)
            freeze_bn_stats(model)

    curve = train(m, x, y, epochs, lr, batch, "QAT", on_epoch=schedule)
    return convert(m), curve


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small subset and one epoch each (for tests)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "outputs"))
    args = ap.parse_args(argv)
    xtr, ytr = load_fashion_mnist("train")
    xte, yte = load_fashion_mnist("test")
    xtr, xte = to_float_nhwc(xtr), to_float_nhwc(xte)
    ytr, yte = ytr.astype(np.int32), yte.astype(np.int32)
    # ~0.7 s per step on 2 cores: the full run uses 20k training images to stay at a few minutes
    n_train, n_test = (4000, 1000) if args.quick else (20000, 10000)
    xtr, ytr, xte, yte = xtr[:n_train], ytr[:n_train], xte[:n_test], yte[:n_test]
    float_epochs, qat_epochs, batch = (1, 1, 100) if args.quick else (2, 1, 128)

    model = FashionCNN(rngs=nnx.Rngs(0))
    float_curve = train(model, xtr, ytr, float_epochs, 1e-3, batch, "float")
    acc = {"float": accuracy(model, xte, yte)}
    ptq8, ptq4, qat8, qat4 = weight_4bit_qconfigs()
    acc["PTQ int8"] = accuracy(ptq(model, ptq8, xtr[:2000]), xte, yte)
    q8, curve8 = qat(nnx.clone(model), qat8, xtr, ytr, qat_epochs, 1e-4, batch)
    acc["QAT int8"] = accuracy(q8, xte, yte)
    acc["PTQ 4-bit weights"] = accuracy(ptq(model, ptq4, xtr[:2000]), xte, yte)
    q4, curve4 = qat(nnx.clone(model), qat4, xtr, ytr, qat_epochs, 3e-4, batch)
    acc["QAT 4-bit weights"] = accuracy(q4, xte, yte)

    print("\n| model | test accuracy (%) |\n|---|---|")
    for k, v in acc.items():
        print(f"| {k} | {v:.2f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, c in (("float", float_curve), ("QAT int8", curve8), ("QAT 4-bit weights", curve4)):
        ax.plot(np.convolve(c, np.ones(20) / 20, mode="valid"), label=name)
    ax.set_xlabel("step"), ax.set_ylabel("training loss (moving average)"), ax.legend()
    fig.tight_layout()
    fig.savefig(out / "qat_curves.png")
    print(f"curves: {out / 'qat_curves.png'}")
    return acc


if __name__ == "__main__":
    main()
