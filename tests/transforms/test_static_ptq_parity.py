"""Static PTQ end to end against PyTorch eager mode on the same float weights and calibration data."""
import numpy as np
import pytest
from flax import nnx
import jax.numpy as jnp

import jaxquant as jq
import jaxquant.nn as jqnn

torch = pytest.importorskip("torch")
tnn = torch.nn


class JaxNet(nnx.Module):
    def __init__(self, rngs):
        self.quant = jqnn.QuantStub()
        self.conv1 = nnx.Conv(3, 8, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs)
        self.bn1 = nnx.BatchNorm(8, epsilon=1e-5, rngs=rngs)
        self.relu1 = jqnn.ReLU()
        self.conv2 = nnx.Conv(8, 8, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), feature_group_count=8, rngs=rngs)
        self.relu2 = jqnn.ReLU()
        self.pool = jqnn.AdaptiveAvgPool2d(1)
        self.flatten = jqnn.Flatten()
        self.fc = nnx.Linear(8, 5, rngs=rngs)
        self.dequant = jqnn.DeQuantStub()

    def __call__(self, x):
        x = self.quant(x)
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.conv2(x))
        return self.dequant(self.fc(self.flatten(self.pool(x))))


class TorchNet(tnn.Module):
    def __init__(self):
        super().__init__()
        self.quant = torch.ao.quantization.QuantStub()
        self.conv1 = tnn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = tnn.BatchNorm2d(8)
        self.relu1 = tnn.ReLU()
        self.conv2 = tnn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)
        self.relu2 = tnn.ReLU()
        self.pool = tnn.AdaptiveAvgPool2d(1)
        self.flatten = tnn.Flatten()
        self.fc = tnn.Linear(8, 5)
        self.dequant = torch.ao.quantization.DeQuantStub()

    def forward(self, x):
        x = self.quant(x)
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.conv2(x))
        return self.dequant(self.fc(self.flatten(self.pool(x))))


def _twins(seed=0):
    rng = np.random.default_rng(seed)
    jm = JaxNet(nnx.Rngs(seed))
    tm = TorchNet()
    with torch.no_grad():
        for name in ("conv1", "conv2"):
            w = rng.normal(0, 0.4, getattr(tm, name).weight.shape).astype(np.float32)
            b = rng.normal(0, 0.1, (8,)).astype(np.float32)
            getattr(tm, name).weight.copy_(torch.tensor(w))
            getattr(tm, name).bias.copy_(torch.tensor(b))
            getattr(jm, name).kernel.set_value(jnp.asarray(w.transpose(2, 3, 1, 0)))
            getattr(jm, name).bias.set_value(jnp.asarray(b))
        stats = {k: rng.uniform(0.5, 1.5, 8).astype(np.float32) for k in ("weight", "running_var")}
        stats.update({k: rng.normal(0, 0.2, 8).astype(np.float32) for k in ("bias", "running_mean")})
        for k, v in stats.items():
            getattr(tm.bn1, k).copy_(torch.tensor(v))
        jm.bn1.scale.set_value(jnp.asarray(stats["weight"]))
        jm.bn1.bias.set_value(jnp.asarray(stats["bias"]))
        jm.bn1.mean.set_value(jnp.asarray(stats["running_mean"]))
        jm.bn1.var.set_value(jnp.asarray(stats["running_var"]))
        w = rng.normal(0, 0.5, (5, 8)).astype(np.float32)
        b = rng.normal(0, 0.1, (5,)).astype(np.float32)
        tm.fc.weight.copy_(torch.tensor(w))
        tm.fc.bias.copy_(torch.tensor(b))
        jm.fc.kernel.set_value(jnp.asarray(w.T))
        jm.fc.bias.set_value(jnp.asarray(b))
    jm.eval()
    tm.eval()
    return jm, tm


FUSE = [["conv1", "bn1", "relu1"], ["conv2", "relu2"]]


def _run_both(jax_qconfig, torch_qconfig, seed=0):
    torch.backends.quantized.engine = "x86"
    jm, tm = _twins(seed)
    rng = np.random.default_rng(seed + 1)
    calib = [rng.normal(0.2, 1.0, (4, 12, 12, 3)).astype(np.float32) for _ in range(3)]
    test_x = rng.normal(0.2, 1.0, (16, 12, 12, 3)).astype(np.float32)

    fused = jq.fuse_modules(jm, FUSE)
    prepared = jq.prepare(fused, jax_qconfig)
    jq.calibrate(prepared, [jnp.asarray(c) for c in calib], progress=False)
    converted = jq.convert(prepared)
    ours = np.asarray(nnx.jit(lambda m, x: m(x))(converted, jnp.asarray(test_x)))

    tm.qconfig = torch_qconfig
    tfused = torch.ao.quantization.fuse_modules(tm, FUSE)
    tprep = torch.ao.quantization.prepare(tfused)
    with torch.no_grad():
        for c in calib:
            tprep(torch.tensor(c).permute(0, 3, 1, 2))
    tconv = torch.ao.quantization.convert(tprep)
    with torch.no_grad():
        theirs = tconv(torch.tensor(test_x).permute(0, 3, 1, 2)).numpy()
    return converted, tconv, ours, theirs


QCONFIGS = {
    "x86_default": (lambda: jq.get_default_qconfig("x86"),
                    lambda: torch.ao.quantization.get_default_qconfig("x86")),
    "minmax_per_tensor": (
        lambda: jq.QConfig(activation=jq.MinMaxObserver.with_args(reduce_range=True),
                           weight=jq.MinMaxObserver.with_args(dtype=jq.qint8, qscheme=jq.per_tensor_symmetric)),
        lambda: torch.ao.quantization.QConfig(
            activation=torch.ao.quantization.MinMaxObserver.with_args(reduce_range=True),
            weight=torch.ao.quantization.MinMaxObserver.with_args(dtype=torch.qint8,
                                                                  qscheme=torch.per_tensor_symmetric))),
}


@pytest.mark.parametrize("name", sorted(QCONFIGS))
def test_static_ptq_matches_pytorch(name):
    make_jax, make_torch = QCONFIGS[name]
    converted, tconv, ours, theirs = _run_both(make_jax(), make_torch())

    # Activation qparams: bit-identical where both frameworks observe identical data (the input);
    # deeper layers observe float conv/linear outputs, which XLA and PyTorch round differently in the
    # last bit, so their min/max (and so the scale) may differ by a few ulps.
    assert np.float32(converted.quant.scale.get_value()) == np.float32(tconv.quant.scale)
    assert int(converted.quant.zero_point.get_value()) == int(tconv.quant.zero_point)
    for mine, ref in [(converted.conv1, tconv.conv1), (converted.conv2, tconv.conv2), (converted.fc, tconv.fc)]:
        scale, zp = float(mine.out_scale.get_value()), int(mine.out_zero_point.get_value())
        np.testing.assert_allclose(scale, float(ref.scale), rtol=1e-5, err_msg=mine.name)
        assert abs(zp - int(ref.zero_point)) <= 1, (mine.name, zp, int(ref.zero_point))

    # int8 weights identical (torch conv weight is (out, in/g, kh, kw); ours (kh, kw, in/g, out)).
    for mine, ref in [(converted.conv1, tconv.conv1), (converted.conv2, tconv.conv2)]:
        w = np.asarray(mine.weight().int_repr()).transpose(3, 2, 0, 1)
        np.testing.assert_array_equal(w, ref.weight().int_repr().numpy())
    np.testing.assert_array_equal(np.asarray(converted.fc.weight().int_repr()).T,
                                  tconv.fc.weight().int_repr().numpy())

    # Outputs: within one output quantization step on >= 99% of elements.
    step = float(tconv.fc.scale)
    close = np.abs(ours - theirs) <= step * 1.0001
    assert close.mean() >= 0.99, (np.abs(ours - theirs).max(), step)
