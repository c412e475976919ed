"""QConfigMapping precedence (global < object type < regex < module name < name/type/index) and defaults."""
import pytest
from flax import nnx

import jaxquant.qconfig as jq
from jaxquant.nn.qconfig_mappings import get_default_qat_qconfig_mapping, get_default_qconfig_mapping
from jaxquant.qconfig_mapping import QConfigMapping, qconfig_for

G, T, R1, R2, N, P, O = (jq.default_qconfig, jq.default_per_channel_qconfig, jq.default_qat_qconfig,
                         jq.default_qat_qconfig_v2, jq.float16_static_qconfig, jq.default_dynamic_qconfig,
                         jq.float16_dynamic_qconfig)


def _mapping():
    return (QConfigMapping()
            .set_global(G)
            .set_object_type(nnx.Linear, T)
            .set_module_name_regex(r"features\.layers\.[0-9]+\.conv", R1)
            .set_module_name_regex(r"features\..*", R2)
            .set_module_name("features.layers.1", N)
            .set_module_name("head", P)
            .set_module_name_object_type_order("head", nnx.Linear, 1, O))


@pytest.mark.parametrize("path,typ,index,expected", [
    ("stem", nnx.Conv, None, G),                     # nothing specific: global
    ("stem.fc", nnx.Linear, None, T),                # object type beats global
    ("features.layers.0.conv", nnx.Linear, None, R1),  # regex beats object type; first registered wins
    ("features.layers.0.bn", nnx.BatchNorm, None, R2),
    ("features.layers.1.conv", nnx.Conv, None, N),   # module name (an ancestor) beats regex
    ("features.layers.1", nnx.Conv, None, N),
    ("features.layers.10.conv", nnx.Conv, None, R1),  # "features.layers.1" is not an ancestor of "...10..."
    ("head", nnx.Linear, None, P),
    ("head", nnx.Linear, 0, P),
    ("head", nnx.Linear, 1, O),                      # (name, type, index) beats everything
    ("", nnx.Conv, None, G),
])
def test_precedence(path, typ, index, expected):
    assert qconfig_for(_mapping(), path, typ, index) is expected


def test_exact_type_match_and_none_and_overrides():
    class MyLinear(nnx.Linear):
        pass

    m = _mapping()
    assert qconfig_for(m, "x", MyLinear) is G  # no subclass matching, as PyTorch
    m.set_module_name("x", None)
    assert qconfig_for(m, "x.y", nnx.Linear) is None  # None leaves the subtree in float
    m.set_module_name_regex(r"features\.layers\.[0-9]+\.conv", P)  # replaces, keeps registration order
    assert qconfig_for(m, "features.layers.3.conv", nnx.Conv) is P
    assert list(m.module_name_regex_qconfigs)[0] == r"features\.layers\.[0-9]+\.conv"
    assert QConfigMapping.from_dict(m.to_dict()).to_dict() == m.to_dict()


def test_errors():
    with pytest.raises(TypeError, match="QConfig or None"):
        QConfigMapping().set_global(jq.default_qconfig.activation)
    with pytest.raises(ValueError, match="regular expression"):
        QConfigMapping().set_module_name_regex("(", G)
    with pytest.raises(TypeError, match="QConfigMapping"):
        qconfig_for({"": G}, "a", nnx.Linear)


def test_default_qat_mapping_matches_torch_structure():
    torch = pytest.importorskip("torch")
    from torch.ao.quantization import get_default_qat_qconfig_mapping as t_mapping
    import jaxquant.nn as jqnn

    for backend in ("x86", "qnnpack"):
        ours = get_default_qat_qconfig_mapping(backend)
        theirs = t_mapping(backend)
        assert ours.global_qconfig == jq.get_default_qat_qconfig(backend)
        for our_type, torch_type in [(jqnn.Sigmoid, torch.nn.Sigmoid), (jqnn.Tanh, torch.nn.Tanh),
                                     (jqnn.Hardsigmoid, torch.nn.Hardsigmoid), (jqnn.Softmax, torch.nn.Softmax)]:
            q = qconfig_for(ours, "act", our_type)
            fq, tfq = q.activation(), theirs.object_type_qconfigs[torch_type].activation()
            assert type(fq).__name__ == type(tfq).__name__ == "FixedQParamsFakeQuantize"
            s, z = fq.calculate_qparams()
            ts, tz = tfq.calculate_qparams()
            assert float(s) == float(ts) and int(z) == int(tz)
        t_transpose = theirs.object_type_qconfigs[torch.nn.ConvTranspose2d]
        o_transpose = ours.object_type_qconfigs[nnx.ConvTranspose]
        assert type(o_transpose.weight().activation_post_process).__name__ == \
            type(t_transpose.weight().activation_post_process).__name__
        assert ours.object_type_qconfigs["reshape"] == jq.default_reuse_input_qconfig


def test_default_ptq_mapping():
    try:
        m = get_default_qconfig_mapping("x86")
    except (ImportError, AttributeError):
        pytest.skip("HistogramObserver not in the tree yet")
    import jaxquant.nn as jqnn

    assert qconfig_for(m, "a", jqnn.Tanh).activation().scale == 2.0 / 256.0
    assert qconfig_for(m, "a", nnx.Linear) == jq.get_default_qconfig("x86")
