"""Fused float modules (jaxquant.nn.intrinsic): forward = parts in sequence, checked with numpy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxquant.nn import ReLU, ReLU6
from jaxquant.nn.intrinsic import (
    BNReLU,
    ConvBn,
    ConvBnReLU,
    ConvReLU,
    FusedModule,
    LinearBn,
    LinearReLU,
)


def _bn(c, seed):
    bn = nnx.eval_shape(lambda: nnx.BatchNorm(c, use_running_average=True, epsilon=1e-3,
                                              rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(seed)
    graphdef, _ = nnx.split(bn)
    values = {"mean": rng.normal(size=c), "var": rng.uniform(0.2, 2, size=c),
              "scale": rng.normal(size=c), "bias": rng.normal(size=c)}
    state = nnx.State({k: nnx.BatchStat(jnp.asarray(v, jnp.float32)) if k in ("mean", "var")
                       else nnx.Param(jnp.asarray(v, jnp.float32)) for k, v in values.items()})
    return nnx.merge(graphdef, state), {k: np.float64(v.astype(np.float32))
                                        for k, v in values.items()}


def _bn_numpy(y, p, eps=1e-3):
    return (y - p["mean"]) / np.sqrt(p["var"] + eps) * p["scale"] + p["bias"]


def _linear(cin, cout, seed):
    rng = np.random.default_rng(seed)
    lin = nnx.eval_shape(lambda: nnx.Linear(cin, cout, rngs=nnx.Rngs(0)))
    w = rng.normal(size=(cin, cout)).astype(np.float32)
    b = rng.normal(size=cout).astype(np.float32)
    graphdef, _ = nnx.split(lin)
    state = nnx.State({"kernel": nnx.Param(jnp.asarray(w)), "bias": nnx.Param(jnp.asarray(b))})
    return nnx.merge(graphdef, state), np.float64(w), np.float64(b)


def _conv1x1(cin, cout, seed):
    """A 1x1 conv, so the numpy reference is a matmul over the channel axis."""
    rng = np.random.default_rng(seed)
    conv = nnx.eval_shape(lambda: nnx.Conv(cin, cout, (1, 1), rngs=nnx.Rngs(0)))
    w = rng.normal(size=(1, 1, cin, cout)).astype(np.float32)
    b = rng.normal(size=cout).astype(np.float32)
    graphdef, _ = nnx.split(conv)
    state = nnx.State({"kernel": nnx.Param(jnp.asarray(w)), "bias": nnx.Param(jnp.asarray(b))})
    return nnx.merge(graphdef, state), np.float64(w[0, 0]), np.float64(b)


X = np.random.default_rng(0).normal(size=(2, 3, 3, 4)).astype(np.float32)
X2 = np.random.default_rng(1).normal(size=(5, 4)).astype(np.float32)


def _close(actual, expected):
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=1e-5, atol=1e-5)


def test_conv_relu_and_linear_relu():
    conv, w, b = _conv1x1(4, 6, 2)
    fused = ConvReLU(conv, ReLU())
    _close(fused(jnp.asarray(X)), np.maximum(np.float64(X) @ w + b, 0))
    lin, w, b = _linear(4, 6, 3)
    fused = LinearReLU(lin, ReLU())
    _close(fused(jnp.asarray(X2)), np.maximum(np.float64(X2) @ w + b, 0))


def test_bn_relu():
    bn, p = _bn(4, 4)
    _close(BNReLU(bn, ReLU())(jnp.asarray(X)), np.maximum(_bn_numpy(np.float64(X), p), 0))


def test_conv_bn_and_conv_bn_relu_keep_the_batchnorm():
    conv, w, b = _conv1x1(4, 6, 5)
    bn, p = _bn(6, 6)
    y = _bn_numpy(np.float64(X) @ w + b, p)
    _close(ConvBn(conv, bn)(jnp.asarray(X)), y)
    _close(ConvBnReLU(conv, bn, ReLU())(jnp.asarray(X)), np.maximum(y, 0))


def test_linear_bn():
    lin, w, b = _linear(4, 6, 7)
    bn, p = _bn(6, 8)
    _close(LinearBn(lin, bn)(jnp.asarray(X2)), _bn_numpy(np.float64(X2) @ w + b, p))


def test_named_and_indexed_parts_and_pytree_roundtrip():
    conv, _, _ = _conv1x1(4, 6, 9)
    bn, _ = _bn(6, 10)
    relu = ReLU()
    fused = ConvBnReLU(conv, bn, relu)
    assert isinstance(fused, FusedModule) and len(fused) == 3
    assert fused.conv is conv and fused.bn is bn and fused.relu is relu
    assert fused[0] is conv and fused[1] is bn and fused[2] is relu
    graphdef, state = nnx.split(fused)
    assert set(nnx.to_pure_dict(state)) == {"conv", "bn"}
    out = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, jnp.asarray(X))
    np.testing.assert_allclose(out, fused(jnp.asarray(X)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cls,args,message", [
    (ConvReLU, lambda c, l, b: (l, ReLU()), r"ConvReLU takes \(nnx.Conv, jaxquant.nn.ReLU\); "
                                            r"got \(Linear, ReLU\)"),
    (ConvReLU, lambda c, l, b: (c, ReLU6()), r"got \(Conv, ReLU6\)"),
    (LinearReLU, lambda c, l, b: (c, ReLU()), r"LinearReLU takes \(nnx.Linear"),
    (ConvBn, lambda c, l, b: (c, ReLU()), r"ConvBn takes \(nnx.Conv, nnx.BatchNorm\)"),
    (ConvBnReLU, lambda c, l, b: (c, b, ReLU6()), r"ConvBnReLU takes .*got \(Conv, BatchNorm, "
                                                  r"ReLU6\)"),
    (LinearBn, lambda c, l, b: (l, ReLU()), r"LinearBn takes .*got \(Linear, ReLU\)"),
    (BNReLU, lambda c, l, b: (c, ReLU()), r"BNReLU takes \(nnx.BatchNorm"),
])
def test_wrong_parts_are_rejected(cls, args, message):
    conv, _, _ = _conv1x1(4, 6, 11)
    lin, _, _ = _linear(4, 6, 12)
    bn, _ = _bn(6, 13)
    with pytest.raises(TypeError, match=message):
        cls(*args(conv, lin, bn))
