"""Graph-mode entries (G) of the bad-input catalogue (docs/bad_input_catalogue.md): each error names the op
path or rule and says what to do."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant.graph import GraphQuantizationError
from testkit.graph_mlp import mlp_inputs, mlp_params


def mlp(params, x):
    h = jax.nn.relu(x @ params["fc1"]["w"] + params["fc1"]["b"])
    return h @ params["fc2"]["w"] + params["fc2"]["b"]


def test_G01_rule_matching_nothing():
    params, x = mlp_params(), mlp_inputs()
    mapping = jq.QConfigMapping().set_global(jq.default_per_channel_qconfig).set_module_name_regex("encoder", None)
    with pytest.raises(GraphQuantizationError, match=r"set_module_name_regex\('encoder'\) matches no op path; op paths: fc1, fc2"):
        jq.graph.prepare(mlp, (params, x), mapping)
    mapping = jq.QConfigMapping().set_global(jq.default_per_channel_qconfig).set_module_name("fc3", None)
    with pytest.raises(GraphQuantizationError, match=r"set_module_name\('fc3'\)"):
        jq.graph.prepare(mlp, (params, x), mapping)


def test_G02_unidentifiable_weight():
    def batched(params, x):  # one weight per batch element: no (in, out) weight to quantize
        return jnp.einsum("bk,bkn->bn", x, params["w"])

    params = {"w": jnp.ones((5, 8, 3), jnp.float32)}
    observed = jq.graph.prepare(batched, (params, mlp_inputs()), jq.default_per_channel_qconfig)
    state = jq.graph.calibrate(observed, [mlp_inputs()], progress=False)
    with pytest.raises(GraphQuantizationError, match=r"'w' \(dot_general at op \d+\).*batch dimensions.*set_module_name\('w', None\)"):
        jq.graph.convert(observed, state)


def test_G03_op_count_mismatch_between_prepare_and_run():
    def shape_dependent(params, x):
        y = x @ params["w"]
        return jnp.tanh(y) if x.shape[0] > 4 else y  # the program differs with the batch size

    params = {"w": jnp.ones((8, 3), jnp.float32)}
    observed = jq.graph.prepare(shape_dependent, (params, mlp_inputs()), jq.default_per_channel_qconfig)
    qprog = jq.graph.convert(observed, jq.graph.calibrate(observed, [mlp_inputs()], progress=False))
    with pytest.raises(GraphQuantizationError, match=r"has 1 ops, the one prepared has 2; they differ from op 1 \(tanh"):
        qprog(mlp_inputs(n=2))


def test_G04_observer_state_of_another_program():
    params, x = mlp_params(), mlp_inputs()
    observed = jq.graph.prepare(mlp, (params, x), jq.default_per_channel_qconfig)
    with pytest.raises(GraphQuantizationError, match="observer state has 0 entries but the program has 3"):
        jq.graph.convert(observed, {})


def test_G05_uncalibrated_observer():
    params, x = mlp_params(), mlp_inputs()
    observed = jq.graph.prepare(mlp, (params, x), jq.default_per_channel_qconfig)
    with pytest.raises(ValueError, match="fc1"):
        jq.graph.convert(observed, observed.init_state)


def test_G06_control_flow_warns_and_stays_float():
    def looped(params, x):
        y = jax.lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h @ params["w"]), x)
        return y @ params["out"]

    params = {"w": jnp.eye(8, dtype=jnp.float32), "out": jnp.ones((8, 2), jnp.float32)}
    with pytest.warns(UserWarning, match=r"'(while|scan)' at op \d+ .*control flow; it and everything inside its body run in float"):
        observed = jq.graph.prepare(looped, (params, mlp_inputs()), jq.default_per_channel_qconfig)
    qprog = jq.graph.convert(observed, jq.graph.calibrate(observed, [mlp_inputs()], progress=False))
    assert qprog.unit_paths == ["out"]
    np.testing.assert_allclose(np.asarray(qprog(mlp_inputs())), np.asarray(looped(params, mlp_inputs())), rtol=0.05, atol=0.05)


def test_G07_nothing_to_quantize():
    with pytest.raises(GraphQuantizationError, match="no dot_general/conv_general_dilated op got a qconfig"):
        jq.graph.prepare(lambda p, x: jnp.tanh(x * p), (jnp.float32(2.0), mlp_inputs()), jq.default_per_channel_qconfig)


def _saved_dynamic_mlp(tmp_path):
    params, x = mlp_params(), mlp_inputs()
    path = tmp_path / "mlp.jq"
    jq.save(path, jq.graph.quantize_dynamic(mlp, (params, x)))
    return path, params, x


def test_G08_load_with_a_changed_function(tmp_path):
    from jaxquant.serialization import CheckpointError

    path, params, x = _saved_dynamic_mlp(tmp_path)

    def changed(params, x):  # gelu instead of relu
        h = jax.nn.gelu(x @ params["fc1"]["w"] + params["fc1"]["b"])
        return h @ params["fc2"]["w"] + params["fc2"]["b"]

    with pytest.raises(CheckpointError, match=r"differ from op \d+ at '.*'.*same function"):
        jq.load(path, changed, (params, x))


def test_G09_graph_file_with_an_array_that_does_not_fit(tmp_path):
    from jaxquant.serialization import CheckpointError

    path, params, x = _saved_dynamic_mlp(tmp_path)
    wider = {"fc1": {"w": jnp.zeros((8, 32)), "b": jnp.zeros(32)}, "fc2": {"w": jnp.zeros((32, 4)), "b": params["fc2"]["b"]}}
    with pytest.raises(CheckpointError, match=r"array 'units\.\d+\.w_q' has shape \[8, 16\], expected \[8, 32\]"):
        jq.load(path, mlp, (wider, x))


def test_G10_graph_file_loaded_without_example_args(tmp_path):
    from jaxquant.serialization import CheckpointError

    path, _, _ = _saved_dynamic_mlp(tmp_path)
    with pytest.raises(CheckpointError, match=r"graph-mode int8 program.*example_args"):
        jq.load(path, mlp)
