"""summary(): what was quantized, with which dtypes/schemes and bytes; mapping entries that matched nothing."""
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxquant as jq
from jaxquant.tools.size import model_arrays
from jaxquant.tools.summary import summary

from .conftest import minmax_qconfig


def test_summary_of_converted_model(cnn_models):
    _, _, int8_model = cnn_models
    s = summary(int8_model)
    rows = {m.path: m for m in s.modules}
    assert set(s.quantized_paths()) == {"quant", "fc1", "fc2", "block1.conv", "block2.conv"}
    fc1 = rows["fc1"]
    assert fc1.weight_dtype == "int8" and fc1.scheme == "jaxquant.per_channel_affine"
    assert fc1.activation_dtype == "jaxquant.quint8"
    # Bytes by hand: int8 weight + f32 scales + i32 zero points + f32 bias + out scale/zp.
    k, n = int8_model.fc1.weight_int8.get_value().shape
    assert fc1.nbytes == k * n + 4 * n + 4 * n + 4 * n + 4 + 4
    assert s.total_bytes == sum(a.nbytes for a in model_arrays(int8_model).values())
    text = str(s)
    assert "fc1" in text and "per_channel_affine" in text and "total:" in text


def test_summary_of_prepared_model_and_unmatched_entries(cnn_models):
    _, prepared, _ = cnn_models
    mapping = (jq.QConfigMapping().set_global(minmax_qconfig())
               .set_module_name("fc3", None)                 # typo: there is no fc3
               .set_module_name("fc2", minmax_qconfig())
               .set_module_name_regex(r"block9\..*", None)   # matches nothing
               .set_object_type(nnx.Linear, minmax_qconfig())
               .set_object_type(nnx.LSTMCell, None))         # no LSTM in this model
    s = summary(prepared, mapping)
    rows = {m.path: m for m in s.modules}
    assert rows["fc1"].status == "observed" and "MinMaxObserver" in rows["fc1"].qconfig
    assert rows["fc1"].activation_dtype == "jaxquant.quint8"
    assert set(s.unmatched_entries) == {"module_name 'fc3'", r"module_name_regex 'block9\\..*'",
                                        "object_type LSTMCell"}
    assert "fc3" in str(s)


def test_rows_depth_first_in_definition_order():
    """Rows read like the model's code: depth first (each module right before its children), list
    items by index (blocks.2 before blocks.10), attributes in definition order on a model built by its
    own __init__; NNX's graph order was breadth first and alphabetical ("blocks.10" < "blocks.2")."""
    import jaxquant.nn as jqnn

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.zconv = nnx.Linear(2, 2, rngs=rngs)
            self.act = jqnn.ReLU()

        def __call__(self, x):
            return self.act(self.zconv(x))

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.quant = jqnn.QuantStub()
            self.stem = nnx.Linear(3, 2, rngs=rngs)
            self.blocks = nnx.List([Block(rngs) for _ in range(11)])
            self.head = nnx.Linear(2, 2, rngs=rngs)
            self.dequant = jqnn.DeQuantStub()

        def __call__(self, x):
            x = self.stem(self.quant(x))
            for b in self.blocks:
                x = b(x)
            return self.dequant(self.head(x))

    model = Net(nnx.Rngs(0))
    blocks = [f"blocks.{i}.zconv" for i in range(11)]
    assert [r.path for r in summary(model).modules] == ["stem", *blocks, "head"]
    # prepare and convert copy the model (nnx.split/merge sorts attributes by name); the copies keep
    # the definition order, as PyTorch's prepared/converted models print
    prepared = jq.prepare(model, jq.get_default_qconfig("x86"))
    paths = [r.path for r in summary(prepared).modules]
    nested = [q for b in blocks for q in (b, b + ".module")]
    expected = ["quant", "stem", "stem.module", *nested, "head", "head.module", "dequant"]
    assert [q for q in paths if q in expected] == expected, paths
    for b in blocks:  # an observed layer's observer sits right after its float module
        assert paths.index(b + ".activation_post_process") == paths.index(b + ".module") + 1
    jq.calibrate(prepared, [jnp.ones((2, 3), jnp.float32)], progress=False)
    assert [r.path for r in summary(jq.convert(prepared)).modules] == ["quant", "stem", *blocks, "head"]
    dynamic = jq.quantize_dynamic(model, {nnx.Linear})
    assert [r.path for r in summary(dynamic).modules] == ["stem", *blocks, "head"]
