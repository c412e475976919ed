"""QAT modules vs PyTorch's QAT modules (same weights, same inputs): forward, input/weight grads, BN stats."""
import numpy as np
import pytest
import jax.numpy as jnp
from flax import nnx

from jaxquant.nn import intrinsic
from jaxquant.nn import qat as nnqat
from jaxquant.qconfig import get_default_qat_qconfig
from jaxquant.transforms.prepare_qat import freeze_bn_stats, update_bn_stats

torch = pytest.importorskip("torch")
tq = torch.ao.quantization
nniqat = torch.ao.nn.intrinsic.qat

ATOL = 2e-5


@nnx.jit
def _loss_and_grads_jit(m, x, g):
    def f(m, x):
        return jnp.sum(m(x) * g)
    return nnx.value_and_grad(f, argnums=(0, 1))(m, x)


def _loss_and_grads(m, x, g):
    return _loss_and_grads_jit(m, jnp.asarray(x), jnp.asarray(g))


@pytest.mark.parametrize("relu", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_linear_matches_torch_qat_linear(relu):
    qc, tqc = get_default_qat_qconfig("x86"), tq.get_default_qat_qconfig("x86")
    lin = nnx.Linear(8, 5, rngs=nnx.Rngs(0))
    float_module = intrinsic.LinearReLU(lin, __import__("jaxquant").nn.ReLU()) if relu else lin
    m = (nnqat.LinearReLU if relu else nnqat.Linear).from_float(float_module, qc, "fc")
    tm = (nniqat.LinearReLU if relu else torch.ao.nn.qat.Linear)(8, 5, qconfig=tqc)
    tact = tqc.activation()
    with torch.no_grad():
        tm.weight.copy_(torch.tensor(np.asarray(lin.kernel.get_value()).T))
        tm.bias.copy_(torch.tensor(np.asarray(lin.bias.get_value())))
    rng = np.random.default_rng(0)
    for _ in range(3):  # several steps: moving-average observers carry state between them
        x = rng.normal(size=(6, 8)).astype(np.float32)
        g = rng.normal(size=(6, 5)).astype(np.float32)
        val, (gm, gx) = _loss_and_grads(m, x, g)
        xt = torch.tensor(x, requires_grad=True)
        lt = (tact(tm(xt)) * torch.tensor(g)).sum()
        lt.backward()
        np.testing.assert_allclose(float(val), float(lt.detach()), rtol=1e-5, atol=ATOL)
        np.testing.assert_allclose(np.asarray(gx), xt.grad.numpy(), atol=ATOL)
        np.testing.assert_allclose(np.asarray(gm["linear"]["kernel"].get_value()).T, tm.weight.grad.numpy(), atol=ATOL)
        np.testing.assert_allclose(np.asarray(gm["linear"]["bias"].get_value()), tm.bias.grad.numpy(), atol=ATOL)
        np.testing.assert_allclose(np.asarray(m.activation_post_process.stats.get_value().scale),
                                   tact.scale.numpy().reshape(()), rtol=1e-6)
        tm.zero_grad()


def _conv_bn_pair(relu=False, bias=True):
    rng = np.random.default_rng(1)
    rngs = nnx.Rngs(0)
    conv = nnx.Conv(3, 4, (3, 3), padding=1, use_bias=bias, rngs=rngs)
    bn = nnx.BatchNorm(4, momentum=0.9, rngs=rngs)
    bn.scale.set_value(jnp.asarray(rng.uniform(0.5, 1.5, 4), jnp.float32))
    bn.bias.set_value(jnp.asarray(rng.normal(size=4), jnp.float32))
    bn.mean.set_value(jnp.asarray(rng.normal(size=4) * 0.1, jnp.float32))
    bn.var.set_value(jnp.asarray(rng.uniform(0.5, 2, 4), jnp.float32))
    if bias:
        conv.bias.set_value(jnp.asarray(rng.normal(size=4) * 0.1, jnp.float32))
    qc, tqc = get_default_qat_qconfig("x86"), tq.get_default_qat_qconfig("x86")
    fused = intrinsic.ConvBnReLU(conv, bn, __import__("jaxquant").nn.ReLU()) if relu else intrinsic.ConvBn(conv, bn)
    m = (nnqat.ConvBnReLU if relu else nnqat.ConvBn).from_float(fused, qc, "block")
    tm = (nniqat.ConvBnReLU2d if relu else nniqat.ConvBn2d)(3, 4, 3, padding=1, bias=bias, momentum=0.1, qconfig=tqc)
    with torch.no_grad():
        tm.weight.copy_(torch.tensor(np.transpose(np.asarray(conv.kernel.get_value()), (3, 2, 0, 1))))
        if bias:
            tm.bias.copy_(torch.tensor(np.asarray(conv.bias.get_value())))
        tm.bn.weight.copy_(torch.tensor(np.asarray(bn.scale.get_value())))
        tm.bn.bias.copy_(torch.tensor(np.asarray(bn.bias.get_value())))
        tm.bn.running_mean.copy_(torch.tensor(np.asarray(bn.mean.get_value())))
        tm.bn.running_var.copy_(torch.tensor(np.asarray(bn.var.get_value())))
    return m, tm, tqc.activation()


def _nchw(a):
    return np.transpose(a, (0, 3, 1, 2)).copy()


@pytest.mark.parametrize("relu,bias", [(False, True), pytest.param(True, False, marks=pytest.mark.slow)])
def test_conv_bn_matches_torch_train_frozen_eval(relu, bias):
    m, tm, tact = _conv_bn_pair(relu, bias)
    m.train()
    tm.train()
    rng = np.random.default_rng(2)
    # train, train, freeze_bn, frozen, unfreeze, eval
    schedule = ["train", "train", "freeze", "train", "unfreeze", "train", "eval"]
    for what in schedule:
        if what == "freeze":
            freeze_bn_stats(m)
            tm.freeze_bn_stats()
            continue
        if what == "unfreeze":
            update_bn_stats(m)
            tm.update_bn_stats()
            continue
        if what == "eval":
            m.eval()
            tm.eval()
            tact.eval()
        x = rng.normal(size=(2, 6, 6, 3)).astype(np.float32)
        g = rng.normal(size=(2, 6, 6, 4)).astype(np.float32)
        val, (gm, gx) = _loss_and_grads(m, x, g)
        xt = torch.tensor(_nchw(x), requires_grad=True)
        lt = (tact(tm(xt)) * torch.tensor(_nchw(g))).sum()
        lt.backward()
        np.testing.assert_allclose(float(val), float(lt.detach()), rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(_nchw(np.asarray(gx)), xt.grad.numpy(), atol=ATOL)
        np.testing.assert_allclose(np.transpose(np.asarray(gm["conv"]["kernel"].get_value()), (3, 2, 0, 1)),
                                   tm.weight.grad.numpy(), atol=1e-4, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(gm["bn"]["scale"].get_value()), tm.bn.weight.grad.numpy(), atol=1e-4)
        np.testing.assert_allclose(np.asarray(gm["bn"]["bias"].get_value()), tm.bn.bias.grad.numpy(), atol=1e-4)
        np.testing.assert_allclose(np.asarray(m.bn.mean.get_value()), tm.bn.running_mean.numpy(), atol=1e-6)
        np.testing.assert_allclose(np.asarray(m.bn.var.get_value()), tm.bn.running_var.numpy(), rtol=1e-5)
        tm.zero_grad()


def test_frozen_bn_keeps_running_stats_and_uses_them():
    m, _, _ = _conv_bn_pair()
    m.train()
    freeze_bn_stats(m)
    mean0, var0 = np.asarray(m.bn.mean.get_value()), np.asarray(m.bn.var.get_value())
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 6, 6, 3)) * 3 + 1, jnp.float32)
    y_train_frozen = m(x)
    np.testing.assert_array_equal(np.asarray(m.bn.mean.get_value()), mean0)
    np.testing.assert_array_equal(np.asarray(m.bn.var.get_value()), var0)
    from jaxquant.transforms.prepare_qat import disable_observer
    disable_observer(m)
    m.eval()
    np.testing.assert_allclose(np.asarray(m(x)), np.asarray(y_train_frozen), atol=1e-6)


@pytest.mark.parametrize("nd,groups", [pytest.param(1, 1, marks=pytest.mark.slow), (2, 2),
                                       pytest.param(3, 1, marks=pytest.mark.slow)])
def test_conv_any_rank_and_groups_matches_torch(nd, groups):
    qc, tqc = get_default_qat_qconfig("x86"), tq.get_default_qat_qconfig("x86")
    conv = nnx.Conv(4, 6, (3,) * nd, strides=2 if nd == 2 else 1, padding="SAME" if nd != 2 else 1,
                    feature_group_count=groups, rngs=nnx.Rngs(0))
    m = nnqat.Conv.from_float(conv, qc, "c")
    tcls = {1: torch.ao.nn.qat.Conv1d, 2: torch.ao.nn.qat.Conv2d, 3: torch.ao.nn.qat.Conv3d}[nd]
    tm = tcls(4, 6, 3, stride=2 if nd == 2 else 1, padding=1, groups=groups, qconfig=tqc)
    perm = (nd + 1, nd) + tuple(range(nd))
    with torch.no_grad():
        tm.weight.copy_(torch.tensor(np.transpose(np.asarray(conv.kernel.get_value()), perm)))
        tm.bias.copy_(torch.tensor(np.asarray(conv.bias.get_value())))
    tact = tqc.activation()
    x = np.random.default_rng(4).normal(size=(2,) + (5,) * nd + (4,)).astype(np.float32)
    to_cf = (0, nd + 1) + tuple(range(1, nd + 1))
    y = np.asarray(nnx.jit(lambda m, x: m(x))(m, jnp.asarray(x)))
    yt = tact(tm(torch.tensor(np.transpose(x, to_cf).copy()))).detach().numpy()
    np.testing.assert_allclose(np.transpose(y, to_cf), yt, atol=1e-5)
