"""export_onnx with a bias that int32 cannot hold in the accumulator's scale (catalogue F08).

Small activations (scale ~4e-6) times a weight scale ~1e-2 give an accumulator scale ~3e-8, so a
bias of 300 is ~1e10 accumulator units: clipped to int32 it becomes ~64, and onnxruntime's output
would be off by ~236. The exporter must keep such a bias exact (float), and keep the int32 form
where it is faithful.
"""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxquant as jq
import jaxquant.nn as jqnn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from jaxquant.onnx_export import export_onnx  # noqa: E402


class Net(nnx.Module):
    def __init__(self, bias: float, conv: bool):
        self.quant = jqnn.QuantStub()
        self.fc = (nnx.Conv(4, 8, (3, 3), rngs=nnx.Rngs(0)) if conv else nnx.Linear(4, 8, rngs=nnx.Rngs(0)))
        self.fc.bias.set_value(jnp.full((8,), bias, jnp.float32) + jnp.arange(8, dtype=jnp.float32))
        self.dequant = jqnn.DeQuantStub()

    def __call__(self, x):
        return self.dequant(self.fc(self.quant(x)))


def _int8(bias: float, x_range: float, conv: bool = False):
    rng = np.random.default_rng(0)
    shape = (2, 5, 5, 4) if conv else (16, 4)
    batches = [jnp.asarray(rng.uniform(0, x_range, shape).astype(np.float32)) for _ in range(2)]
    prepared = jq.prepare(Net(bias, conv), jq.QConfig(activation=jq.MinMaxObserver.with_args(reduce_range=True),
                                                weight=jq.default_per_channel_weight_observer))
    jq.calibrate(prepared, batches, progress=False)
    return jq.convert(prepared), batches[0]


@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv"])
@pytest.mark.parametrize("bias, x_range, int32_bias", [(300.0, 1e-3, False), (0.3, 1.0, True)])
def test_F08_onnxruntime_matches_with_any_bias(tmp_path, bias, x_range, int32_bias, conv):
    model, x = _int8(bias, x_range, conv)
    proto = export_onnx(model, x, tmp_path / "m.onnx")
    biases = [onnx.numpy_helper.to_array(i) for i in proto.graph.initializer if i.name.startswith("fc_b_")
              and not i.name.startswith(("fc_b_scale", "fc_b_zp"))]
    assert [b.dtype for b in biases] == [np.int32 if int32_bias else np.float32]
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    y_ort = sess.run(None, {"input": np.asarray(x)})[0]
    y_jq = np.asarray(model(x))
    step = float(model.fc.out_scale.get_value())
    assert np.max(np.abs(y_ort - y_jq)) <= step * (1 + 1e-5)
    assert np.abs(y_jq).max() > bias  # the outputs really carry the bias
