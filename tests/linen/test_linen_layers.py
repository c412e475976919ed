"""Each quantizable Linen layer type, converted alone, against an independent float reference: Linen's own
float layer run on the dequantized input and dequantized int8 weight, requantized with the calibrated
output qparams. The int8 result must agree to within one output quantization step (the integer
accumulation is exact; only the final rounding may differ by one from float32 accumulation)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
import jaxquant.linen as jql
from jaxquant.qtensor import dequantize, quantize_per_tensor

from linen_models import batches

PER_TENSOR = jq.QConfig(activation=jq.MinMaxObserver.with_args(reduce_range=True), weight=jq.default_weight_observer)
PER_CHANNEL = jq.QConfig(activation=jq.MinMaxObserver.with_args(reduce_range=True),
                         weight=jq.default_per_channel_weight_observer)


def _float_kernel(layer, qp, raw_shape):
    w = qp["weight_int"].astype(jnp.float32) - qp["weight_zero_point"].astype(jnp.float32)
    w = w * qp["weight_scale"]
    if isinstance(layer, nn.ConvTranspose) and layer.transpose_kernel:
        w = jnp.flip(jnp.swapaxes(w, -1, -2), axis=tuple(range(w.ndim - 2)))
    return w.reshape(raw_shape)


CASES = [
    ("dense_general", nn.DenseGeneral(features=(2, 3), axis=(-2, -1)), (4, 3, 5), PER_CHANNEL),
    ("einsum", nn.Einsum((5, 4, 6), "bti,ihd->bthd"), (2, 3, 5), PER_CHANNEL),
    ("einsum_pt", nn.Einsum((4, 5), "btd,dk->btk"), (2, 3, 4), PER_TENSOR),
    ("conv1d_depthwise", nn.Conv(6, (3,), feature_group_count=6, padding="SAME"), (2, 9, 6), PER_CHANNEL),
    ("conv_transpose", nn.ConvTranspose(5, (3, 3), strides=(2, 2), padding="SAME"), (2, 4, 4, 3), PER_TENSOR),
    ("conv_transpose_valid_tk", nn.ConvTranspose(4, (2, 3), strides=(2, 1), padding="VALID", transpose_kernel=True),
     (1, 3, 4, 2), PER_CHANNEL),
]


@pytest.mark.parametrize("name,layer,shape,qconfig", CASES, ids=[c[0] for c in CASES])
def test_layer_int8_within_one_step_of_float_reference(name, layer, shape, qconfig):
    data = batches(shape, n=1, seed=1)  # one batch: one compiled calibration step
    v = jax.jit(lambda x: layer.init(jax.random.key(0), x))(data[0])
    prepared = jql.prepare(layer, qconfig)
    v = jql.calibrate(prepared, v, data)
    qm, qv = jql.convert(prepared, v, data[0])
    assert "params" not in qv
    qp = qv[jql.QUANT_PARAMS]
    x = data[0] * 1.1  # partly outside the calibrated range: clamping is part of what is compared
    y = np.asarray(jax.jit(qm.apply)(qv, x))
    # reference: float layer on dequantized operands, then the output quantization
    x_dq = dequantize(quantize_per_tensor(x, qp["input_scale"], qp["input_zero_point"], jq.quint8))
    ref_params = {"kernel": _float_kernel(layer, qp, v["params"]["kernel"].shape)}
    if "bias" in v["params"]:
        ref_params["bias"] = v["params"]["bias"]
    ref = layer.apply({"params": ref_params}, x_dq)
    ref = dequantize(quantize_per_tensor(ref, qp["output_scale"], qp["output_zero_point"], jq.quint8))
    step = float(qp["output_scale"])
    assert y.shape == ref.shape
    assert np.abs(y - np.asarray(ref)).max() <= step * 1.001
    assert np.mean(y == np.asarray(ref)) > 0.9


def test_einsum_per_channel_on_a_non_output_axis_is_refused_with_the_fix():
    layer = nn.Einsum((5, 4), "btd,dk->bkt")
    x = batches((2, 3, 5), n=1)[0]
    v = layer.init(jax.random.key(0), x)
    prepared = jql.prepare(layer, PER_CHANNEL)
    v = jql.calibrate(prepared, v, [x])
    with pytest.raises(ValueError, match="per-tensor"):
        jql.convert(prepared, v, x)


class ConvBN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3), use_bias=False)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=True)(x))
        x = nn.Dense(3)(x)
        return nn.BatchNorm(use_running_average=True)(x)


@pytest.mark.slow
def test_fuse_modules_folds_batchnorm_and_static_ptq_runs_on_it():
    x = batches((2, 6, 6, 3), n=1)[0]
    model = ConvBN()
    v = model.init(jax.random.key(0), x)
    rng = np.random.default_rng(0)
    v["batch_stats"] = jax.tree.map(lambda a: jnp.asarray(rng.uniform(0.5, 2.0, a.shape), jnp.float32), v["batch_stats"])
    v["params"]["BatchNorm_0"]["scale"] = jnp.asarray(rng.normal(size=4), jnp.float32)
    fm, fv = jql.fuse_modules(model, v, [("Conv_0", "BatchNorm_0"), ("Dense_0", "BatchNorm_1")], x)
    assert "BatchNorm_0" not in fv["params"] and "bias" in fv["params"]["Conv_0"]
    np.testing.assert_allclose(np.asarray(fm.apply(fv, x)), np.asarray(model.apply(v, x)), rtol=1e-5, atol=1e-5)
    prepared = jql.prepare(fm, PER_CHANNEL)
    cv = jql.calibrate(prepared, fv, [x])
    qm, qv = jql.convert(prepared, cv, x)
    assert set(qv[jql.QUANT_PARAMS]) == {"Conv_0", "Dense_0"} and "params" not in qv
    y, y_float = np.asarray(jax.jit(qm.apply)(qv, x)), np.asarray(model.apply(v, x))
    assert np.abs(y - y_float).max() < 0.05 * np.abs(y_float).max()
    with pytest.raises(KeyError, match="Conv_9"):
        jql.fuse_modules(model, v, [("Conv_9", "BatchNorm_0")], x)
    with pytest.raises(TypeError, match="BatchNorm_0"):
        jql.fuse_modules(model, v, [("BatchNorm_0", "Conv_0")], x)


class WithStubs(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jql.QuantStub()(x)
        y = nn.Dense(4)(x)
        z = jql.FloatFunctional().add(y, x[..., :4])
        return jql.DeQuantStub()(z)


def test_quant_stub_and_float_functional_put_outputs_on_the_calibrated_grid():
    data = batches((6, 5), n=2)
    v = WithStubs().init(jax.random.key(0), data[0])
    prepared = jql.prepare(WithStubs(), PER_TENSOR)
    v = jql.calibrate(prepared, v, data)
    qm, qv = jql.convert(prepared, v, data[0])
    qp = qv[jql.QUANT_PARAMS]
    assert set(qp) == {"QuantStub_0", "Dense_0", "FloatFunctional_0"}
    y = np.asarray(jax.jit(qm.apply)(qv, data[1]))
    ff = qp["FloatFunctional_0"]
    codes = y / float(ff["output_scale"]) + int(ff["output_zero_point"])
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)  # every output is a quint8 grid point
    # observer on the add saw exactly the float sums: its qparams are MinMax's formula on them
    sums = [np.asarray(WithStubs().apply({"params": v["params"]}, d)) for d in data]
    lo, hi = min(0.0, min(s.min() for s in sums)), max(0.0, max(s.max() for s in sums))
    scale = np.float32((hi - lo) / 127.0)
    np.testing.assert_allclose(float(ff["output_scale"]), scale, rtol=1e-6)
