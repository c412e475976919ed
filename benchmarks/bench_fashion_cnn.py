"""Whole-model benchmark: the Fashion-MNIST CNN, static int8 vs float, jaxquant vs PyTorch.

Same architecture and float weights in both frameworks (random init, BatchNorm statistics set),
calibrated on the same real Fashion-MNIST images, x86 default qconfig in both. The JAX models are timed
as ``jax.jit`` over split state and through the documented serving path, ``jaxquant.compile``. Timed interleaved in
one process (medians, paired ratios), at batch 1 and 64; sizes are those of the defining arrays.
``jaxquant_int8`` is the default path (native backend where available), ``jaxquant_int8_xla`` the
pure-XLA kernels (``jq.use_native(False)``).

    python benchmarks/bench_fashion_cnn.py [--quick] [--json out.json]
"""
from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(__file__))
from timing import import_torch, markdown_table, median_ms, paired_ratio, time_interleaved, write_json  # noqa: E402

import jaxquant as jq  # noqa: E402
from jaxquant.datasets.fashion_mnist import load_fashion_mnist, to_float_nhwc  # noqa: E402
from jaxquant.models.fashion_cnn import FashionCNN, fusion_patterns, set_batchnorm_statistics  # noqa: E402
from jaxquant.tools import model_size_bytes  # noqa: E402


def torch_twin(model: FashionCNN):
    """The same network in PyTorch (NCHW) with the same float weights."""
    import torch
    from torch import nn

    width = model.block1.conv.out_features

    class Block(nn.Module):
        def __init__(self, src, cin, cout):
            super().__init__()
            self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(cout, eps=src.bn.epsilon)
            self.relu = nn.ReLU()
            self.pool = nn.MaxPool2d(2)
            with torch.no_grad():
                self.conv.weight.copy_(torch.tensor(np.asarray(src.conv.kernel.get_value()).transpose(3, 2, 0, 1)))
                self.bn.weight.copy_(torch.tensor(np.asarray(src.bn.scale.get_value())))
                self.bn.bias.copy_(torch.tensor(np.asarray(src.bn.bias.get_value())))
                self.bn.running_mean.copy_(torch.tensor(np.asarray(src.bn.mean.get_value())))
                self.bn.running_var.copy_(torch.tensor(np.asarray(src.bn.var.get_value())))

        def forward(self, x):
            return self.pool(self.relu(self.bn(self.conv(x))))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.quant = torch.ao.quantization.QuantStub()
            self.block1 = Block(model.block1, 1, width)
            self.block2 = Block(model.block2, width, 2 * width)
            self.fc1 = nn.Linear(7 * 7 * 2 * width, 128)
            self.relu = nn.ReLU()
            self.fc2 = nn.Linear(128, 10)
            self.dequant = torch.ao.quantization.DeQuantStub()
            with torch.no_grad():
                # Our Flatten is NHWC-ordered; permute fc1's input features to torch's NCHW order.
                k = np.asarray(model.fc1.kernel.get_value()).reshape(7, 7, 2 * width, 128)
                self.fc1.weight.copy_(torch.tensor(k.transpose(3, 2, 0, 1).reshape(128, -1)))
                self.fc1.bias.copy_(torch.tensor(np.asarray(model.fc1.bias.get_value())))
                self.fc2.weight.copy_(torch.tensor(np.asarray(model.fc2.kernel.get_value()).T))
                self.fc2.bias.copy_(torch.tensor(np.asarray(model.fc2.bias.get_value())))

        def forward(self, x):
            x = self.quant(x)
            x = self.block2(self.block1(x))
            x = self.relu(self.fc1(torch.flatten(x, 1)))
            return self.dequant(self.fc2(x))

    return Net().eval()


def build_models(images: np.ndarray, with_torch: bool = True):
    """(float model, jaxquant int8 model, torch float twin, torch int8 twin) with the same weights,
    calibrated on the same 500 test images (x86 default qconfig in both); torch entries are None
    when ``with_torch`` is false."""
    model = set_batchnorm_statistics(FashionCNN(rngs=nnx.Rngs(0)), np.random.default_rng(0))
    model.eval()

    calibration = [jnp.asarray(images[i:i + 100]) for i in range(0, 500, 100)]
    prepared = jq.prepare(jq.fuse_modules(model, fusion_patterns(model)), jq.get_default_qconfig("x86"))
    jq.calibrate(prepared, calibration, progress=False)
    int8_model = jq.convert(prepared)
    if not with_torch:
        return model, int8_model, None, None

    import torch

    tmodel = torch_twin(model)
    tmodel.qconfig = torch.ao.quantization.get_default_qconfig("x86")
    tfused = torch.ao.quantization.fuse_modules(
        tmodel, [["block1.conv", "block1.bn", "block1.relu"], ["block2.conv", "block2.bn", "block2.relu"],
                 ["fc1", "relu"]])
    tprep = torch.ao.quantization.prepare(tfused)
    with torch.no_grad():
        for c in calibration:
            tprep(torch.tensor(np.asarray(c)).permute(0, 3, 1, 2))
    return model, int8_model, tmodel, torch.ao.quantization.convert(tprep)


def jitted(m, native: bool = True):
    """``x -> m(x)`` compiled once over the split state (what a server would run); ``native=False``
    traces it with the native backend off (the pure-XLA int8 kernels)."""
    graphdef, state = nnx.split(m)
    f = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))

    def run(x):
        with jq.use_native(native):
            return f(state, x)
    return run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default="benchmarks/results/fashion_cnn.json")
    args = parser.parse_args(argv)

    torch = import_torch(threads=2)
    if torch is None:
        parser.error("the PyTorch columns need torch: pip install -e '.[test]'")

    images, _ = load_fashion_mnist("test")
    images = to_float_nhwc(images[:1000])
    model, int8_model, tmodel, tint8 = build_models(images)

    serve_float, serve_int8 = jq.compile(model), jq.compile(int8_model)  # the documented serving path
    run_float, run_int8, run_int8_xla = jitted(model), jitted(int8_model), jitted(int8_model, native=False)
    native = jq.native_backend_available()
    print(f"native backend: {'on' if native else 'off (' + jq.native_backend_reason() + ')'}\n")
    rows, raw = [], {}
    for batch in ((1, 64) if args.quick else (1, 64, 256)):
        x = jnp.asarray(images[:batch])
        xt = torch.tensor(images[:batch]).permute(0, 3, 1, 2).contiguous()
        with torch.no_grad():
            fns = {
                "jax_f32": lambda: run_float(x),
                "jaxquant_int8": lambda: run_int8(x),
                "jq.compile f32": lambda: serve_float(x),
                "jq.compile int8": lambda: serve_int8(x),
                "torch_f32": lambda: tmodel(xt),
                "torch_int8": lambda: tint8(xt),
            }
            if native:
                fns["jaxquant_int8_xla"] = lambda: run_int8_xla(x)
            times = time_interleaved(fns, repeats=7 if args.quick else 21)
        raw[batch] = times
        rows.append({
            "batch": batch,
            **{f"{k} ms": median_ms(v) for k, v in times.items()},
            "int8 speed-up vs jax_f32": paired_ratio(times, "jax_f32", "jaxquant_int8"),
            "int8 speed-up (jq.compile)": paired_ratio(times, "jq.compile f32", "jq.compile int8"),
            "jaxquant/torch int8 time": paired_ratio(times, "jaxquant_int8", "torch_int8"),
            **({"xla/native int8 time": paired_ratio(times, "jaxquant_int8_xla", "jaxquant_int8")} if native else {}),
        })

    agreement = float(np.mean(np.argmax(np.asarray(run_float(jnp.asarray(images))), -1)
                              == np.argmax(np.asarray(run_int8(jnp.asarray(images))), -1)))
    sizes = {"float_bytes": model_size_bytes(model), "int8_bytes": model_size_bytes(int8_model)}
    print(markdown_table(rows))
    print(f"\nsize: float {sizes['float_bytes'] / 1024:.0f} KB, int8 {sizes['int8_bytes'] / 1024:.0f} KB "
          f"({sizes['int8_bytes'] / sizes['float_bytes']:.3f}x); top-1 agreement float vs int8 on 1000 test "
          f"images: {100 * agreement:.1f}%")
    write_json(args.json, {"rows": rows, "sizes": sizes, "top1_agreement": agreement,
                           "raw_seconds": {str(k): v for k, v in raw.items()}})


if __name__ == "__main__":
    main()
