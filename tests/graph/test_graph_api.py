"""Graph mode on plain functions: capture through jit/custom_jvp, QConfigMapping rules on op paths, the
int8 program under jax.jit / jax.export, compare (per-op SQNR), and bad input errors naming the op."""
import jax
import jax.numpy as jnp
import numpy as np

import jaxquant as jq
from testkit.graph_mlp import mlp_inputs, mlp_params


def mlp(params, x):
    @jax.jit
    def layer(p, h):
        return jax.nn.relu(h @ p["w"] + p["b"])

    h = layer(params["fc1"], x)
    return h @ params["fc2"]["w"] + params["fc2"]["b"]


def test_plain_function_static_matches_numpy_reference():
    params, x = mlp_params(), mlp_inputs()
    observed = jq.graph.prepare(mlp, (params, x), jq.default_per_channel_qconfig)
    assert observed.units == [("fc1", "linear", ("add", "relu")), ("fc2", "linear", ("add",))]
    state = jq.graph.calibrate(observed, [x], progress=False)
    qprog = jq.graph.convert(observed, state)
    y = np.asarray(jax.jit(qprog.apply)(qprog.params, x))
    # numpy reference: the same observers' qparams, quantize -> int dot -> requantize, by hand
    obs = dict((k, o) for k, _, o in observed.observers)
    qp = {k: [np.asarray(v) for v in o.calculate_qparams(state[k])] for k, o in obs.items()}
    (sx, zx), (s1, z1), (s2, z2) = [qp[k] for k in obs]  # input, fc1 out, fc2 out (program order)

    def quant(v, s, z):
        return np.clip(np.round(v / s) + z, 0, 255)

    def wq(w):  # per-channel symmetric qint8, PyTorch's formula: scale = max|w| / ((127 - -128) / 2)
        scale = np.maximum(np.abs(w).max(0) / np.float32(127.5), np.finfo(np.float32).eps).astype(np.float32)
        return np.clip(np.round(w / scale), -128, 127), scale

    xq = quant(np.asarray(x), sx, zx)
    w1, ws1 = wq(np.asarray(params["fc1"]["w"]))
    acc = (xq - zx) @ w1
    h = np.clip(np.round((acc + np.asarray(params["fc1"]["b"]) / (sx * ws1)) * (sx * ws1 / s1)) + z1, z1, 255)
    w2, ws2 = wq(np.asarray(params["fc2"]["w"]))
    acc = (h - z1) @ w2
    o = np.clip(np.round((acc + np.asarray(params["fc2"]["b"]) / (s1 * ws2)) * (s1 * ws2 / s2)) + z2, 0, 255)
    ref = (o - z2) * s2
    np.testing.assert_allclose(y, ref, atol=float(s2) * 1.01)  # at most one step (float rounding order)
    assert np.mean(np.abs(y - ref) < 1e-6) > 0.9


def test_other_batch_size_export_and_compare():
    params, x = mlp_params(), mlp_inputs()
    observed = jq.graph.prepare(mlp, (params, x), jq.default_per_channel_qconfig)
    qprog = jq.graph.convert(observed, jq.graph.calibrate(observed, [x], progress=False))
    x7 = mlp_inputs(2, n=7)
    y7 = jax.jit(qprog.apply)(qprog.params, x7)  # re-captured at the new shape
    assert y7.shape == (7, 4)
    with jq.use_native(False):  # raw jax.export: the portable kernels (jq.export does this itself)
        exported = jax.export.export(jax.jit(qprog.apply))(qprog.params, x)
    np.testing.assert_array_equal(np.asarray(exported.call(qprog.params, x)), np.asarray(qprog(x)))
    rows = jq.graph.compare(qprog, params, x)
    assert [r[0] for r in rows] == ["fc1", "fc2", "output"]
    assert all(r[1] > 20 for r in rows), rows  # dB


def test_mapping_rules_on_op_paths():
    params, x = mlp_params(), mlp_inputs()
    mapping = jq.QConfigMapping().set_global(jq.default_per_channel_qconfig).set_module_name_regex("fc2", None)
    observed = jq.graph.prepare(mlp, (params, x), mapping)
    assert [p for p, _, _ in observed.units] == ["fc1"]
    qprog = jq.graph.convert(observed, jq.graph.calibrate(observed, [x], progress=False))
    assert qprog.unit_paths == ["fc1"]
    assert np.corrcoef(np.ravel(qprog(x)), np.ravel(mlp(params, x)))[0, 1] > 0.99
    mapping = jq.QConfigMapping().set_object_type("dot_general", jq.default_per_channel_qconfig)
    assert len(jq.graph.prepare(mlp, (params, x), mapping).units) == 2


def test_object_type_rule_with_an_nnx_module_class():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(2, 4, (3, 3), rngs=rngs)
            self.fc = nnx.Linear(4, 3, rngs=rngs)

        def __call__(self, x):
            return self.fc(jnp.mean(self.conv(x), axis=(1, 2)))

    x = jnp.ones((2, 6, 6, 2))
    mapping = jq.QConfigMapping().set_object_type(nnx.Linear, jq.default_per_channel_qconfig)
    observed = jq.graph.prepare(Net(nnx.Rngs(0)), x, mapping)
    assert [(p, k) for p, k, _ in observed.units] == [("fc", "linear")]
    mapping = jq.QConfigMapping().set_object_type("conv_general_dilated", jq.default_per_channel_qconfig)
    assert [p for p, _, _ in jq.graph.prepare(Net(nnx.Rngs(0)), x, mapping).units] == ["conv"]


def test_transposed_conv_runs_int8():
    def up(params, x):  # lax.conv_transpose: an input-dilated conv_general_dilated
        y = jax.lax.conv_transpose(x, params["w"], (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jax.nn.relu(y + params["b"])

    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(0, 0.3, (3, 3, 4, 6)), jnp.float32), "b": jnp.zeros(6)}
    x = jnp.asarray(rng.normal(size=(2, 5, 5, 4)), jnp.float32)
    observed = jq.graph.prepare(up, (params, x), jq.default_per_channel_qconfig)
    assert observed.units == [("w", "conv", ("add", "relu"))]
    qprog = jq.graph.convert(observed, jq.graph.calibrate(observed, [x], progress=False))
    y, ref = np.asarray(qprog(x)), np.asarray(up(params, x))
    assert y.shape == ref.shape
    assert np.corrcoef(y.ravel(), ref.ravel())[0, 1] > 0.99
