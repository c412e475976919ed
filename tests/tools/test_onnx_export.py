"""ONNX QDQ export of the static int8 FashionCNN, run by onnxruntime, against jaxquant's int8 outputs."""
import jax
import numpy as np
import pytest
from flax import nnx

from .conftest import images

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from jaxquant.onnx_export import export_onnx  # noqa: E402


@pytest.fixture(scope="module")
def exported(cnn_models, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "cnn.onnx"
    proto = export_onnx(cnn_models[2], images(2), path)
    return proto, path


def test_onnxruntime_matches_int8_model_within_one_step(cnn_models, exported):
    _, _, int8_model = cnn_models
    _, path = exported
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (1, 7):  # dynamic batch
        x = images(n, seed=20 + n)
        y_ort = sess.run(None, {"input": np.asarray(x)})[0]
        y_jq = np.asarray(jax.jit(int8_model)(x))
        step = float(int8_model.fc2.out_scale.get_value())
        assert y_ort.shape == y_jq.shape == (n, 10)
        assert np.max(np.abs(y_ort - y_jq)) <= step * (1 + 1e-5)


def test_graph_is_qdq_with_int8_initializers(cnn_models, exported):
    _, _, int8_model = cnn_models
    proto, _ = exported
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("Conv") == 2 and ops.count("Gemm") == 2 and ops.count("MaxPool") == 2
    # Every float op is fed by DequantizeLinear and feeds QuantizeLinear (or the output).
    producers = {o: n for n in proto.graph.node for o in n.output}
    for node in proto.graph.node:
        if node.op_type in ("Conv", "Gemm", "MaxPool"):
            assert all(producers[i].op_type == "DequantizeLinear" for i in node.input)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    int8_weights = [a for a in inits.values() if a.dtype == np.int8 and a.ndim >= 2]
    assert len(int8_weights) == 4
    # The Conv weight is the int8 kernel in OIHW order.
    w = np.asarray(int8_model.block2.conv.weight_int8.get_value()).transpose(3, 2, 0, 1)
    assert any(a.shape == w.shape and np.array_equal(a, w) for a in int8_weights)
    # NHWC -> NCHW once before the convs, NCHW -> NHWC once before Flatten.
    assert ops.count("Transpose") == 2


def test_unsupported_module_is_named(cnn_models):
    _, _, int8_model = cnn_models
    model = nnx.clone(int8_model)

    class Mystery(nnx.Module):
        def __call__(self, x):
            return x

    model.relu = nnx.data(Mystery())
    with pytest.raises(NotImplementedError, match="'relu' is a .*Mystery"):
        export_onnx(model, images(2))
