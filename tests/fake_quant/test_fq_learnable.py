"""LSQ fake quantization: gradients for input, scale and zero point against PyTorch; LearnableFakeQuantize modes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant import dtypes as D
from jaxquant.fake_quant import (
    LearnableFakeQuantize,
    fake_quantize_learnable_per_channel_affine,
    fake_quantize_learnable_per_tensor_affine,
)
from jaxquant.observers.minmax import MovingAverageMinMaxObserver


def test_per_tensor_hand_worked_gradients():
    # s = 0.5, z = 1.0, range [0, 4]. x = [0.3, 2.0, -1.0]: x/s + z = [1.6, 5, -1] -> q = [2, 5, -1]
    # in range: x0 only. ds0 = (xfq - x)/s = ((2-1)*0.5 - 0.3)/0.5 = 0.4; x1 above: qmax - z = 3; x2 below: qmin - z = -1
    # dz: 0 inside, -s outside -> -0.5 - 0.5
    x = jnp.array([0.3, 2.0, -1.0], jnp.float32)
    f = lambda x, s, z: jnp.sum(fake_quantize_learnable_per_tensor_affine(x, s, z, 0, 4, 1.0))
    dx, ds, dz = jax.grad(f, argnums=(0, 1, 2))(x, jnp.float32(0.5), jnp.float32(1.0))
    np.testing.assert_array_equal(dx, [1.0, 0.0, 0.0])
    np.testing.assert_allclose(ds, 0.4 + 3.0 - 1.0, rtol=1e-6)
    np.testing.assert_allclose(dz, -1.0, rtol=1e-6)


@pytest.mark.parametrize("qmin,qmax,grad_factor", [(0, 255, 1.0), (-128, 127, 0.37), (0, 15, 0.05)])
def test_per_tensor_matches_torch(qmin, qmax, grad_factor):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(qmax)
    for _ in range(4):
        scale = np.float32(rng.uniform(0.01, 0.5))
        zp = np.float32(rng.uniform(qmin - 3, qmax + 3))  # exercises rounding and clamping of z
        x = rng.normal(0, 60 * scale, 500).astype(np.float32)
        dy = rng.normal(size=500).astype(np.float32)
        tx, ts, tz = (torch.tensor(v, requires_grad=True) for v in (x, [scale], [zp]))
        ty = torch._fake_quantize_learnable_per_tensor_affine(tx, ts, tz, qmin, qmax, grad_factor)
        ty.backward(torch.tensor(dy))
        y, vjp = jax.vjp(lambda a, b, c: fake_quantize_learnable_per_tensor_affine(a, b, c, qmin, qmax, grad_factor),
                         jnp.asarray(x), jnp.asarray([scale]), jnp.asarray([zp]))
        dx, ds, dz = vjp(jnp.asarray(dy))
        np.testing.assert_array_equal(np.asarray(y), ty.detach().numpy())
        np.testing.assert_array_equal(np.asarray(dx), tx.grad.numpy())
        np.testing.assert_allclose(ds, ts.grad.numpy(), rtol=2e-5, atol=1e-5)
        np.testing.assert_allclose(dz, tz.grad.numpy(), rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("axis,grad_factor", [(0, 1.0), (1, 0.25), (2, 1.0)])
def test_per_channel_matches_torch(axis, grad_factor):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(axis)
    shape = (4, 5, 6)
    c = shape[axis]
    scale = rng.uniform(0.01, 0.5, c).astype(np.float32)
    zp = rng.uniform(-131, 130, c).astype(np.float32)
    bshape = [1, 1, 1]
    bshape[axis] = c
    x = (rng.normal(0, 60, shape) * scale.reshape(bshape)).astype(np.float32)
    dy = rng.normal(size=shape).astype(np.float32)
    tx, ts, tz = (torch.tensor(v, requires_grad=True) for v in (x, scale, zp))
    ty = torch._fake_quantize_learnable_per_channel_affine(tx, ts, tz, axis, -128, 127, grad_factor)
    ty.backward(torch.tensor(dy))
    y, vjp = jax.vjp(lambda a, b, c_: fake_quantize_learnable_per_channel_affine(a, b, c_, axis, -128, 127, grad_factor),
                     jnp.asarray(x), jnp.asarray(scale), jnp.asarray(zp))
    dx, ds, dz = vjp(jnp.asarray(dy))
    np.testing.assert_array_equal(np.asarray(y), ty.detach().numpy())
    np.testing.assert_array_equal(np.asarray(dx), tx.grad.numpy())
    np.testing.assert_allclose(ds, ts.grad.numpy(), rtol=2e-5, atol=1e-5)
    np.testing.assert_allclose(dz, tz.grad.numpy(), rtol=2e-5, atol=1e-5)


def test_learnable_module_matches_torch_static_then_learning():
    torch = pytest.importorskip("torch")
    from torch.ao.quantization._learnable_fake_quantize import _LearnableFakeQuantize
    from torch.ao.quantization.observer import MovingAverageMinMaxObserver as TorchMA

    rng = np.random.default_rng(5)
    ours = LearnableFakeQuantize(MovingAverageMinMaxObserver, quant_min=0, quant_max=255, use_grad_scaling=True,
                                 dtype=D.quint8)
    theirs = _LearnableFakeQuantize(TorchMA, quant_min=0, quant_max=255, use_grad_scaling=True)
    state = ours.init((8, 16))
    # two static-estimate steps, then learning with the observer frozen
    for step in range(4):
        if step == 2:
            state = LearnableFakeQuantize.enable_param_learning(state)
            theirs.enable_param_learning()
        x = rng.normal(0.5, 1.5, (8, 16)).astype(np.float32)
        dy = rng.normal(size=(8, 16)).astype(np.float32)
        (y, new_state), vjp = jax.vjp(lambda st, v: ours.apply(st, v), state, jnp.asarray(x))
        g_state, gx = vjp((jnp.asarray(dy), jax.tree_util.tree_map(jnp.zeros_like, new_state)))
        tx = torch.tensor(x, requires_grad=True)
        theirs.scale.grad = None
        theirs.zero_point.grad = None
        ty = theirs(tx)
        ty.backward(torch.tensor(dy))
        np.testing.assert_allclose(np.asarray(new_state.scale), theirs.scale.detach().numpy()[0], rtol=3e-7)
        np.testing.assert_allclose(np.asarray(new_state.zero_point), theirs.zero_point.detach().numpy()[0])
        np.testing.assert_allclose(np.asarray(y), ty.detach().numpy(), atol=1e-6)
        np.testing.assert_array_equal(np.asarray(gx), tx.grad.numpy())
        if step >= 2:
            np.testing.assert_allclose(g_state.scale, theirs.scale.grad.numpy()[0], rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(g_state.zero_point, theirs.zero_point.grad.numpy()[0], rtol=1e-4, atol=1e-6)
            # one SGD step on both, applied to the values the forward used
            state = new_state.__class__(**{**new_state.__dict__, "scale": new_state.scale - 0.01 * g_state.scale,
                                           "zero_point": new_state.zero_point - 0.01 * g_state.zero_point})
            with torch.no_grad():
                theirs.scale -= 0.01 * theirs.scale.grad
                theirs.zero_point -= 0.01 * theirs.zero_point.grad
        else:
            assert float(g_state.scale) == 0.0  # learning disabled: no gradient reaches the parameters
            state = new_state
    scale, zp = ours.calculate_qparams(state)
    tscale, tzp = theirs.calculate_qparams()
    np.testing.assert_allclose(scale, tscale.numpy()[0], rtol=1e-5)
    assert int(zp) == int(tzp[0])


def test_learnable_errors():
    with pytest.raises(ValueError, match="strictly less"):
        LearnableFakeQuantize(MovingAverageMinMaxObserver, quant_min=5, quant_max=5)
    with pytest.raises(ValueError, match="include 0"):
        fake_quantize_learnable_per_tensor_affine(jnp.ones(3), 0.1, 0.0, 1, 10)
    with pytest.raises(ValueError, match="scale must be finite"):
        fake_quantize_learnable_per_tensor_affine(jnp.ones(3), -0.1, 0.0, 0, 10)
