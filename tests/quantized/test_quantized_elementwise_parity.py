"""Quantized normalisations, activations, pooling and QFunctional against PyTorch's quantized
modules and ops on the same integers and qparams (x86 engine)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")

import jaxquant.nn as jqnn  # noqa: E402
import jaxquant.nn.quantized as jqq  # noqa: E402
from jaxquant.dtypes import quint8  # noqa: E402
from quantized_parity import JQ_DTYPES, assert_within_one_step, output_qparams, random_inputs, seed_of  # noqa: E402

F = torch.nn.functional
nnq = torch.ao.nn.quantized
NHWC_TO_NCHW, NCHW_TO_NHWC = (0, 3, 1, 2), (0, 2, 3, 1)
C = 6


pytestmark = pytest.mark.usefixtures("x86_engine")  # tests/quantized/conftest.py


def _apply(fn, x):
    return jax.jit(fn)(x)


# ---------------------------------------------------------------- float-op modules with output qparams

def _affine(rng):
    return rng.uniform(0.5, 1.5, C).astype(np.float32), rng.normal(0, 0.3, C).astype(np.float32)


def _batch_norm(rng):
    gamma, beta = _affine(rng)
    mean, var = rng.normal(0, 0.5, C).astype(np.float32), rng.uniform(0.5, 2.0, C).astype(np.float32)
    ours = nnx.BatchNorm(C, use_running_average=True, epsilon=1e-5, rngs=nnx.Rngs(0))
    for name, v in (("scale", gamma), ("bias", beta), ("mean", mean), ("var", var)):
        getattr(ours, name).set_value(jnp.asarray(v))

    def torch_module(scale, zp):
        m = nnq.BatchNorm2d(C, eps=1e-5)
        for name, v in (("weight", gamma), ("bias", beta), ("running_mean", mean), ("running_var", var)):
            getattr(m, name).data.copy_(torch.from_numpy(v))
        m.scale, m.zero_point = torch.tensor(scale), torch.tensor(zp)
        return m

    def torch_float(x):
        return F.batch_norm(x, torch.from_numpy(mean), torch.from_numpy(var), torch.from_numpy(gamma),
                            torch.from_numpy(beta), False, 0.0, 1e-5)
    return ours, torch_module, torch_float, jqq.BatchNorm, True


def _norm_with_affine(ours, torch_factory, torch_float_fn, quantized_type, channels_last):
    def make(rng):
        gamma, beta = _affine(rng)
        ours.scale.set_value(jnp.asarray(gamma))
        ours.bias.set_value(jnp.asarray(beta))
        g, b = torch.nn.Parameter(torch.from_numpy(gamma)), torch.nn.Parameter(torch.from_numpy(beta))
        return (ours, lambda s, z: torch_factory(g, b, s, z), lambda x: torch_float_fn(x, g, b),
                quantized_type, channels_last)
    return make


def _layer_norm(rng):
    return _norm_with_affine(
        nnx.LayerNorm(C, epsilon=1e-5, rngs=nnx.Rngs(0)),
        lambda g, b, s, z: nnq.LayerNorm((C,), g, b, s, z, eps=1e-5),
        lambda x, g, b: F.layer_norm(x, (C,), g, b, 1e-5), jqq.LayerNorm, False)(rng)


def _group_norm(rng):
    return _norm_with_affine(
        nnx.GroupNorm(C, num_groups=2, epsilon=1e-5, rngs=nnx.Rngs(0)),
        lambda g, b, s, z: nnq.GroupNorm(2, C, g, b, s, z, eps=1e-5),
        lambda x, g, b: F.group_norm(x, 2, g, b, 1e-5), jqq.GroupNorm, True)(rng)


def _instance_norm(rng):
    return _norm_with_affine(
        nnx.InstanceNorm(C, epsilon=1e-5, rngs=nnx.Rngs(0)),
        lambda g, b, s, z: nnq.InstanceNorm2d(C, g, b, s, z, eps=1e-5),
        lambda x, g, b: F.instance_norm(x, weight=g, bias=b, eps=1e-5), jqq.InstanceNorm, True)(rng)


def _pointwise(ours_module, torch_factory, torch_float, quantized_type):
    return lambda rng: (ours_module, torch_factory, torch_float, quantized_type, True)


FLOAT_OPS = {
    "batch_norm": _batch_norm,
    "layer_norm": _layer_norm,
    "group_norm": _group_norm,
    "instance_norm": _instance_norm,
    "hardswish": _pointwise(jqnn.Hardswish(), lambda s, z: nnq.Hardswish(s, z), F.hardswish, jqq.Hardswish),
    "elu": _pointwise(jqnn.ELU(0.7), lambda s, z: nnq.ELU(s, z, 0.7), lambda x: F.elu(x, 0.7), jqq.ELU),
    "leaky_relu": _pointwise(jqnn.LeakyReLU(0.1), lambda s, z: nnq.LeakyReLU(s, z, 0.1),
                             lambda x: F.leaky_relu(x, 0.1), jqq.LeakyReLU),
}


@pytest.mark.parametrize("name", list(FLOAT_OPS))
def test_float_op_module_matches_torch(name):
    rng = np.random.default_rng(seed_of(name))
    ours_float, torch_factory, torch_float, quantized_type, channels_last = FLOAT_OPS[name](rng)
    # LayerNorm normalises the last axis in both frameworks, so it sees the same (N, L, C) layout.
    shape, perm = ((2, 5, 4, C), NHWC_TO_NCHW) if channels_last else ((2, 7, C), None)
    x, tx = random_inputs(rng, shape, 0.04, 131, "quint8", to_torch_perm=perm)
    with torch.no_grad():
        out_scale, out_zp = output_qparams(torch_float(tx.dequantize()).numpy())
        theirs = torch_factory(out_scale, out_zp)(tx)
    ours_module = quantized_type(ours_float, out_scale, out_zp, quint8, name=name)
    ours = nnx.jit(lambda m, v: m(v))(ours_module, x)
    assert_within_one_step(ours, theirs, to_ours_perm=NCHW_TO_NHWC if perm else None)


# ---------------------------------------------------------------- activations on QTensors

ACTIVATIONS = {
    # name: (ours, torch op, exact)
    "relu": (jqnn.ReLU(), torch.relu, True),
    "relu6": (jqnn.ReLU6(), lambda x: nnq.ReLU6()(x), True),
    "sigmoid": (jqnn.Sigmoid(), torch.sigmoid, False),
    "tanh": (jqnn.Tanh(), torch.tanh, False),
    "hardsigmoid": (jqnn.Hardsigmoid(), F.hardsigmoid, False),
}


@pytest.mark.parametrize("dtype", ["quint8", "qint8"])
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_activation_on_qtensor_matches_torch(name, dtype):
    ours_fn, torch_fn, exact = ACTIVATIONS[name]
    rng = np.random.default_rng(seed_of(name, dtype))
    # scale 0.06 spans about [-7.5, 7.5], so ReLU6 clips and the sigmoids reach both tails.
    x, tx = random_inputs(rng, (2, 5, 5, C), 0.06, 125 if dtype == "quint8" else -3, dtype)
    theirs = torch_fn(tx)
    ours = _apply(ours_fn, x)
    # PyTorch keeps the input's dtype (sigmoid of a qint8 tensor is qint8 with zero point -128).
    assert ours.dtype == JQ_DTYPES[dtype]
    assert_within_one_step(ours, theirs, exact=exact, max_saturated=0.75)


# ---------------------------------------------------------------- pooling on QTensors

POOLS = [
    # id, ours, torch, exact
    ("max_3x3_s2_p1", lambda x: jqnn.max_pool2d(x, 3, 2, 1), lambda x: F.max_pool2d(x, 3, 2, 1), True),
    ("max_2x2", lambda x: jqnn.max_pool2d(x, 2), lambda x: F.max_pool2d(x, 2), True),
    ("avg_3x3_s2_p1", lambda x: jqnn.avg_pool2d(x, 3, 2, 1), lambda x: F.avg_pool2d(x, 3, 2, 1), False),
    ("avg_2x2", lambda x: jqnn.avg_pool2d(x, 2), lambda x: F.avg_pool2d(x, 2), False),
    ("adaptive_avg_1", lambda x: jqnn.adaptive_avg_pool2d(x, 1), lambda x: F.adaptive_avg_pool2d(x, 1), False),
    ("adaptive_avg_3x2", lambda x: jqnn.adaptive_avg_pool2d(x, (3, 2)),
     lambda x: F.adaptive_avg_pool2d(x, (3, 2)), False),
]


@pytest.mark.parametrize("case", POOLS, ids=[c[0] for c in POOLS])
def test_pooling_on_qtensor_matches_torch(case):
    name, ours_fn, torch_fn, exact = case
    rng = np.random.default_rng(seed_of(name))
    x, tx = random_inputs(rng, (2, 8, 7, C), 0.05, 100, "quint8", to_torch_perm=NHWC_TO_NCHW)
    theirs = torch_fn(tx)
    ours = _apply(ours_fn, x)
    assert_within_one_step(ours, theirs, to_ours_perm=NCHW_TO_NHWC, exact=exact,
                           check_nontrivial=not name.startswith("adaptive_avg_1"))


# ---------------------------------------------------------------- QFunctional

def _qfunctional_pair(scale, zero_point):
    theirs = nnq.QFunctional()
    theirs.scale, theirs.zero_point = scale, zero_point
    return jqq.QFunctional(scale, zero_point, quint8, name="skip"), theirs


BINARY = ["add", "mul", "add_relu"]


@pytest.mark.parametrize("op", BINARY + ["cat"])
def test_qfunctional_binary_ops_match_torch(op):
    rng = np.random.default_rng(seed_of(op))
    x, tx = random_inputs(rng, (2, 4, 5, C), 0.05, 128, "quint8")
    y, ty = random_inputs(rng, (2, 4, 5, C), 0.03, 90, "quint8")
    real = {"add": lambda a, b: a + b, "mul": lambda a, b: a * b,
            "add_relu": lambda a, b: np.maximum(a + b, 0), "cat": lambda a, b: np.concatenate([a, b], 1)}[op]
    out_scale, out_zp = output_qparams(real(tx.dequantize().numpy(), ty.dequantize().numpy()))
    ours_qf, torch_qf = _qfunctional_pair(out_scale, out_zp)
    if op == "cat":
        theirs = torch_qf.cat([tx, ty], dim=1)
        ours = nnx.jit(lambda m, a, b: m.cat([a, b], axis=1))(ours_qf, x, y)
    else:
        theirs = getattr(torch_qf, op)(tx, ty)
        ours = nnx.jit(lambda m, a, b: getattr(m, op)(a, b))(ours_qf, x, y)
    assert_within_one_step(ours, theirs, exact=(op == "cat"), max_saturated=0.75)


# Constants chosen to hit every branch of PyTorch's rules: zero-point shift in range, shift past qmin
# and past qmax (scale widened, integers requantized), and mul by positive / zero / negative.
@pytest.mark.parametrize("c", [0.3, -0.45, 4.9, -7.0])
def test_qfunctional_add_scalar_matches_torch(c):
    rng = np.random.default_rng(seed_of("add_scalar", c))
    x, tx = random_inputs(rng, (3, 5, C), 0.05, 130, "quint8")
    ours_qf, torch_qf = _qfunctional_pair(0.1, 7)  # not used by add_scalar, as in PyTorch
    theirs = torch_qf.add_scalar(tx, c)
    ours = nnx.jit(lambda m, a: m.add_scalar(a, c))(ours_qf, x)
    assert_within_one_step(ours, theirs, max_saturated=0.75)
    # and the value is what was asked for, up to the (possibly widened) output step
    np.testing.assert_allclose(np.asarray(ours.dequantize()), np.asarray(x.dequantize()) + c,
                               atol=float(ours.q_scale()) * 0.5 + 1e-6 + 0.05 * 0.5)


@pytest.mark.parametrize("c", [0.3, 2.5, 0.0, -1.7])
@pytest.mark.parametrize("dtype", ["quint8", "qint8"])
def test_qfunctional_mul_scalar_matches_torch(c, dtype):
    rng = np.random.default_rng(seed_of("mul_scalar", c, dtype))
    x, tx = random_inputs(rng, (3, 5, C), 0.05, 130 if dtype == "quint8" else 4, dtype)
    ours_qf, torch_qf = _qfunctional_pair(0.1, 7)
    theirs = torch_qf.mul_scalar(tx, c)
    ours = nnx.jit(lambda m, a: m.mul_scalar(a, c))(ours_qf, x)
    assert_within_one_step(ours, theirs, exact=True, check_nontrivial=(c != 0.0))
    np.testing.assert_allclose(np.asarray(ours.dequantize()), np.asarray(x.dequantize()) * c, rtol=1e-5,
                               atol=1e-6)
