"""QAT train step vs float train step (JAX) vs PyTorch eager QAT step, FashionCNN, batch 128.

Medians over interleaved repeats in one process; prints a markdown table and writes results/qat.json.

    python benchmarks/bench_qat.py [--repeats 20] [--batch 128]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxquant.fusion import fuse_modules_qat
from jaxquant.models.fashion_cnn import FashionCNN, fusion_patterns
from jaxquant.qconfig import get_default_qat_qconfig
from jaxquant.transforms.prepare_qat import prepare_qat


def jax_step_fn(model):
    opt = nnx.Optimizer(model, optax.adamw(1e-4), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, x, y):
        loss, grads = nnx.value_and_grad(
            lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean())(model)
        opt.update(model, grads)
        return loss

    def run(x, y):
        step(model, opt, x, y).block_until_ready()
    return run


def torch_step_fn(batch, width=32):
    import torch
    tq = torch.ao.quantization
    torch.set_num_threads(2)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            nn = torch.nn
            self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
            self.c1, self.b1, self.r1 = nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
            self.c2, self.b2, self.r2 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU()
            self.pool = nn.MaxPool2d(2)
            self.fc1, self.r3, self.fc2 = nn.Linear(7 * 7 * 2 * width, 128), nn.ReLU(), nn.Linear(128, 10)

        def forward(self, x):
            x = self.quant(x)
            x = self.pool(self.r1(self.b1(self.c1(x))))
            x = self.pool(self.r2(self.b2(self.c2(x))))
            return self.dequant(self.fc2(self.r3(self.fc1(torch.flatten(x, 1)))))

    net = Net().train()
    net.qconfig = tq.get_default_qat_qconfig("x86")
    net = tq.fuse_modules_qat(net, [["c1", "b1", "r1"], ["c2", "b2", "r2"], ["fc1", "r3"]])
    tq.prepare_qat(net, inplace=True)
    opt = torch.optim.AdamW(net.parameters(), 1e-4)
    x = torch.randn(batch, 1, 28, 28)
    y = torch.randint(0, 10, (batch,))

    def run(*_):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return run


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "qat.json"))
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(args.batch, 28, 28, 1)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, args.batch))
    float_model = FashionCNN(rngs=nnx.Rngs(0))
    float_model.train()
    qat_model = fuse_modules_qat(FashionCNN(rngs=nnx.Rngs(0)), fusion_patterns(float_model))
    qat_model.train()
    qat_model = prepare_qat(qat_model, get_default_qat_qconfig("x86"))
    runs = {"JAX float": jax_step_fn(float_model), "JAX QAT": jax_step_fn(qat_model)}
    try:
        runs["PyTorch QAT (eager)"] = torch_step_fn(args.batch)
    except ImportError:
        pass
    for fn in runs.values():  # compile / warm up
        fn(x, y), fn(x, y)
    times = {k: [] for k in runs}
    for _ in range(args.repeats):  # interleaved
        for k, fn in runs.items():
            t = time.perf_counter()
            fn(x, y)
            times[k].append(time.perf_counter() - t)
    med = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
    base = med["JAX float"]
    print(f"\nFashionCNN train step, batch {args.batch}, median of {args.repeats} (ms)\n")
    print("| step | median ms | vs JAX float |\n|---|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v:.1f} | {v / base:.2f}x |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"batch": args.batch, "repeats": args.repeats, "median_ms": med,
                                          "jax_backend": jax.default_backend()}, indent=2))
    return med


if __name__ == "__main__":
    main()
