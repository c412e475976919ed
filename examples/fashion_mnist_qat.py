"""Quantization-aware training of FashionCNN on Fashion-MNIST with an Optax loop.

float training -> static PTQ int8 -> QAT fine-tune (fake quant + BatchNorm in the loop) -> int8. Then
4 bits: per-channel 4-bit weights (``quant_min=-8, quant_max=7``) alone cost this CNN almost nothing after
PTQ, but 4-bit weights *and* 4-bit activations (``quant_min=0, quant_max=15``) lose points, and QAT (with
LSQ learnable activation scales) wins most of them back. The QAT runs follow PyTorch's QAT tutorial: a cosine learning-rate decay, observers frozen
part way, BatchNorm statistics frozen a little later.
Then the QAT int8 model is shipped as the PTQ example does: ``jaxquant.save`` (float and int8), reloaded
into a template bit-exactly, ``jaxquant.export`` with a symbolic batch, deserialized and checked.

Prints a markdown accuracy table and sizes; writes the training curves and an accuracy bar chart to
examples/outputs/qat_curves.png.

    python examples/fashion_mnist_qat.py            # ~5 min on 2 cores
    python examples/fashion_mnist_qat.py --quick    # small subset, for the test suite

Needs Debian's ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

import jaxquant as jq
from jaxquant.datasets.fashion_mnist import load_fashion_mnist, to_float_nhwc
from jaxquant.dtypes import per_channel_symmetric, qint8, quint8
from jaxquant.fake_quant.fake_quantize import FusedMovingAvgObsFakeQuantize
from jaxquant.fake_quant.learnable import LearnableFakeQuantize
from jaxquant.models.fashion_cnn import FashionCNN, fusion_patterns
from jaxquant.observers.histogram import HistogramObserver
from jaxquant.observers.minmax import MovingAverageMinMaxObserver
from jaxquant.observers.per_channel import MovingAveragePerChannelMinMaxObserver, PerChannelMinMaxObserver
from jaxquant.qconfig import QConfig
from jaxquant.transforms.prepare_qat import (check_qat_state, disable_observer, enable_param_learning, freeze_bn_stats,
                                            prepare_qat)


def train(model: nnx.Module, x: np.ndarray, y: np.ndarray, *, epochs: int, peak_lr: float, batch: int, desc: str,
          hooks: Optional[dict[int, Callable[[nnx.Module], None]]] = None, seed: int = 0) -> list[float]:
    """AdamW with a cosine-decayed learning rate; ``hooks[step](model)`` runs before global ``step``.
    ``x`` float32 ``(N, 28, 28, 1)``, ``y`` int32 ``(N,)``. Returns the per-step training losses."""
    steps_per_epoch = len(x) // batch
    total = epochs * steps_per_epoch
    schedule = optax.cosine_decay_schedule(peak_lr, total, alpha=0.05)
    opt = nnx.Optimizer(model, optax.adamw(schedule, weight_decay=1e-4), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, xb, yb):
        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(xb), yb).mean()
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    model.train()
    rng, curve, hooks = np.random.default_rng(seed), [], hooks or {}
    with tqdm(total=total, desc=desc) as bar:
        for _ in range(epochs):
            order = rng.permutation(len(x))
            for i in range(steps_per_epoch):
                if len(curve) in hooks:
                    hooks[len(curve)](model)  # flips int32 flags in QuantStats: the jitted step is not retraced
                idx = order[i * batch:(i + 1) * batch]
                curve.append(float(step(model, opt, jnp.asarray(x[idx]), jnp.asarray(y[idx]))))
                if not np.isfinite(curve[-1]):
                    check_qat_state(model)  # names the layer whose state went NaN
                    raise FloatingPointError(f"{desc}: the loss went {curve[-1]} at step {len(curve)}")
                bar.update()
                bar.set_postfix(loss=f"{curve[-1]:.3f}")
    model.eval()
    return curve


def accuracy(model: nnx.Module, x: np.ndarray, y: np.ndarray, batch: int = 500) -> float:
    """Top-1 test accuracy in percent (the model in eval mode)."""
    serve = jq.compile(model)  # the serving path (docs/serving.md)
    correct = sum(int(jnp.sum(jnp.argmax(serve(jnp.asarray(x[i:i + batch])), axis=-1) == y[i:i + batch]))
                  for i in range(0, len(x), batch))
    return 100.0 * correct / len(x)


def qconfigs(weight_bits: int = 8, activation_bits: int = 8) -> tuple[QConfig, QConfig]:
    """``(PTQ qconfig, QAT qconfig)``: PyTorch's x86 defaults, narrowed to ``weight_bits`` symmetric
    per-channel weights (MinMax statistics for PTQ, their moving average for QAT) and ``activation_bits``
    unsigned activations (histogram for PTQ, as x86's default; for QAT, LSQ: a learnable scale and zero
    point, started from moving-average MinMax, since a MinMax range wastes most of 16 levels on outliers)."""
    ptq, qat = jq.get_default_qconfig("x86"), jq.get_default_qat_qconfig("x86")
    if weight_bits < 8:
        qmin, qmax = -(2 ** (weight_bits - 1)), 2 ** (weight_bits - 1) - 1
        ptq = QConfig(activation=ptq.activation, weight=PerChannelMinMaxObserver.with_args(
            dtype=qint8, qscheme=per_channel_symmetric, quant_min=qmin, quant_max=qmax))
        qat = QConfig(activation=qat.activation, weight=FusedMovingAvgObsFakeQuantize.with_args(
            observer=MovingAveragePerChannelMinMaxObserver, quant_min=qmin, quant_max=qmax, dtype=qint8,
            qscheme=per_channel_symmetric))
    if activation_bits < 8:
        qmax = 2 ** activation_bits - 1
        ptq = QConfig(activation=HistogramObserver.with_args(dtype=quint8, quant_min=0, quant_max=qmax),
                      weight=ptq.weight)
        qat = QConfig(activation=LearnableFakeQuantize.with_args(
            observer=MovingAverageMinMaxObserver, dtype=quint8, quant_min=0, quant_max=qmax), weight=qat.weight)
    return ptq, qat


def ptq(model: FashionCNN, qconfig: QConfig, x_cal: np.ndarray) -> nnx.Module:
    """Static PTQ of the float model: fuse, prepare, calibrate on ``x_cal``, convert."""
    fused = jq.fuse_modules(model, fusion_patterns(model))
    fused.eval()
    observed = jq.prepare(fused, qconfig)
    jq.calibrate(observed, [jnp.asarray(x_cal[i:i + 250]) for i in range(0, len(x_cal), 250)], progress=False)
    return jq.convert(observed)


def prepare_for_qat(model: FashionCNN, qconfig: QConfig) -> nnx.Module:
    """Conv-BN-ReLU fused with the BatchNorm kept in the loop, then fake quantization everywhere."""
    fused = jq.fuse_modules_qat(model, fusion_patterns(model))
    fused.train()  # the fused BatchNorms train on batch statistics
    return prepare_qat(fused, qconfig)


def qat(model: FashionCNN, qconfig: QConfig, x: np.ndarray, y: np.ndarray, *, epochs: int, peak_lr: float,
        batch: int, desc: str) -> tuple[nnx.Module, nnx.Module, list[float], dict[str, int]]:
    """QAT fine-tune of a copy of ``model``; returns ``(int8 model, QAT model, losses, freeze steps)``."""
    m = prepare_for_qat(nnx.clone(model), qconfig)
    total = epochs * (len(x) // batch)
    # PyTorch's tutorial recipe: observers settle, then freeze; BatchNorm statistics freeze after them,
    # so the last steps train exactly the numerics convert() will bake in.
    freeze = {"observers": int(0.5 * total), "BN stats": int(0.7 * total)}
    hooks = {freeze["observers"]: disable_observer, freeze["BN stats"]: freeze_bn_stats}
    if any(isinstance(fq, LearnableFakeQuantize) for fq in (qconfig.activation(), qconfig.weight())):
        # LSQ: a few steps of observer estimates, then the scales train from there
        freeze["LSQ learning"] = max(1, int(0.05 * total))
        hooks[freeze["LSQ learning"]] = enable_param_learning
    curve = train(m, x, y, epochs=epochs, peak_lr=peak_lr, batch=batch, desc=desc, hooks=hooks)
    return jq.convert(m), m, curve, freeze


def ship(float_model: nnx.Module, int8_model: nnx.Module, qconfig: QConfig, probe: jax.Array) -> dict:
    """Save float and int8, reload the int8 checkpoint into a freshly built template, export with a
    symbolic batch; assert both round trips give identical outputs and return the sizes in bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        float_bytes = jq.save(os.path.join(tmp, "float.jq"), float_model)
        int8_bytes = jq.save(os.path.join(tmp, "int8.jq"), int8_model, qconfig=qconfig)
        # The template is the same pipeline on an untrained model; load replaces every array.
        template = jq.converted_template(prepare_for_qat(FashionCNN(rngs=nnx.Rngs(1)), qconfig), probe)
        reloaded = jq.load(os.path.join(tmp, "int8.jq"), template)
    expected = np.asarray(int8_model(probe))
    reload_equal = bool(np.array_equal(np.asarray(reloaded(probe)), expected))
    assert reload_equal, "the reloaded int8 model is not bit-exact"
    artifact = jq.export(int8_model, probe)
    exported = jax.export.deserialize(bytearray(artifact))
    export_equal = bool(np.array_equal(np.asarray(exported.call(probe[:5])), expected[:5]))
    assert export_equal, "the deserialized jax.export artifact differs from the int8 model"
    return {"float_bytes": float_bytes, "int8_bytes": int8_bytes, "size_ratio": int8_bytes / float_bytes,
            "export_bytes": len(artifact), "reload_bit_exact": reload_equal, "export_equal": export_equal}


def make_figure(float_curve: list[float], qat_runs: dict[str, tuple[list[float], dict[str, int]]],
                accuracy_table: dict[str, float]):
    """Three panels: float training loss, the QAT runs' losses with their freeze steps, and the test
    accuracy of every model as bars (the 4-bit story: PTQ loses points, QAT wins them back).
    Legends sit below the axes so they cover no data. Returns the matplotlib Figure."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def smooth(c):
        w = max(1, min(25, len(c) // 10))
        return np.convolve(c, np.ones(w) / w, mode="valid")

    fig, axes = plt.subplots(1, 3, figsize=(16, 5), gridspec_kw={"width_ratios": [1, 1.2, 1.3]})
    axes[0].plot(smooth(float_curve), color="k")
    axes[0].set_title("float training"), axes[0].set_xlabel("step"), axes[0].set_ylabel("training loss (moving avg)")
    for (name, (curve, freeze)), color in zip(qat_runs.items(), ("tab:blue", "tab:red")):
        axes[1].plot(smooth(curve), color=color, label=name)
        for what, style in (("observers", ":"), ("BN stats", "--")):
            axes[1].axvline(freeze[what], color=color, linestyle=style, alpha=0.6,
                            label=f"{name}: {what} frozen")
    axes[1].set_title("QAT fine-tune from the float model"), axes[1].set_xlabel("step")
    axes[1].set_ylabel("training loss (moving avg)")
    axes[1].legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)

    names = list(accuracy_table)
    values = [accuracy_table[k] for k in names]
    colors = ["k" if k == "float" else ("tab:orange" if k.startswith("PTQ") else "tab:blue") for k in names]
    bars = axes[2].bar(range(len(names)), values, color=colors)
    axes[2].bar_label(bars, labels=[f"{v:.1f}" for v in values], fontsize=8)
    axes[2].axhline(accuracy_table["float"], color="k", linestyle="--", linewidth=0.8)
    axes[2].set_xticks(range(len(names)), [k.replace(" weights+activations", "\nweights+act.")
                                            .replace(" weights", "\nweights") for k in names], fontsize=7)
    low = min(values)
    axes[2].set_ylim(max(0.0, low - 0.25 * (max(values) - low + 1.0) - 1.0), max(values) + 1.5)
    axes[2].set_title("test accuracy: PTQ vs QAT, 8 and 4 bits"), axes[2].set_ylabel("test accuracy (%)")
    fig.tight_layout()
    return fig


def plot(out: Path, float_curve: list[float], qat_runs: dict[str, tuple[list[float], dict[str, int]]],
         accuracy_table: dict[str, float]) -> Path:
    """Write :func:`make_figure` to ``out/qat_curves.png`` and return its path."""
    import matplotlib.pyplot as plt

    fig = make_figure(float_curve, qat_runs, accuracy_table)
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "qat_curves.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out / "qat_curves.png"


def quick_caveat(accuracy_table: dict[str, float]) -> str:
    """What a ``--quick`` table cannot show (printed under it)."""
    above = {k: v - accuracy_table["float"] for k, v in accuracy_table.items() if k != "float"}
    best = max(above, key=above.get)
    note = (f" ({best} is {above[best]:+.2f} points vs float here)" if above[best] > 0 else "")
    return ("Caveat (--quick): one epoch on a 3000-image subset leaves the float model undertrained, so the "
            "QAT runs, which train for another half epoch, can beat it" + note + "; with 1000 test images one "
            "point is 10 images. Compare quantization costs with the full run (no --quick).")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small subset and short runs (for tests)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "outputs"), help="where the PNG goes")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    xtr, ytr = load_fashion_mnist("train")
    xte, yte = load_fashion_mnist("test")
    xtr, xte = to_float_nhwc(xtr), to_float_nhwc(xte)
    ytr, yte = ytr.astype(np.int32), yte.astype(np.int32)
    # ~0.2 s per training step on 2 idle cores: the full run uses 30k images to stay at a few minutes
    n_train, n_test = (3000, 1000) if args.quick else (30000, 10000)
    xtr, ytr, xte, yte = xtr[:n_train], ytr[:n_train], xte[:n_test], yte[:n_test]
    float_epochs, qat8_epochs, qat4_epochs, batch = (1, 1, 1, 100) if args.quick else (2, 1, 2, 128)
    # --quick: the QAT fine-tunes see half the subset (a QAT step costs ~1.6 float steps): the run still
    # freezes observers and BatchNorm statistics part way and converts what it trained
    n_qat = n_train // 2 if args.quick else n_train

    model = FashionCNN(rngs=nnx.Rngs(0))
    float_curve = train(model, xtr, ytr, epochs=float_epochs, peak_lr=2e-3, batch=batch, desc="float")
    acc = {"float": accuracy(model, xte, yte)}
    ptq8, qat8 = qconfigs()
    ptq4, qat4 = qconfigs(weight_bits=4, activation_bits=4)
    x_cal = xtr[:2000]
    acc["PTQ int8"] = accuracy(ptq(model, ptq8, x_cal), xte, yte)
    int8_model, _, curve8, freeze8 = qat(model, qat8, xtr[:n_qat], ytr[:n_qat], epochs=qat8_epochs, peak_lr=1e-4, batch=batch,
                                         desc="QAT int8")
    acc["QAT int8"] = accuracy(int8_model, xte, yte)
    acc["PTQ 4-bit weights"] = accuracy(ptq(model, qconfigs(weight_bits=4)[0], x_cal), xte, yte)
    acc["PTQ 4-bit weights+activations"] = accuracy(ptq(model, ptq4, x_cal), xte, yte)
    int4_model, _, curve4, freeze4 = qat(model, qat4, xtr[:n_qat], ytr[:n_qat], epochs=qat4_epochs, peak_lr=3e-4, batch=batch,
                                         desc="QAT 4-bit weights+activations")
    acc["QAT 4-bit weights+activations"] = accuracy(int4_model, xte, yte)

    shipped = ship(model, int8_model, qat8, jnp.asarray(xte[:64]))
    png = plot(Path(args.out), float_curve,
               {"QAT int8": (curve8, freeze8), "QAT 4-bit weights+activations": (curve4, freeze4)}, acc)

    print(f"\nFashionCNN, {n_train} training ({n_qat} for QAT) / {n_test} test images\n")
    print("| model | test accuracy (%) | vs float (points) |\n|---|---|---|")
    for k, v in acc.items():
        print(f"| {k} | {v:.2f} | {v - acc['float']:+.2f} |")
    if args.quick:
        print("\n" + quick_caveat(acc))
    lost4 = acc["float"] - acc["PTQ 4-bit weights+activations"]
    if lost4 > 0:
        print(f"\n4-bit weights+activations: PTQ loses {lost4:.2f} points, QAT wins back "
              f"{100 * (acc['QAT 4-bit weights+activations'] - acc['PTQ 4-bit weights+activations']) / lost4:.0f}%"
              " of them")
    print(f"saved: float {shipped['float_bytes'] / 1024:.0f} KB, QAT int8 {shipped['int8_bytes'] / 1024:.0f} KB "
          f"({shipped['size_ratio']:.3f}x); reloaded bit-exact; jax.export artifact "
          f"{shipped['export_bytes'] / 1024:.0f} KB, same outputs")
    print(f"curves: {png}")
    results = {"n_train": n_train, "n_qat_train": n_qat, "n_test": n_test, "accuracy": acc, "float_loss": float_curve,
               "qat_int8_loss": curve8, "qat_4bit_loss": curve4, "freeze_steps": {"int8": freeze8, "4bit": freeze4},
               **shipped}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
