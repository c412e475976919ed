"""fake_quantize_per_{tensor,channel}_affine: hand-worked values, PyTorch parity (bit for bit), transforms, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.fake_quant import fake_quantize_per_channel_affine, fake_quantize_per_tensor_affine

RANGES = [(0, 255), (-128, 127), (0, 127), (-127, 127), (0, 15)]


def test_per_tensor_hand_worked():
    # scale 0.5, zp 3, range [0, 10]: x/0.5 = [-4.0, 1.0, 1.5, 2.5, 3.5, 4.0] -> round-half-even
    # [-4, 1, 2, 2, 4, 4] + 3 = [-1, 4, 5, 5, 7, 7]; clamp [0, 4, 5, 5, 7, 7]; minus zp times scale
    x = jnp.array([-2.0, 0.5, 0.75, 1.25, 1.75, 2.0], jnp.float32)
    y = fake_quantize_per_tensor_affine(x, 0.5, 3, 0, 10)
    np.testing.assert_array_equal(y, [-1.5, 0.5, 1.0, 1.0, 2.0, 2.0])
    g = jax.grad(lambda x: jnp.sum(fake_quantize_per_tensor_affine(x, 0.5, 3, 0, 7) * jnp.arange(6.0)))(x)
    # q before clamp: [-1, 4, 5, 5, 7, 7]; range [0, 7]: only the first is outside
    np.testing.assert_array_equal(g, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0])


def test_gradient_mask_uses_unclamped_integer():
    # q = 10 exactly on quant_max passes the gradient, q = 11 does not, q = -1 does not
    x = jnp.array([10.0, 10.4, 10.6, -0.6, -0.4], jnp.float32)
    g = jax.grad(lambda x: jnp.sum(fake_quantize_per_tensor_affine(x, 1.0, 0, 0, 10)))(x)
    np.testing.assert_array_equal(g, [1.0, 1.0, 0.0, 0.0, 1.0])


def _tie_and_edge_inputs(rng, scale, zp, qmin, qmax, n=400):
    k = rng.integers(qmin - zp - 4, qmax - zp + 5, size=n).astype(np.float32)
    s = np.float32(scale)
    return np.concatenate([
        rng.normal(0, 100 * s, n).astype(np.float32),
        (k + np.float32(0.5)) * s,          # ties (as close as float32 gets)
        k * s,                              # exact grid points incl. both bounds
        np.array([(qmax - zp) * s, (qmin - zp) * s, (qmax - zp + 0.5) * s, (qmin - zp - 0.5) * s,
                  0.0, -0.0, 1e30, -1e30], np.float32),
    ]).astype(np.float32)


@pytest.mark.parametrize("qmin,qmax", RANGES)
def test_per_tensor_matches_torch_bit_for_bit(qmin, qmax):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(qmin + 1000 * qmax)
    for _ in range(3):
        scale = np.float32(rng.uniform(1e-3, 1.0))
        zp = int(rng.integers(qmin, qmax + 1))
        x = _tie_and_edge_inputs(rng, scale, zp, qmin, qmax)
        dy = rng.normal(size=x.shape).astype(np.float32)
        tx = torch.tensor(x, requires_grad=True)
        ty = torch.fake_quantize_per_tensor_affine(tx, torch.tensor([scale]), torch.tensor([zp], dtype=torch.int32),
                                                   qmin, qmax)
        ty.backward(torch.tensor(dy))
        y, vjp = jax.vjp(lambda v: fake_quantize_per_tensor_affine(v, scale, zp, qmin, qmax), jnp.asarray(x))
        (dx,) = vjp(jnp.asarray(dy))
        np.testing.assert_array_equal(np.asarray(y), ty.detach().numpy())
        np.testing.assert_array_equal(np.asarray(dx), tx.grad.numpy())


@pytest.mark.parametrize("axis", [0, 1, -1])
@pytest.mark.parametrize("qmin,qmax", [(-128, 127), (0, 255)])
def test_per_channel_matches_torch_bit_for_bit(axis, qmin, qmax):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7 + axis)
    shape = (6, 5, 4)
    c = shape[axis]
    scale = rng.uniform(1e-3, 0.5, c).astype(np.float32)
    zp = rng.integers(qmin, qmax + 1, c).astype(np.int32)
    bshape = [1, 1, 1]
    bshape[axis] = c
    s = scale.reshape(bshape)
    x = (rng.normal(0, 80, shape) * s).astype(np.float32)
    x[..., 0] = (np.floor(x[..., 0] / s[..., 0]) + np.float32(0.5)) * s[..., 0]  # ties
    dy = rng.normal(size=shape).astype(np.float32)
    tx = torch.tensor(x, requires_grad=True)
    ty = torch.fake_quantize_per_channel_affine(tx, torch.tensor(scale), torch.tensor(zp), axis % 3, qmin, qmax)
    ty.backward(torch.tensor(dy))
    y, vjp = jax.vjp(lambda v: fake_quantize_per_channel_affine(v, scale, zp, axis, qmin, qmax), jnp.asarray(x))
    (dx,) = vjp(jnp.asarray(dy))
    np.testing.assert_array_equal(np.asarray(y), ty.detach().numpy())
    np.testing.assert_array_equal(np.asarray(dx), tx.grad.numpy())


def test_per_channel_float_zero_point_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(11)
    scale = rng.uniform(1e-3, 0.5, 8).astype(np.float32)
    zp = rng.uniform(-40, 40, 8).astype(np.float32)
    x = (rng.normal(0, 90, (8, 64)) * scale[:, None]).astype(np.float32)
    ty = torch.fake_quantize_per_channel_affine(torch.tensor(x), torch.tensor(scale), torch.tensor(zp), 0, 0, 255)
    y = fake_quantize_per_channel_affine(x, scale, zp, 0, 0, 255)
    np.testing.assert_array_equal(np.asarray(y), ty.numpy())


def test_zero_gradient_for_qparams_and_transforms():
    x = jnp.linspace(-3, 3, 24, dtype=jnp.float32).reshape(4, 6)
    gs = jax.grad(lambda s: jnp.sum(fake_quantize_per_tensor_affine(x, s, 0, -8, 7)))(jnp.float32(0.2))
    assert gs == 0.0
    f = jax.jit(lambda x, s, z: fake_quantize_per_tensor_affine(x, s, z, 0, 255))
    np.testing.assert_array_equal(f(x, 0.05, 128), fake_quantize_per_tensor_affine(x, 0.05, 128, 0, 255))
    # vmap over a batch of tensors, each with its own scale
    scales = jnp.array([0.1, 0.2, 0.3, 0.4], jnp.float32)
    yv = jax.vmap(lambda xi, si: fake_quantize_per_tensor_affine(xi, si, 0, -128, 127))(x, scales)
    for i in range(4):
        np.testing.assert_array_equal(yv[i], fake_quantize_per_tensor_affine(x[i], scales[i], 0, -128, 127))
    gv = jax.vmap(jax.grad(lambda xi: jnp.sum(fake_quantize_per_channel_affine(xi, jnp.full(6, 0.01), jnp.zeros(6, jnp.int32), 0, -128, 127))))(x)
    np.testing.assert_array_equal(gv, (jnp.abs(x / 0.01) <= 127.5).astype(jnp.float32))
    yb = fake_quantize_per_tensor_affine(x.astype(jnp.bfloat16), 0.25, 0, -128, 127)
    assert yb.dtype == jnp.bfloat16


@pytest.mark.parametrize("call,match", [
    (lambda: fake_quantize_per_tensor_affine(jnp.ones(3), 0.1, 0, 5, 5), "strictly less"),
    (lambda: fake_quantize_per_tensor_affine(jnp.ones(3), 0.1, 0, 10, 0), "strictly less"),
    (lambda: fake_quantize_per_tensor_affine(jnp.ones(3), 0.0, 0, 0, 255), "scale must be finite and > 0"),
    (lambda: fake_quantize_per_tensor_affine(jnp.ones(3), -1.0, 0, 0, 255), "scale must be finite and > 0"),
    (lambda: fake_quantize_per_tensor_affine(jnp.ones(3), float("nan"), 0, 0, 255), "scale must be finite"),
    (lambda: fake_quantize_per_tensor_affine(jnp.ones(3), 0.1, 300, 0, 255), "zero_point must be between"),
    (lambda: fake_quantize_per_tensor_affine(jnp.ones(3, jnp.int32), 0.1, 0, 0, 255), "floating-point"),
    (lambda: fake_quantize_per_tensor_affine(jnp.ones(3), jnp.ones(3), 0, 0, 255), "must be scalars"),
    (lambda: fake_quantize_per_channel_affine(jnp.ones((2, 3)), jnp.ones(2), jnp.zeros(2, jnp.int32), 1, 0, 255),
     "expected 3 scales"),
    (lambda: fake_quantize_per_channel_affine(jnp.ones((2, 3)), jnp.ones(2), jnp.zeros(2, jnp.int32), 2, 0, 255),
     "out of range"),
])
def test_bad_arguments_raise_clear_errors(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_nan_input_stays_nan():
    y = fake_quantize_per_tensor_affine(jnp.array([jnp.nan, 1.0]), 0.1, 0, -128, 127)
    assert np.isnan(y[0]) and y[1] == np.float32(1.0)
