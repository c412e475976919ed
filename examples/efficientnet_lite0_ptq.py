"""Static post-training int8 quantization of pretrained EfficientNet-Lite0, side by side with PyTorch.

    python examples/efficientnet_lite0_ptq.py [--n-eval 300] [--n-calib 64] [--recipe relu6-range]

Eager-mode workflow, as in torch.ao.quantization: fuse Conv+BN, prepare (observers), calibrate on
64 real images, convert, then serve int8 with jaxquant.compile. Data: real photographs bundled with
scikit-image (``jaxquant.datasets.sample_images``); there are no ImageNet labels, so the metric is
top-1 agreement of the int8 model with the float model on a few hundred images.

Two recipes, applied identically to jaxquant and to PyTorch (x86 backend, eager mode):

- ``default``: ``get_default_qconfig('x86')`` everywhere (histogram observer, 7-bit activations,
  per-channel int8 weights). PyTorch cannot fuse Conv+BN+ReLU6, so each conv's output is
  quantized *before* the ReLU6; for this network those outputs span about +-100 while only
  [0, 6] survives the ReLU6, and agreement collapses (about 25 % for both libraries).
- ``relu6-range`` (default): the same, except that every conv feeding a ReLU6 gets fixed output
  qparams covering exactly [0, 6] (``FixedQParamsObserver``, scale 6/127, zero point 0), so the
  requantization clamp *is* the ReLU6. Still plain eager-mode API on both sides.
"""

from __future__ import annotations

import os

# PyTorch's OpenMP threads spin after each op and starve XLA's when both run in one process.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import time
import warnings

import numpy as np
from tqdm import tqdm

import jaxquant as jq
from jaxquant.datasets.sample_images import sample_images
from jaxquant.models import efficientnet_lite as eff

RECIPES = ("relu6-range", "default")
# 7-bit activations like the x86 default (reduce_range=True), covering [0, 6].
RELU6_QMAX = 127


def relu6_conv_paths(model: eff.EfficientNetLite) -> list[str]:
    """Paths of the convs whose output goes straight into a ReLU6 (after BN folding)."""
    return [f"{path}.conv" for path, unit in eff.conv_bn_units(model)
            if isinstance(unit, eff.ConvBNAct)]


def quantize_jaxquant(model: eff.EfficientNetLite, calib: np.ndarray, recipe: str,
                      act_observer: str = "histogram", batch: int = 32,
                      progress: bool = True, fold_relu6: bool = True) -> eff.EfficientNetLite:
    """Float model + calibration images (uint8 NHWC) -> converted int8 jaxquant model.

    With ``fold_relu6`` each ReLU6 is then folded into the conv before it
    (``jq.fuse_quantized_activations``): the same int8 outputs bit for bit, one op fewer per ReLU6."""
    fused = jq.fuse_modules(model, eff.fusion_patterns(model))
    qconfig = jq.get_default_qconfig("x86")
    if act_observer == "minmax":
        qconfig = jq.QConfig(activation=jq.MinMaxObserver.with_args(reduce_range=True),
                             weight=qconfig.weight)
    mapping = jq.QConfigMapping().set_global(qconfig)
    if recipe == "relu6-range":
        relu6 = jq.QConfig(
            activation=jq.FixedQParamsObserver.with_args(
                scale=6.0 / RELU6_QMAX, zero_point=0, quant_min=0, quant_max=RELU6_QMAX),
            weight=qconfig.weight)
        for path in relu6_conv_paths(model):
            mapping.set_module_name(path, relu6)
    observed = jq.prepare(fused, mapping)
    x = eff.preprocess(calib)
    jq.calibrate(observed, [x[i:i + batch] for i in range(0, len(x), batch)], progress=progress)
    int8 = jq.convert(observed)
    return jq.fuse_quantized_activations(int8, eff.activation_patterns(int8)) if fold_relu6 else int8


def quantize_torch(calib: np.ndarray, recipe: str, act_observer: str = "histogram",
                   progress: bool = True):
    """The same recipe with torch.ao.quantization eager mode, x86 engine -> int8 torch model."""
    import torch
    tq = torch.ao.quantization

    torch.backends.quantized.engine = "x86"
    net = eff.torch_efficientnet_lite0(quantizable=True)
    net = tq.fuse_modules(net, eff.torch_fusion_patterns(net))
    qconfig = tq.get_default_qconfig("x86")
    if act_observer == "minmax":
        qconfig = tq.QConfig(activation=tq.MinMaxObserver.with_args(reduce_range=True),
                             weight=qconfig.weight)
    net.qconfig = qconfig
    if recipe == "relu6-range":
        relu6 = tq.QConfig(
            activation=tq.FixedQParamsObserver.with_args(
                scale=6.0 / RELU6_QMAX, zero_point=0, dtype=torch.quint8, quant_min=0,
                quant_max=RELU6_QMAX),
            weight=qconfig.weight)
        for name, module in net.named_modules():
            if name in ("_conv_stem", "_conv_head") or name.endswith(("_expand_conv",
                                                                       "_depthwise_conv")):
                module.qconfig = relu6
    tq.prepare(net, inplace=True)
    x = to_nchw(calib)
    with torch.no_grad():
        for i in tqdm(range(0, len(x), 32), desc="torch calibrate", disable=not progress):
            net(x[i:i + 32])
    return tq.convert(net, inplace=True)


def to_nchw(images: np.ndarray):
    import torch
    return torch.from_numpy(np.asarray(eff.preprocess(images)).transpose(0, 3, 1, 2).copy())


def jax_logits(fn, images: np.ndarray, batch: int = 32, desc: str = "") -> np.ndarray:
    outs = []
    for i in tqdm(range(0, len(images), batch), desc=desc, disable=not desc):
        outs.append(np.asarray(fn(eff.preprocess(images[i:i + batch]))))
    return np.concatenate(outs)


def torch_logits(net, images: np.ndarray, batch: int = 32, desc: str = "") -> np.ndarray:
    import torch
    outs = []
    with torch.no_grad():
        for i in tqdm(range(0, len(images), batch), desc=desc, disable=not desc):
            outs.append(net(to_nchw(images[i:i + batch])).numpy())
    return np.concatenate(outs)


def agreement(logits: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Top-1 agreement with the float reference, and how often int8's top-1 is in float's top-5."""
    top1, ref1 = logits.argmax(-1), ref.argmax(-1)
    ref5 = np.argsort(-ref, axis=-1)[:, :5]
    return {"top1_agreement": float((top1 == ref1).mean()),
            "top1_in_float_top5": float(np.mean([t in r for t, r in zip(top1, ref5)]))}


def median_latency_ms(fns: dict, repeats: int, desc: str) -> dict[str, float]:
    """Interleaved timing (one call of each per round) so machine noise hits all alike."""
    times = {k: [] for k in fns}
    for _ in tqdm(range(repeats), desc=desc):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: 1e3 * float(np.median(v)) for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-eval", type=int, default=300)
    p.add_argument("--n-calib", type=int, default=64)
    p.add_argument("--recipe", choices=RECIPES, default="relu6-range")
    p.add_argument("--act-observer", choices=("histogram", "minmax"), default="histogram",
                   help="activation observer for both libraries (x86 default: histogram)")
    p.add_argument("--batch", type=int, default=8, help="batch size for the latency table")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    args = p.parse_args()
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning)

    images = sample_images(args.n_eval + args.n_calib)
    # Calibrate on images the evaluation does not see (the tail of the deterministic sequence).
    evals, calib = images[:args.n_eval], images[args.n_eval:]

    model = eff.load_efficientnet_lite0()
    float_fn = jq.compile(model)  # the serving path (docs/serving.md), float and int8
    ref = jax_logits(float_fn, evals, desc="float JAX")

    qmodel = quantize_jaxquant(model, calib, args.recipe, args.act_observer)
    int8_fn = jq.compile(qmodel)
    rows = {"jaxquant int8": agreement(jax_logits(int8_fn, evals, desc="jaxquant int8"), ref)}

    x = eff.preprocess(evals[:args.batch])
    fns = {"float JAX": lambda: float_fn(x).block_until_ready(),
           "jaxquant int8": lambda: int8_fn(x).block_until_ready()}
    if not args.no_torch:
        import torch
        tnet = eff.torch_efficientnet_lite0()
        tq_net = quantize_torch(calib, args.recipe, args.act_observer)
        rows["PyTorch float"] = agreement(torch_logits(tnet, evals, desc="torch float"), ref)
        rows["PyTorch int8 x86"] = agreement(torch_logits(tq_net, evals, desc="torch int8"), ref)
        xt = to_nchw(evals[:args.batch])

        def run_torch(net):
            with torch.no_grad():
                net(xt)

        fns["PyTorch float"] = lambda: run_torch(tnet)
        fns["PyTorch int8 x86"] = lambda: run_torch(tq_net)
    for f in fns.values():  # compile / warm up outside the timed rounds
        f()
    lat = median_latency_ms(fns, args.repeats, f"latency batch {args.batch}")

    print(f"\nEfficientNet-Lite0, recipe '{args.recipe}', {args.act_observer} activation observers, "
          f"calibrated on {len(calib)} images, evaluated on {len(evals)} (agreement with float JAX)\n")
    print(f"| model | top-1 agreement | int8 top-1 in float top-5 | latency batch {args.batch} (ms) |")
    print("|---|---|---|---|")
    print(f"| float JAX | 1.000 | 1.000 | {lat['float JAX']:.1f} |")
    for name, r in rows.items():
        print(f"| {name} | {r['top1_agreement']:.3f} | {r['top1_in_float_top5']:.3f} | "
              f"{lat[name]:.1f} |")
    print(f"\nmodel size: float {jq.model_size_bytes(model) / 1e6:.1f} MB, "
          f"int8 {jq.model_size_bytes(qmodel) / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
