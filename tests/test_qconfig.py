"""QConfig presets against PyTorch 2.13: observer / fake-quant class names and every constructor argument."""
import numpy as np
import pytest

import jaxquant.qconfig as jq
from jaxquant import dtypes as D
from jaxquant.fake_quant import FakeQuantizeBase, Identity

torch = pytest.importorskip("torch")
tq = pytest.importorskip("torch.ao.quantization.qconfig")

_DTYPE = {"quint4x2": "quint4"}


def _describe_torch(obj):
    """Class name and constructor-relevant attributes of a built PyTorch observer / fake quantize."""
    if isinstance(obj, torch.ao.quantization.FakeQuantizeBase):
        return (type(obj).__name__, _describe_torch(obj.activation_post_process))
    if isinstance(obj, torch.nn.Identity):
        return ("Identity",)
    out = {"dtype": _DTYPE.get(str(obj.dtype).replace("torch.", ""), str(obj.dtype).replace("torch.", "")),
           "is_dynamic": bool(getattr(obj, "is_dynamic", False))}
    for name in ("qscheme", "reduce_range", "quant_min", "quant_max", "eps", "averaging_constant", "ch_axis",
                 "scale", "zero_point"):
        if hasattr(obj, name) and not callable(getattr(obj, name)):
            v = getattr(obj, name)
            if isinstance(v, torch.Tensor):
                v = v.item()
            out[name] = str(v).replace("torch.", "") if name == "qscheme" else v
    if type(obj).__name__ in ("PlaceholderObserver", "NoopObserver", "ReuseInputObserver", "RecordingObserver"):
        out = {k: out[k] for k in ("dtype", "is_dynamic")}
    return (type(obj).__name__, out)


def _describe_ours(obj):
    if isinstance(obj, FakeQuantizeBase):
        return (type(obj).__name__, _describe_ours(obj.activation_post_process))
    if isinstance(obj, Identity):
        return ("Identity",)
    out = {"dtype": obj.dtype.name, "is_dynamic": bool(obj.is_dynamic)}
    for name in ("qscheme", "reduce_range", "eps", "averaging_constant", "ch_axis", "scale", "zero_point"):
        if hasattr(obj, name):
            v = getattr(obj, name)
            out[name] = v.name if (name == "qscheme" and v is not None) else v
    if hasattr(obj, "quant_range"):
        out["quant_min"], out["quant_max"] = obj.quant_range
    if type(obj).__name__ in ("PlaceholderObserver", "NoopObserver", "ReuseInputObserver", "RecordingObserver"):
        out = {k: out[k] for k in ("dtype", "is_dynamic")}
    return (type(obj).__name__, out)


def _same(a, b):
    if isinstance(a, dict):
        assert set(a) == set(b), (a, b)
        for k in a:
            if isinstance(b[k], float):
                assert np.float32(a[k]) == np.float32(b[k]), (k, a, b)
            else:
                assert a[k] == b[k], (k, a, b)
    elif isinstance(a, tuple):
        assert len(a) == len(b), (a, b)
        for x, y in zip(a, b):
            _same(x, y)
    else:
        assert a == b, (a, b)


def _assert_same(ours, theirs):
    _same(_describe_ours(ours), _describe_torch(theirs))


def _assert_qconfig(ours, theirs):
    for field in ("activation", "weight"):
        _assert_same(getattr(ours, field)(), getattr(theirs, field)())


def _has_histogram():
    try:
        from jaxquant.fake_quant.presets import histogram_observer

        histogram_observer()
        return True
    except (ImportError, AttributeError):
        return False


STATIC_PRESETS = ["default_qconfig", "default_per_channel_qconfig", "default_dynamic_qconfig",
                  "per_channel_dynamic_qconfig", "float16_dynamic_qconfig", "float16_static_qconfig",
                  "float_qparams_weight_only_qconfig", "float_qparams_weight_only_qconfig_4bit",
                  "default_qat_qconfig", "default_qat_qconfig_v2", "default_weight_only_qconfig",
                  "default_activation_only_qconfig", "default_reuse_input_qconfig", "default_dynamic_qat_qconfig",
                  "default_debug_qconfig", "default_symmetric_qnnpack_qat_qconfig",
                  "default_per_channel_symmetric_qnnpack_qat_qconfig", "default_embedding_qat_qconfig"]


@pytest.mark.parametrize("name", STATIC_PRESETS)
def test_presets_match_torch(name):
    _assert_qconfig(getattr(jq, name), getattr(tq, name))


@pytest.mark.parametrize("backend", ["x86", "fbgemm", "qnnpack", "onednn"])
@pytest.mark.parametrize("version", [0, 1])
def test_default_qat_qconfig_matches_torch(backend, version):
    _assert_qconfig(jq.get_default_qat_qconfig(backend, version), tq.get_default_qat_qconfig(backend, version))


@pytest.mark.parametrize("backend", ["x86", "fbgemm", "qnnpack", "onednn"])
def test_default_qconfig_matches_torch(backend):
    if not _has_histogram():
        pytest.skip("HistogramObserver not in the tree yet")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _assert_qconfig(jq.get_default_qconfig(backend), tq.get_default_qconfig(backend))


def test_bfloat16_dynamic_qconfig():
    act, wt = jq.bfloat16_dynamic_qconfig.activation(), jq.bfloat16_dynamic_qconfig.weight()
    assert act.dtype == D.bfloat16 and act.is_dynamic and wt.dtype == D.bfloat16 and not wt.is_dynamic


def test_qconfig_rejects_instances_and_bad_backends():
    with pytest.raises(ValueError, match="QConfig received observer instance"):
        jq.QConfig(activation=jq.default_qconfig.activation(), weight=jq.default_qconfig.weight)
    with pytest.raises(ValueError, match="QConfig received observer instance"):
        jq.QConfig(activation=jq.default_qat_qconfig.activation, weight=jq.default_qat_qconfig.weight())
    with pytest.raises(ValueError, match="not supported"):
        jq.get_default_qat_qconfig("tpu")
    with pytest.raises(ValueError, match="Version number"):
        jq.get_default_qat_qconfig("x86", 2)


def test_qconfig_equals_and_hash():
    a, b = jq.get_default_qat_qconfig("x86"), jq.get_default_qat_qconfig("x86")
    assert jq.qconfig_equals(a, b) and hash(a) == hash(b)
    assert not jq.qconfig_equals(a, jq.get_default_qat_qconfig("qnnpack"))
    assert jq.qconfig_equals(None, None) and not jq.qconfig_equals(a, None)
    assert {a: 1}[b] == 1
