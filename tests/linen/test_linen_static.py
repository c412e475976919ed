"""Static PTQ of Linen models: equal to NNX's static PTQ of the same layers quantized one by one,
int8 in the lowered program, no float weights left, lifted transforms, errors naming Linen paths."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxquant as jq
import jaxquant.linen as jql
from testkit.small_models import minmax_qconfig as _qconfig

from linen_models import PerLayer, batches, nnx_linear


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(16)(x))
        return nn.Dense(5)(x)


def _linen_static(model, data, qconfig=None, example=None, **kw):
    v = jax.jit(lambda x: model.init(jax.random.key(0), x, **kw))(data[0])
    prepared = jql.prepare(model, qconfig or _qconfig())
    v = jql.calibrate(prepared, v, data, **kw)
    qm, qv = jql.convert(prepared, v, data[0] if example is None else example, **kw)
    return v, qm, qv


@pytest.fixture(scope="module")
def mlp_static():
    data = batches((8, 6), n=2)
    return (data,) + _linen_static(MLP(), data)


class ConvNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        x = nn.relu(nn.Conv(8, (3, 3), strides=2, feature_group_count=4, padding=((1, 0), (0, 1)))(x))
        return nn.Dense(5)(x.reshape(x.shape[0], -1))


def _nnx_conv(p, cin, cout, **kw):
    conv = nnx.Conv(cin, cout, p["kernel"].shape[:2], rngs=nnx.Rngs(0), **kw)
    conv.kernel.set_value(p["kernel"])
    conv.bias.set_value(p["bias"])
    return conv


class NnxConvNet(nnx.Module):
    """The same layers, each between a QuantStub and a DeQuantStub (what Linen's per-layer scheme does)."""

    def __init__(self, p):
        self.c0 = PerLayer(_nnx_conv(p["Conv_0"], 3, 8))
        self.c1 = PerLayer(_nnx_conv(p["Conv_1"], 8, 8, strides=2, feature_group_count=4, padding=((1, 0), (0, 1))))
        self.fc = PerLayer(nnx_linear(p["Dense_0"]["kernel"], p["Dense_0"]["bias"]))

    def __call__(self, x):
        x = jax.nn.relu(self.c1(jax.nn.relu(self.c0(x))))
        return self.fc(x.reshape(x.shape[0], -1))


@pytest.mark.slow
def test_static_conv_grouped_and_dense_equal_nnx_static_ptq_per_layer():
    """Equal, bit for bit: NNX's prepare/calibrate/convert of the same layers with a QuantStub before and
    a DeQuantStub after each one, on the same data, gives the same observers' qparams and the same int8
    kernels, hence the same float outputs."""
    data = batches((2, 7, 7, 3), n=2)
    v, qm, qv = _linen_static(ConvNet(), data)
    prepared = jq.prepare(NnxConvNet(v["params"]), _qconfig())
    jq.calibrate(prepared, data, progress=False)
    ref_q = jq.convert(prepared)
    x = batches((2, 7, 7, 3), n=1, seed=3)[0]
    y = jax.jit(qm.apply)(qv, x)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(ref_q(x)))
    y_float = ConvNet().apply({"params": v["params"]}, x)
    err = np.abs(np.asarray(y) - np.asarray(y_float)).max()
    assert 0 < err < 0.1 * np.abs(np.asarray(y_float)).max()  # really quantized, and close


def test_converted_variables_hold_int8_and_no_float_weights(mlp_static):
    data, _, qm, qv = mlp_static
    assert "params" not in qv and jql.QUANT_STATS not in qv
    for name in ("Dense_0", "Dense_1"):
        p = qv[jql.QUANT_PARAMS][name]
        assert p["weight_int"].dtype == jnp.int8 and p["weight_scale"].dtype == jnp.float32
        assert p["input_zero_point"].dtype == jnp.int32
    hlo = jax.jit(qm.apply).lower(qv, data[0]).as_text()
    # the dots run on integers: uint8 activations x int8 weights accumulated in int32
    assert re.search(r"ui8>, tensor<\S*xi8>\) -> tensor<\S*xi32>", hlo), hlo[:2000]


class Block(nn.Module):
    @nn.compact
    def __call__(self, c, _):
        return nn.relu(nn.Dense(6)(c)), None


class Lifted(nn.Module):
    @nn.compact
    def __call__(self, x):
        cols = {"params": 0, jql.QUANT_STATS: 0, jql.QUANT_PARAMS: 0}
        scan = nn.scan(Block, variable_axes=cols, split_rngs={"params": True}, length=3)
        x, _ = scan(name="blocks")(x, None)
        x = nn.remat(nn.Dense)(6, name="rem")(x)
        vm = nn.vmap(nn.Dense, variable_axes=cols, split_rngs={"params": True}, in_axes=0, out_axes=0)
        return vm(4, name="heads")(jnp.stack([x, -x]))


class Unrolled(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(3):
            x = nn.relu(nn.Dense(6, name=f"b{i}")(x))
        x = nn.Dense(6, name="rem")(x)
        return jnp.stack([nn.Dense(4, name="h0")(x), nn.Dense(4, name="h1")(-x)])


def _unrolled_params(p):
    out = {"rem": p["rem"]}
    for i in range(3):
        out[f"b{i}"] = jax.tree.map(lambda a: a[i], p["blocks"]["Dense_0"])
    for i in range(2):
        out[f"h{i}"] = jax.tree.map(lambda a: a[i], p["heads"])
    return out


@pytest.mark.slow
def test_scan_remat_vmap_equal_unrolled_model():
    data = batches((5, 6), n=2)
    v, qm, qv = _linen_static(Lifted(), data)
    assert qv[jql.QUANT_PARAMS]["blocks"]["Dense_0"]["weight_int"].shape == (3, 6, 6)
    uv = {"params": _unrolled_params(v["params"])}
    prepared = jql.prepare(Unrolled(), _qconfig())
    uv = jql.calibrate(prepared, uv, data)
    uq, uqv = jql.convert(prepared, uv, data[0])
    x = batches((5, 6), n=1, seed=9)[0]
    np.testing.assert_allclose(np.asarray(Lifted().apply({"params": v["params"]}, x)),
                               np.asarray(Unrolled().apply(uv, x)), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(jax.jit(qm.apply)(qv, x)), np.asarray(jax.jit(uq.apply)(uqv, x)))


class Branchy(nn.Module):
    @nn.compact
    def __call__(self, x, use_b=False):
        x = nn.Dense(4, name="a")(x)
        if use_b:
            x = nn.Dense(4, name="b")(x)
        return x


def test_error_names_linen_path_of_uncalibrated_layer():
    x = batches((3, 4), n=1)[0]
    v = jax.jit(lambda x: Branchy().init(jax.random.key(0), x, use_b=True))(x)
    prepared = jql.prepare(Branchy(), _qconfig())
    v = jql.calibrate(prepared, v, [x])  # 'b' never runs
    with pytest.raises(Exception, match=r"'b'"):
        jql.convert(prepared, v, x, use_b=True)


def test_errors_for_bad_input_name_the_path_and_the_fix():
    x = batches((3, 4), n=1)[0]
    v = MLP().init(jax.random.key(0), x)
    bad = jq.QConfigMapping().set_global(_qconfig()).set_module_name("Dense_7", None)
    prepared = jql.prepare(MLP(), bad)
    v2 = jql.calibrate(prepared, v, [x])
    with pytest.raises(KeyError, match="Dense_7.*Dense_0"):
        jql.convert(prepared, v2, x)
    with pytest.raises(ValueError, match="calibrate"):
        jql.convert(jql.prepare(MLP(), _qconfig()), v, x)
    half = jq.QConfig(activation=jq.PlaceholderObserver.with_args(dtype=jq.float16), weight=jq.default_weight_observer)
    with pytest.raises(ValueError, match=r"'Dense_0'.*quint8 or qint8"):
        jql.calibrate(jql.prepare(MLP(), half), v, [x])

    class Circ(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Conv(2, (3, 3), padding="CIRCULAR", name="circ")(x)

    xi = batches((1, 5, 5, 2), n=1)[0]
    cv = Circ().init(jax.random.key(0), xi)
    p = jql.prepare(Circ(), _qconfig())
    with pytest.raises(ValueError, match=r"'circ'.*qconfig"):
        jql.convert(p, jql.calibrate(p, cv, [xi]), xi)


def test_converted_model_on_float_variables_names_the_layer(mlp_static):
    data, v, qm, _ = mlp_static
    with pytest.raises(ValueError, match=r"'Dense_0'.*quant_params"):
        qm.apply({"params": v["params"]}, data[0])


def test_qconfig_none_keeps_layer_float_and_its_params():
    data = batches((8, 6), n=2)
    mapping = jq.QConfigMapping().set_global(_qconfig()).set_module_name("Dense_1", None)
    v, qm, qv = _linen_static(MLP(), data, qconfig=mapping)
    assert set(qv["params"]) == {"Dense_1"} and set(qv[jql.QUANT_PARAMS]) == {"Dense_0"}
    x = data[1]
    h = jax.jit(qm.apply)(qv, x)
    assert h.shape == (8, 5)
