"""prepare / calibrate / convert on models holding every supported static module type, against
PyTorch eager-mode quantization of twin models with the same float weights and calibration data."""
import functools

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")

import jaxquant as jq  # noqa: E402
import jaxquant.nn as jqnn  # noqa: E402
import jaxquant.nn.quantized as jqq  # noqa: E402
from jaxquant.qtensor import QTensor  # noqa: E402

tnn = torch.nn
tq = torch.ao.quantization


pytestmark = pytest.mark.usefixtures("x86_engine")  # tests/quantized/conftest.py


# ---------------------------------------------------------------- twin models

class JaxEverything(nnx.Module):
    """Conv+BN+ReLU, Conv, Hardswish, residual FloatFunctional add, BatchNorm, LeakyReLU, GroupNorm,
    ELU, ConvTranspose, max/adaptive-avg pooling, Linear+ReLU, LayerNorm, Linear."""

    def __init__(self, rngs):
        self.quant = jqnn.QuantStub()
        self.conv1 = nnx.Conv(3, 8, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs)
        self.bn1 = nnx.BatchNorm(8, use_running_average=True, epsilon=1e-5, rngs=rngs)
        self.relu1 = jqnn.ReLU()
        self.conv2 = nnx.Conv(8, 8, (3, 3), padding=((1, 1), (1, 1)), feature_group_count=2, rngs=rngs)
        self.hswish = jqnn.Hardswish()
        self.skip = jqnn.FloatFunctional()
        self.bn2 = nnx.BatchNorm(8, use_running_average=True, epsilon=1e-5, rngs=rngs)
        self.leaky = jqnn.LeakyReLU(0.1)
        self.gn = nnx.GroupNorm(8, num_groups=2, epsilon=1e-5, rngs=rngs)
        self.elu = jqnn.ELU(1.0)
        # torch ConvTranspose2d(8, 4, 3, stride=2, padding=1, output_padding=1): see _copy_weights.
        self.deconv = nnx.ConvTranspose(8, 4, (3, 3), strides=(2, 2), padding=((1, 2), (1, 2)), rngs=rngs)
        self.pool = jqnn.MaxPool2d(2)
        self.gap = jqnn.AdaptiveAvgPool2d(1)
        self.flatten = jqnn.Flatten()
        self.fc1 = nnx.Linear(4, 16, rngs=rngs)
        self.relu2 = jqnn.ReLU()
        self.ln = nnx.LayerNorm(16, epsilon=1e-5, rngs=rngs)
        self.fc2 = nnx.Linear(16, 5, rngs=rngs)
        self.dequant = jqnn.DeQuantStub()

    def __call__(self, x):
        a = self.relu1(self.bn1(self.conv1(self.quant(x))))
        b = self.hswish(self.conv2(a))
        c = self.elu(self.gn(self.leaky(self.bn2(self.skip.add(a, b)))))
        d = self.gap(self.pool(self.deconv(c)))
        return self.dequant(self.fc2(self.ln(self.relu2(self.fc1(self.flatten(d))))))


class TorchEverything(tnn.Module):
    def __init__(self):
        super().__init__()
        self.quant = tq.QuantStub()
        self.conv1 = tnn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = tnn.BatchNorm2d(8)
        self.relu1 = tnn.ReLU()
        self.conv2 = tnn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.hswish = tnn.Hardswish()
        self.skip = torch.ao.nn.quantized.FloatFunctional()
        self.bn2 = tnn.BatchNorm2d(8)
        self.leaky = tnn.LeakyReLU(0.1)
        self.gn = tnn.GroupNorm(2, 8)
        self.elu = tnn.ELU(1.0)
        self.deconv = tnn.ConvTranspose2d(8, 4, 3, stride=2, padding=1, output_padding=1)
        self.pool = tnn.MaxPool2d(2)
        self.gap = tnn.AdaptiveAvgPool2d(1)
        self.flatten = tnn.Flatten()
        self.fc1 = tnn.Linear(4, 16)
        self.relu2 = tnn.ReLU()
        self.ln = tnn.LayerNorm(16)
        self.fc2 = tnn.Linear(16, 5)
        self.dequant = tq.DeQuantStub()

    def forward(self, x):
        a = self.relu1(self.bn1(self.conv1(self.quant(x))))
        b = self.hswish(self.conv2(a))
        c = self.elu(self.gn(self.leaky(self.bn2(self.skip.add(a, b)))))
        d = self.gap(self.pool(self.deconv(c)))
        return self.dequant(self.fc2(self.ln(self.relu2(self.fc1(self.flatten(d))))))


class JaxConv1d(nnx.Module):
    def __init__(self, rngs):
        self.quant = jqnn.QuantStub()
        self.conv1 = nnx.Conv(3, 6, (3,), padding=((1, 1),), rngs=rngs)
        self.relu1 = jqnn.ReLU()
        self.conv2 = nnx.Conv(6, 6, (3,), strides=(2,), padding=((1, 1),), feature_group_count=6, rngs=rngs)
        self.dequant = jqnn.DeQuantStub()

    def __call__(self, x):
        return self.dequant(self.conv2(self.relu1(self.conv1(self.quant(x)))))


class TorchConv1d(tnn.Module):
    def __init__(self):
        super().__init__()
        self.quant = tq.QuantStub()
        self.conv1 = tnn.Conv1d(3, 6, 3, padding=1)
        self.relu1 = tnn.ReLU()
        self.conv2 = tnn.Conv1d(6, 6, 3, stride=2, padding=1, groups=6)
        self.dequant = tq.DeQuantStub()

    def forward(self, x):
        return self.dequant(self.conv2(self.relu1(self.conv1(self.quant(x)))))


class JaxConv3d(nnx.Module):
    def __init__(self, rngs):
        self.quant = jqnn.QuantStub()
        self.conv1 = nnx.Conv(2, 4, (3, 3, 3), padding=((1, 1),) * 3, rngs=rngs)
        self.bn1 = nnx.BatchNorm(4, use_running_average=True, epsilon=1e-5, rngs=rngs)
        self.relu1 = jqnn.ReLU()
        self.conv2 = nnx.Conv(4, 4, (2, 2, 2), strides=(2, 2, 2), padding="VALID", rngs=rngs)
        self.dequant = jqnn.DeQuantStub()

    def __call__(self, x):
        return self.dequant(self.conv2(self.relu1(self.bn1(self.conv1(self.quant(x))))))


class TorchConv3d(tnn.Module):
    def __init__(self):
        super().__init__()
        self.quant = tq.QuantStub()
        self.conv1 = tnn.Conv3d(2, 4, 3, padding=1)
        self.bn1 = tnn.BatchNorm3d(4)
        self.relu1 = tnn.ReLU()
        self.conv2 = tnn.Conv3d(4, 4, 2, stride=2)
        self.dequant = tq.DeQuantStub()

    def forward(self, x):
        return self.dequant(self.conv2(self.relu1(self.bn1(self.conv1(self.quant(x))))))


# ---------------------------------------------------------------- weight copying

def _j(t):
    return jnp.asarray(t.detach().numpy())


def _copy_weights(jm, tm, rng):
    """Randomise the torch model's parameters and BN statistics, then copy them into the jax twin."""
    with torch.no_grad():
        for name, t in tm.named_modules():
            if not name:
                continue
            mine = getattr(jm, name, None)
            if isinstance(t, (tnn.BatchNorm2d, tnn.BatchNorm3d, tnn.GroupNorm, tnn.LayerNorm)):
                t.weight.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, t.weight.shape).astype(np.float32)))
                t.bias.copy_(torch.from_numpy(rng.normal(0, 0.2, t.bias.shape).astype(np.float32)))
                mine.scale.set_value(_j(t.weight))
                mine.bias.set_value(_j(t.bias))
                if isinstance(t, (tnn.BatchNorm2d, tnn.BatchNorm3d)):
                    t.running_mean.copy_(torch.from_numpy(rng.normal(0, 0.2, t.running_mean.shape).astype(np.float32)))
                    t.running_var.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, t.running_var.shape).astype(np.float32)))
                    mine.mean.set_value(_j(t.running_mean))
                    mine.var.set_value(_j(t.running_var))
            elif isinstance(t, (tnn.Conv1d, tnn.Conv2d, tnn.Conv3d)):
                nd = t.weight.ndim - 2
                mine.kernel.set_value(_j(t.weight.permute(*range(2, nd + 2), 1, 0)))
                mine.bias.set_value(_j(t.bias))
            elif isinstance(t, tnn.ConvTranspose2d):
                # flax (transpose_kernel=False) runs a plain conv over the stride-dilated input: the torch
                # kernel flipped spatially, as (k, k, in, out), with padding (k-1-p, k-1-p+output_padding).
                mine.kernel.set_value(_j(t.weight.flip(2, 3).permute(2, 3, 0, 1)))
                mine.bias.set_value(_j(t.bias))
            elif isinstance(t, tnn.Linear):
                mine.kernel.set_value(_j(t.weight.T))
                mine.bias.set_value(_j(t.bias))


def _per_tensor_qconfigs():
    ours = jq.QConfig(activation=jq.MinMaxObserver.with_args(reduce_range=True),
                      weight=jq.MinMaxObserver.with_args(dtype=jq.qint8, qscheme=jq.per_tensor_symmetric))
    # PyTorch rejects per-channel weight observers for ConvTranspose, so this model is per tensor.
    theirs = tq.QConfig(activation=tq.MinMaxObserver.with_args(reduce_range=True),
                        weight=tq.MinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric))
    return ours, theirs


def _per_channel_qconfigs():
    # MinMax activations rather than x86's default HistogramObserver: same per-channel weights, and the
    # histogram path (much slower to convert) is covered by tests/transforms/test_static_ptq_parity.py.
    ours = jq.QConfig(activation=jq.MinMaxObserver.with_args(reduce_range=True),
                      weight=jq.default_per_channel_weight_observer)
    theirs = tq.QConfig(activation=tq.MinMaxObserver.with_args(reduce_range=True),
                        weight=tq.default_per_channel_weight_observer)
    return ours, theirs


MODELS = {
    # name: (jax class, torch class, input shape (ours, channels last), fuse groups, qconfigs)
    "everything_2d": (JaxEverything, TorchEverything, (4, 8, 8, 3), [["conv1", "bn1", "relu1"], ["fc1", "relu2"]],
                      _per_tensor_qconfigs),
    "conv1d": (JaxConv1d, TorchConv1d, (4, 16, 3), [["conv1", "relu1"]],
               _per_channel_qconfigs),
    "conv3d": (JaxConv3d, TorchConv3d, (2, 6, 6, 6, 2), [["conv1", "bn1", "relu1"]],
               _per_channel_qconfigs),
}


@functools.lru_cache(maxsize=None)
def _convert_both(name, seed=0):
    """(converted jax model, converted torch model, test input (ours), torch output, axes to torch)."""
    jax_cls, torch_cls, shape, fuse, qconfigs = MODELS[name]
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    tm, jm = torch_cls().eval(), jax_cls(nnx.Rngs(seed))
    _copy_weights(jm, tm, rng)
    jm.eval()
    calib = [rng.normal(0.1, 1.0, shape).astype(np.float32) for _ in range(3)]
    test_x = rng.normal(0.1, 1.0, shape).astype(np.float32)
    to_torch = (0, len(shape) - 1, *range(1, len(shape) - 1))

    # The float twins agree before any quantization (checks the weight copy and layouts).
    with torch.no_grad():
        float_theirs = tm(torch.from_numpy(test_x.transpose(to_torch).copy())).numpy()
    float_ours = np.asarray(nnx.jit(lambda m, v: m(v))(jm, jnp.asarray(test_x)))
    if float_ours.ndim > 2:
        float_ours = float_ours.transpose(to_torch)
    np.testing.assert_allclose(float_ours, float_theirs, rtol=1e-4, atol=1e-4)

    jax_qconfig, torch_qconfig = qconfigs()
    prepared = jq.prepare(jq.fuse_modules(jm, fuse), jax_qconfig)
    jq.calibrate(prepared, [jnp.asarray(c) for c in calib], progress=False)
    converted = jq.convert(prepared)

    tm.qconfig = torch_qconfig
    tprep = tq.prepare(tq.fuse_modules(tm, fuse))
    with torch.no_grad():
        for c in calib:
            tprep(torch.from_numpy(c.transpose(to_torch).copy()))
    tconv = tq.convert(tprep)
    with torch.no_grad():
        theirs = tconv(torch.from_numpy(test_x.transpose(to_torch).copy())).numpy()
    return converted, tconv, test_x, theirs, to_torch


def _output_step(tconv):
    last = [m for m in tconv.modules() if hasattr(m, "scale") and not isinstance(m, tq.DeQuantStub)][-1]
    return float(last.scale)


# Each model costs ~5-10 s of CPU (two frameworks' prepare/calibrate/convert plus XLA compiles).
@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_converted_model_matches_pytorch_eager(name):
    converted, tconv, test_x, theirs, to_torch = _convert_both(name)
    ours = np.asarray(nnx.jit(lambda m, x: m(x))(converted, jnp.asarray(test_x)))
    if ours.ndim > 2:
        ours = ours.transpose(to_torch)
    assert ours.shape == theirs.shape
    step = _output_step(tconv)
    close = np.abs(ours - theirs) <= step * 1.0001
    assert close.mean() >= 0.99, (name, float(close.mean()), float(np.abs(ours - theirs).max()), step)
    assert np.std(theirs) > 2 * step, "reference output is nearly constant: the test would prove nothing"


@pytest.mark.slow
def test_everything_model_converts_to_the_expected_modules_and_jits():
    converted, _, test_x, _, _ = _convert_both("everything_2d")
    expected = {"quant": jqq.Quantize, "conv1": jqq.Conv, "conv2": jqq.Conv, "hswish": jqq.Hardswish,
                "skip": jqq.QFunctional, "bn2": jqq.BatchNorm, "leaky": jqq.LeakyReLU, "gn": jqq.GroupNorm,
                "elu": jqq.ELU, "deconv": jqq.ConvTranspose, "fc1": jqq.Linear, "ln": jqq.LayerNorm,
                "fc2": jqq.Linear, "dequant": jqq.DeQuantize}
    for path, cls in expected.items():
        assert type(getattr(converted, path)) is cls, (path, type(getattr(converted, path)))
    assert converted.conv1.relu and converted.fc1.relu and not converted.conv2.relu
    # No float weight survives in the int8 layers.
    assert not any(True for _ in nnx.state(converted.conv1, nnx.Param).flat_state())

    traces = []

    def run(m, x):
        traces.append(1)
        return m(x)

    jitted = nnx.jit(run)
    x = jnp.asarray(test_x)
    y1 = jitted(converted, x)
    y2 = jitted(converted, x + 0.5)
    assert len(traces) == 1, "a converted model must not retrace for a same-shaped input"
    assert y1.dtype == jnp.float32 and not np.array_equal(np.asarray(y1), np.asarray(y2))
    # Inside the model activations flow as QTensors.
    inner = nnx.jit(lambda m, v: m.conv2(m.conv1(m.quant(v))))(converted, x)
    assert isinstance(inner, QTensor) and inner.int_repr().dtype == jnp.uint8
