"""QAT training step cost: jaxquant QAT vs JAX float, and vs PyTorch eager QAT on the same model.

FashionCNN (Conv-BN-ReLU-pool x2, Linear-ReLU, Dropout, Linear) and its PyTorch twin, one AdamW step on
the same batch (cross-entropy). QAT = fuse Conv-BN-ReLU keeping BatchNorm in the loop, then
``prepare_qat`` with the x86 QAT qconfig (per-channel weight fake quant, 7-bit-range activations), in
both libraries. The four steps are timed interleaved in one process (medians over rounds, paired
ratios per round, see timing.py); prints a markdown table and writes JSON.

    python benchmarks/bench_qat.py [--quick] [--batch 128] [--json results/bench_qat.json]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from jaxquant.fusion import fuse_modules_qat  # noqa: E402
from jaxquant.models.fashion_cnn import FashionCNN, fusion_patterns  # noqa: E402
from jaxquant.qconfig import get_default_qat_qconfig  # noqa: E402
from jaxquant.transforms.prepare_qat import prepare_qat  # noqa: E402
from timing import import_torch, markdown_table, median_ms, paired_ratio, time_interleaved, write_json  # noqa: E402

torch = import_torch(threads=2)  # None without torch: its columns become n/a

LR = 1e-4


def jax_step(model: nnx.Module, x: jax.Array, y: jax.Array):
    """A zero-argument callable running one jitted AdamW step of ``model`` on ``(x, y)``; returns the loss."""
    model.train()
    opt = nnx.Optimizer(model, optax.adamw(LR), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, x, y):
        def loss_fn(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    return lambda: step(model, opt, x, y)


def torch_net(width: int = 32):
    """PyTorch twin of FashionCNN (NCHW), with stubs so eager-mode QAT applies."""
    nn, tq = torch.nn, torch.ao.quantization

    class Block(nn.Module):
        def __init__(self, cin, cout):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)
            self.relu, self.pool = nn.ReLU(), nn.MaxPool2d(2)

        def forward(self, x):
            return self.pool(self.relu(self.bn(self.conv(x))))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
            self.block1, self.block2 = Block(1, width), Block(width, 2 * width)
            self.fc1, self.relu = nn.Linear(7 * 7 * 2 * width, 128), nn.ReLU()
            self.dropout, self.fc2 = nn.Dropout(0.2), nn.Linear(128, 10)

        def forward(self, x):
            x = self.block2(self.block1(self.quant(x)))
            x = self.dropout(self.relu(self.fc1(torch.flatten(x, 1))))
            return self.dequant(self.fc2(x))

    return Net()


def torch_step(net, x, y):
    """A zero-argument callable running one eager AdamW step of ``net`` on ``(x, y)``."""
    net.train()
    opt = torch.optim.AdamW(net.parameters(), LR)

    def run():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        return loss
    return run


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="few rounds (smoke run)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 21, quick 5)")
    ap.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                   "bench_qat.json"))
    args = ap.parse_args(argv)
    repeats = args.repeats or (5 if args.quick else 21)
    rng = np.random.default_rng(0)
    x_np = rng.normal(size=(args.batch, 28, 28, 1)).astype(np.float32)
    y_np = rng.integers(0, 10, args.batch)
    x, y = jnp.asarray(x_np), jnp.asarray(y_np, jnp.int32)

    qconfig = get_default_qat_qconfig("x86")
    float_model = FashionCNN(rngs=nnx.Rngs(0))
    qat_model = fuse_modules_qat(FashionCNN(rngs=nnx.Rngs(0)), fusion_patterns(float_model))
    qat_model.train()
    qat_model = prepare_qat(qat_model, qconfig)
    fns = {"jax_float": jax_step(float_model, x, y), "jaxquant_qat": jax_step(qat_model, x, y)}
    if torch is not None:
        tq = torch.ao.quantization
        torch.manual_seed(0)
        xt, yt = torch.from_numpy(x_np).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(y_np)
        tqat = torch_net().train()
        tqat.qconfig = tq.get_default_qat_qconfig("x86")
        tqat = tq.fuse_modules_qat(tqat, [["block1.conv", "block1.bn", "block1.relu"],
                                          ["block2.conv", "block2.bn", "block2.relu"], ["fc1", "relu"]])
        tq.prepare_qat(tqat, inplace=True)
        fns["torch_float"] = torch_step(torch_net(), xt, yt)
        fns["torch_qat"] = torch_step(tqat, xt, yt)
    times = time_interleaved(fns, repeats=repeats, warmup=3)

    nan = float("nan")
    has_torch = "torch_qat" in times
    row = {
        "batch": args.batch,
        **{f"{k} ms": median_ms(v) for k, v in times.items()},
        "jaxquant QAT / JAX float": paired_ratio(times, "jaxquant_qat", "jax_float"),
        "torch QAT / torch float": paired_ratio(times, "torch_qat", "torch_float") if has_torch else nan,
        "jaxquant QAT / torch QAT": paired_ratio(times, "jaxquant_qat", "torch_qat") if has_torch else nan,
    }
    print(f"\nFashionCNN training step (forward, backward, AdamW), batch {args.batch}, median of {repeats} "
          f"interleaved rounds, ms; ratios are per-round time ratios (lower is faster for the numerator)\n")
    print(markdown_table([row]))
    write_json(args.json, [row], raw_seconds=times, load_average=os.getloadavg(),
               jax_backend=jax.default_backend(), repeats=repeats)
    return [row]


if __name__ == "__main__":
    main()
