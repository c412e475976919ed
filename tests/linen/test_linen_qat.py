"""QAT of Linen models: the same fake-quant forward and the same int8 model after convert as NNX's
prepare_qat / convert of the same layers quantized one by one (QuantStub / layer / DeQuantStub)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxquant as jq
import jaxquant.linen as jql

from linen_models import PerLayer, batches, nnx_linear

QAT_QCONFIG = jq.QConfig(activation=jq.default_fake_quant, weight=jq.default_per_channel_weight_fake_quant)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(16)(x))
        return nn.Dense(5)(x)


class NnxMLP(nnx.Module):
    def __init__(self, p):
        self.l0 = PerLayer(nnx_linear(p["Dense_0"]["kernel"], p["Dense_0"]["bias"]))
        self.l1 = PerLayer(nnx_linear(p["Dense_1"]["kernel"], p["Dense_1"]["bias"]))

    def __call__(self, x):
        return self.l1(jax.nn.relu(self.l0(x)))


@pytest.mark.slow
def test_qat_forward_and_converted_int8_equal_nnx_qat():
    data = batches((8, 6), n=3)
    v = MLP().init(jax.random.key(0), data[0])
    qat = jql.prepare_qat(MLP(), QAT_QCONFIG)
    ref = jq.transforms.prepare_qat.prepare_qat(NnxMLP(v["params"]), QAT_QCONFIG)
    # op by op, as the NNX model runs here: a compiled step may round the moving averages differently
    step = lambda v, x: qat.apply(v, x, mutable=[jql.QUANT_STATS])  # noqa: E731
    for x in data[:2]:
        y, upd = step(v, x)
        v = {**v, **upd}
        np.testing.assert_array_equal(np.asarray(y), np.asarray(ref(x)))

    # one SGD step on the Linen side: the fake quants pass gradients straight through to every kernel
    def loss(params, stats, x):
        y, _ = qat.apply({"params": params, jql.QUANT_STATS: stats}, x, mutable=[jql.QUANT_STATS])
        return jnp.mean((y - 1.0) ** 2)

    grads = jax.grad(loss)(v["params"], v[jql.QUANT_STATS], data[2])
    for g in jax.tree.leaves(grads):
        assert np.all(np.isfinite(np.asarray(g))) and np.any(np.asarray(g) != 0)
    params = jax.tree.map(lambda p, g: p - 0.5 * g, v["params"], grads)
    v = {**v, "params": params}
    for name, wrapper in (("Dense_0", ref.l0), ("Dense_1", ref.l1)):
        wrapper.layer.linear.kernel.set_value(params[name]["kernel"])
        wrapper.layer.linear.bias.set_value(params[name]["bias"])
    y, upd = step(v, data[2])
    v = {**v, **upd}
    np.testing.assert_array_equal(np.asarray(y), np.asarray(ref(data[2])))

    qm, qv = jql.convert(qat, v, data[0])
    assert "params" not in qv and qv[jql.QUANT_PARAMS]["Dense_1"]["weight_int"].dtype == jnp.int8
    ref_q = jq.convert(ref)
    x = batches((8, 6), n=1, seed=7)[0]
    np.testing.assert_array_equal(np.asarray(jax.jit(qm.apply)(qv, x)), np.asarray(ref_q(x)))


class ConvNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), feature_group_count=1)(x))
        return nn.Conv(4, (3, 3), feature_group_count=2, strides=2)(x)


@pytest.mark.slow
def test_qat_conv_training_reduces_loss_and_converts():
    data = batches((4, 6, 6, 2), n=1)
    x = data[0]
    target = jnp.asarray(np.random.default_rng(3).normal(size=(4, 3, 3, 4)).astype(np.float32))
    v = ConvNet().init(jax.random.key(1), x)
    qat = jql.prepare_qat(ConvNet(), QAT_QCONFIG)

    @jax.jit
    def train_step(params, stats):
        def loss(p):
            y, upd = qat.apply({"params": p, jql.QUANT_STATS: stats}, x, mutable=[jql.QUANT_STATS])
            return jnp.mean((y - target) ** 2), upd[jql.QUANT_STATS]
        (l, stats), g = jax.value_and_grad(loss, has_aux=True)(params)
        return jax.tree.map(lambda p, g: p - 0.2 * g, params, g), stats, l

    _, stats0 = qat.apply(v, x, mutable=[jql.QUANT_STATS])
    params, stats = v["params"], stats0[jql.QUANT_STATS]
    losses = []
    for _ in range(15):
        params, stats, l = train_step(params, stats)
        losses.append(float(l))
    assert losses[-1] < 0.8 * losses[0]
    qm, qv = jql.convert(qat, {"params": params, jql.QUANT_STATS: stats}, x)
    y_int8 = np.asarray(jax.jit(qm.apply)(qv, x))
    y_fq = np.asarray(qat.apply({"params": params, jql.QUANT_STATS: stats}, x))
    # the int8 model computes what the fake-quant model simulated, to within an output step or two
    out_scale = float(qv[jql.QUANT_PARAMS]["Conv_1"]["output_scale"])
    assert np.abs(y_int8 - y_fq).max() <= 2.01 * out_scale


def test_qat_with_observer_qconfig_is_refused_naming_the_path():
    x = batches((2, 6), n=1)[0]
    v = MLP().init(jax.random.key(0), x)
    qat = jql.prepare_qat(MLP(), jq.default_qconfig)
    with pytest.raises(ValueError, match="'Dense_0'.*fake"):
        qat.apply(v, x, mutable=[jql.QUANT_STATS])
