"""add_quant_dequant: QuantWrapper around every leaf with a qconfig, as torch.ao.quantization does."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxquant as jq
import jaxquant.nn as jqnn
import jaxquant.nn.quantized as jqq
from jaxquant.transforms.stubs import add_quant_dequant
from testkit.small_models import minmax_qconfig as _qconfig


class Net(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(6, 12, rngs=rngs)
        self.relu = jqnn.ReLU()
        self.block = nnx.Sequential(nnx.Linear(12, 12, rngs=rngs), jqnn.ReLU())
        self.head = nnx.Linear(12, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(self.block(self.relu(self.fc1(x))))


def _wrapped_paths(model):
    return sorted(p for p, m in jq.named_modules(model) if isinstance(m, jqnn.QuantWrapper))


def test_wraps_every_leaf_with_a_qconfig_and_leaves_the_input_alone():
    model = Net(nnx.Rngs(0))
    model.head.qconfig = None  # stays float, as in PyTorch
    wrapped = add_quant_dequant(model, _qconfig())
    assert _wrapped_paths(wrapped) == ["block.layers.0", "block.layers.1", "fc1", "relu"]
    assert isinstance(wrapped.head, nnx.Linear)
    assert isinstance(model.fc1, nnx.Linear), "inplace=False must not touch the input model"
    # the wrapper carries the module's qconfig to its stubs (what prepare will read)
    assert wrapped.fc1.quant.qconfig is not None and wrapped.fc1.dequant.qconfig is not None
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(wrapped(x)), np.asarray(model(x)))


def test_inplace_and_attribute_only_qconfig():
    model = Net(nnx.Rngs(0))
    model.block.qconfig = _qconfig()  # no mapping: only the attribute counts
    out = add_quant_dequant(model, inplace=True)
    assert out is model
    assert _wrapped_paths(model) == ["block.layers.0", "block.layers.1"]


def test_same_modules_wrapped_as_pytorch():
    torch = pytest.importorskip("torch")
    tq = torch.ao.quantization

    class TorchNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = torch.nn.Linear(6, 12)
            self.relu = torch.nn.ReLU()
            self.block = torch.nn.Sequential(torch.nn.Linear(12, 12), torch.nn.ReLU())
            self.head = torch.nn.Linear(12, 3)

    tm = TorchNet()
    tm.qconfig = tq.default_qconfig
    tm.head.qconfig = None
    tq.propagate_qconfig_(tm)
    tq.add_quant_dequant(tm)
    theirs = sorted(n.replace("block.", "block.layers.") for n, m in tm.named_modules()
                    if isinstance(m, tq.QuantWrapper))
    model = Net(nnx.Rngs(0))
    model.head.qconfig = None
    assert _wrapped_paths(add_quant_dequant(model, _qconfig())) == theirs


def test_wrapped_model_prepares_calibrates_and_converts_layer_by_layer():
    model = Net(nnx.Rngs(1))
    model.head.qconfig = None
    rng = np.random.default_rng(1)
    data = [jnp.asarray(rng.normal(size=(16, 6)).astype(np.float32)) for _ in range(3)]
    prepared = jq.prepare(add_quant_dequant(model, _qconfig()), _qconfig())
    jq.calibrate(prepared, data, progress=False)
    converted = jq.convert(prepared)
    assert isinstance(converted.fc1.quant, jqq.Quantize) and isinstance(converted.fc1.module, jqq.Linear)
    assert isinstance(converted.fc1.dequant, jqq.DeQuantize)
    assert isinstance(converted.head, nnx.Linear)
    y = np.asarray(nnx.jit(lambda m, v: m(v))(converted, data[0]))
    ref = np.asarray(model(data[0]))
    assert y.dtype == np.float32
    # Three int8 layers with 7-bit activations: a few percent of the output range, not exact.
    assert np.max(np.abs(y - ref)) < 0.05 * np.ptp(ref), (np.max(np.abs(y - ref)), np.ptp(ref))
    assert not np.array_equal(y, ref), "the converted model must actually quantize"


def test_leaf_root_is_returned_wrapped():
    layer = nnx.Linear(4, 2, rngs=nnx.Rngs(0))
    wrapped = add_quant_dequant(layer, _qconfig())
    assert isinstance(wrapped, jqnn.QuantWrapper) and isinstance(wrapped.module, nnx.Linear)
    with pytest.raises(ValueError, match="inplace"):
        add_quant_dequant(layer, _qconfig(), inplace=True)
