"""prepare_qat -> training -> convert, against PyTorch's eager QAT flow; switches; traces; errors."""
import numpy as np
import optax
import pytest
import jax
import jax.numpy as jnp
from flax import nnx

from jaxquant.fusion import fuse_modules_qat
from jaxquant.nn import qat as nnqat
from jaxquant.nn.observed import Observed
from jaxquant.nn.qat import FakeQuantModule
from jaxquant.nn.variables import QuantStats
from jaxquant.qconfig import QConfig, get_default_qat_qconfig
from jaxquant.transforms import convert
from jaxquant.transforms.prepare_qat import (
    check_qat_state, disable_fake_quant, disable_observer, enable_fake_quant,
    enable_param_learning, freeze_bn_stats, prepare_qat, quantize_qat,
)

from qat_small_net import C_IN, C_OUT, H, N_OUT, Net  # tests/qat is on sys.path (rootdir conftest layout)


def _qat_net(seed=0):
    model = fuse_modules_qat(Net(nnx.Rngs(seed)), [["conv", "bn", "relu"]])
    model.train()
    return prepare_qat(model, get_default_qat_qconfig("x86"))


def _batches(n, seed=0, batch=4):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(batch, H, H, C_IN)).astype(np.float32) for _ in range(n)]


def test_prepare_qat_structure():
    model = _qat_net()
    assert isinstance(model.conv, nnqat.ConvBnReLU)
    assert isinstance(model.fc, nnqat.Linear)
    assert isinstance(model.quant, Observed) and isinstance(model.quant.activation_post_process, FakeQuantModule)
    assert isinstance(model.dequant, Observed) and model.dequant.activation_post_process is None
    # the float Params are the trained ones; fake-quant/BN state is separate
    params = nnx.state(model, nnx.Param)
    assert set(params["conv"].keys()) == {"conv", "bn"}
    assert "stats" in nnx.state(model, QuantStats)["fc"]["weight_fake_quant"]


@pytest.mark.slow
def test_convert_matches_torch_eager_qat_flow():
    torch = pytest.importorskip("torch")
    tq = torch.ao.quantization
    torch.backends.quantized.engine = "x86"
    net = fuse_modules_qat(Net(nnx.Rngs(0)), [["conv", "bn", "relu"]])
    net.train()

    class TNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
            self.conv = torch.nn.Conv2d(C_IN, C_OUT, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(C_OUT, momentum=0.1)
            self.relu = torch.nn.ReLU()
            self.fc = torch.nn.Linear(H * H * C_OUT, N_OUT)

        def forward(self, x):
            x = self.relu(self.bn(self.conv(self.quant(x))))
            return self.dequant(self.fc(torch.flatten(x, 1)))

    tnet = TNet()
    k_fc = np.asarray(net.fc.kernel.get_value())
    with torch.no_grad():
        tnet.conv.weight.copy_(torch.tensor(np.transpose(np.asarray(net.conv.conv.kernel.get_value()), (3, 2, 0, 1))))
        tnet.conv.bias.copy_(torch.tensor(np.asarray(net.conv.conv.bias.get_value())))
        # NHWC flatten order (h, w, c) -> NCHW flatten order (c, h, w)
        tnet.fc.weight.copy_(torch.tensor(k_fc.reshape(H, H, C_OUT, N_OUT).transpose(3, 2, 0, 1).reshape(N_OUT, -1)))
        tnet.fc.bias.copy_(torch.tensor(np.asarray(net.fc.bias.get_value())))
    tnet.train()
    tnet.qconfig = tq.get_default_qat_qconfig("x86")
    tnet = tq.fuse_modules_qat(tnet, [["conv", "bn", "relu"]])
    tq.prepare_qat(tnet, inplace=True)
    qat = prepare_qat(net, get_default_qat_qconfig("x86"))
    step = nnx.jit(lambda m, x: m(x))
    for i, x in enumerate(_batches(4)):
        if i == 3:
            freeze_bn_stats(qat)
            tnet.apply(torch.ao.nn.intrinsic.qat.freeze_bn_stats)
        y = np.asarray(step(qat, jnp.asarray(x)))
        with torch.no_grad():
            yt = tnet(torch.tensor(x.transpose(0, 3, 1, 2).copy())).numpy()
        np.testing.assert_allclose(y, yt, atol=1e-4)
    tnet.eval()
    tq_model = tq.convert(tnet)
    qat.eval()
    q_model = convert(qat)
    # int8 weights (folded BN for the conv) and their scales
    qw = q_model.conv.weight()
    tw = tq_model.conv.weight()
    diff = np.abs(np.transpose(np.asarray(qw.int_data, np.int32), (3, 2, 0, 1)) - tw.int_repr().numpy().astype(np.int32))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.02
    np.testing.assert_allclose(np.asarray(qw.q_per_channel_scales()), tw.q_per_channel_scales().numpy(), rtol=1e-5)
    fw = np.asarray(q_model.fc.weight().int_data, np.int32)
    fw_t = tq_model.fc.weight().int_repr().numpy().astype(np.int32)
    fw_t = fw_t.reshape(N_OUT, C_OUT, H, H).transpose(2, 3, 1, 0).reshape(-1, N_OUT)
    assert np.abs(fw - fw_t).max() <= 1
    np.testing.assert_allclose(float(q_model.conv.out_scale.get_value()), tq_model.conv.scale, rtol=1e-5)
    assert int(q_model.conv.out_zero_point.get_value()) == tq_model.conv.zero_point
    np.testing.assert_allclose(float(q_model.fc.out_scale.get_value()), tq_model.fc.scale, rtol=1e-5)
    # int8 outputs within one output step
    x = _batches(1, seed=9)[0]
    y = np.asarray(jax.jit(lambda m, x: m(x))(q_model, jnp.asarray(x)) if False else q_model(jnp.asarray(x)))
    yt = tq_model(torch.tensor(x.transpose(0, 3, 1, 2).copy())).numpy()
    assert np.abs(y - yt).max() <= 1.01 * tq_model.fc.scale * 2  # one step here, one inherited from the conv


@pytest.mark.slow
def test_training_with_optimizer_under_nnx_jit_traces_once():
    model = _qat_net()
    opt = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)
    traces = []

    @nnx.jit
    def train_step(model, opt, x, y):
        traces.append(1)

        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    labels = jnp.asarray(np.arange(4) % N_OUT)
    w0 = np.asarray(model.fc.linear.kernel.get_value())
    losses = []
    for i, x in enumerate(_batches(8)):
        if i == 3:
            disable_observer(model)
        if i == 4:
            freeze_bn_stats(model)
        if i == 5:
            disable_fake_quant(model)
        if i == 6:
            enable_fake_quant(model)
        losses.append(float(train_step(model, opt, jnp.asarray(x), labels)))
    assert len(traces) == 1
    assert not np.allclose(np.asarray(model.fc.linear.kernel.get_value()), w0)
    assert np.all(np.isfinite(losses))
    # observer disabled after step 3: the activation scale stayed where it was
    s = model.fc.activation_post_process.stats.get_value()
    assert int(s.observer_enabled) == 0 and int(s.fake_quant_enabled) == 1
    check_qat_state(model)
    q = convert(model)
    out = q(jnp.asarray(_batches(1, seed=5)[0]))
    assert out.shape == (4, N_OUT) and out.dtype == jnp.float32


@pytest.mark.slow
def test_pure_jax_jit_step_over_split_state():
    model = _qat_net()
    graphdef, params, stats, bstats, rest = nnx.split(model, nnx.Param, QuantStats, nnx.BatchStat, ...)
    tx = optax.sgd(1e-2)
    opt_state = tx.init(params)
    traces = []

    @jax.jit
    def step(params, stats, bstats, opt_state, x, y):
        traces.append(1)

        def loss_fn(params, stats, bstats):
            m = nnx.merge(graphdef, params, stats, bstats, rest, copy=True)
            loss = optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
            return loss, (nnx.state(m, QuantStats), nnx.state(m, nnx.BatchStat))

        (loss, (stats, bstats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, bstats)
        # gradients exist for Params only
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, bstats, opt_state, loss

    labels = jnp.asarray(np.arange(4) % N_OUT)
    n0 = None
    for i, x in enumerate(_batches(4)):
        if i == 2:
            stats = disable_observer(freeze_bn_stats(stats))
        params, stats, bstats, opt_state, loss = step(params, stats, bstats, opt_state, jnp.asarray(x), labels)
        if i == 0:
            n0 = np.asarray(stats["fc"]["activation_post_process"]["stats"].get_value().observer.min_val)
    assert len(traces) == 1
    fc_state = stats["fc"]["activation_post_process"]["stats"].get_value()
    assert int(fc_state.observer_enabled) == 0
    assert int(stats["conv"]["freeze_bn"].get_value()) == 1
    assert n0 is not None and np.isfinite(float(loss))
    trained = nnx.merge(graphdef, params, stats, bstats, rest)
    convert(trained)


@pytest.mark.slow
def test_lsq_scales_are_params_and_learn():
    from jaxquant.fake_quant.learnable import LearnableFakeQuantize
    from jaxquant.observers.minmax import MovingAverageMinMaxObserver
    from jaxquant.observers.per_channel import MovingAveragePerChannelMinMaxObserver
    from jaxquant.dtypes import qint8, per_channel_symmetric

    qconfig = QConfig(
        activation=LearnableFakeQuantize.with_args(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255),
        weight=LearnableFakeQuantize.with_args(observer=MovingAveragePerChannelMinMaxObserver, quant_min=-128,
                                               quant_max=127, dtype=qint8, qscheme=per_channel_symmetric))
    model = fuse_modules_qat(Net(nnx.Rngs(0)), [["conv", "bn", "relu"]])
    model.train()
    model = prepare_qat(model, qconfig)
    fq = model.fc.activation_post_process
    assert isinstance(fq.scale, nnx.Param)
    model(jnp.asarray(_batches(1)[0]))   # static estimate first
    estimate = float(fq.stats.get_value().scale)
    enable_param_learning(model)
    assert float(fq.scale.get_value()) == estimate
    labels = jnp.asarray(np.arange(4) % N_OUT)
    grads = nnx.grad(lambda m: optax.softmax_cross_entropy_with_integer_labels(
        m(jnp.asarray(_batches(1, seed=3)[0])), labels).mean())(model)
    g = grads["fc"]["activation_post_process"]["scale"].get_value()
    assert np.isfinite(float(g)) and float(g) != 0.0
    gw = grads["fc"]["weight_fake_quant"]["scale"].get_value()
    assert gw.shape == (N_OUT,) and np.any(np.asarray(gw) != 0)


def test_prepare_qat_refuses_eval_mode_bn():
    model = fuse_modules_qat(Net(nnx.Rngs(0)), [["conv", "bn", "relu"]])
    model.eval()
    with pytest.raises(ValueError, match=r"'conv.bn' is in eval mode.*model.train\(\)"):
        prepare_qat(model, get_default_qat_qconfig("x86"))


def test_prepare_qat_refuses_observer_qconfig():
    from jaxquant.qconfig import get_default_qconfig
    model = fuse_modules_qat(Net(nnx.Rngs(0)), [["conv", "bn", "relu"]])
    model.train()
    with pytest.raises(TypeError, match="fake-quantize config"):
        prepare_qat(model, get_default_qconfig("x86"))


def test_convert_without_training_names_the_path():
    model = _qat_net()
    with pytest.raises(ValueError, match="quant"):
        convert(model)


def test_check_qat_state_names_the_nonfinite_layer():
    model = _qat_net()
    model(jnp.asarray(_batches(1)[0]))
    check_qat_state(model)
    k = model.fc.linear.kernel.get_value()
    model.fc.linear.kernel.set_value(k.at[0, 0].set(jnp.nan))
    with pytest.raises(ValueError, match=r"'fc.linear'.*kernel"):
        check_qat_state(model)
    model = _qat_net()
    model(jnp.asarray(_batches(1)[0]))
    st = model.fc.activation_post_process.stats.get_value()
    import dataclasses
    model.fc.activation_post_process.stats.set_value(dataclasses.replace(st, scale=jnp.float32(jnp.inf)))
    with pytest.raises(ValueError, match=r"'fc.activation_post_process'.*scale"):
        check_qat_state(model)


@pytest.mark.slow
def test_quantize_qat_runs_the_users_loop():
    calls = []

    def run(model, batches):
        for x in batches:
            model(jnp.asarray(x))
        calls.append(type(model.conv).__name__)

    model = fuse_modules_qat(Net(nnx.Rngs(0)), [["conv", "bn", "relu"]])
    q = quantize_qat(model, run, (_batches(2),), get_default_qat_qconfig("x86"))
    assert calls == ["ConvBnReLU"]
    assert type(q.conv).__name__ == "Conv" and type(q.fc).__name__ == "Linear"
