"""Numeric debugger: per-layer SQNR against a hand-computed formula, capture by module path, sensitivity."""
import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxquant as jq
import jaxquant.nn as jqnn
from jaxquant.tools.numeric_debugger import compare, compute_sqnr, quantizable_layers, record_calls, sensitivity_analysis

from .conftest import images, minmax_qconfig


def test_compute_sqnr_by_hand():
    x = np.array([3.0, 4.0])          # ||x|| = 5
    y = np.array([3.0, 4.5])          # ||x - y|| = 0.5
    assert compute_sqnr(x, y) == pytest.approx(20.0)   # 20 log10(10)
    assert compute_sqnr(x, x) == math.inf
    assert compute_sqnr(np.zeros(2), y) == -math.inf
    with pytest.raises(ValueError, match="shapes differ"):
        compute_sqnr(x, np.zeros(3))


def test_compute_sqnr_matches_torch():
    torch = pytest.importorskip("torch")
    from torch.ao.ns.fx.utils import compute_sqnr as torch_sqnr

    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 9)).astype(np.float32)
    y = x + rng.normal(scale=0.05, size=x.shape).astype(np.float32)
    expected = float(torch_sqnr(torch.from_numpy(x), torch.from_numpy(y)))
    assert compute_sqnr(x, y) == pytest.approx(expected, rel=1e-4)


def test_compare_reports_every_matching_layer(cnn_models):
    float_model, _, int8_model = cnn_models
    x = images(4, seed=3)
    result = compare(float_model, int8_model, x)
    by_path = {r.path: r for r in result.layers}
    for path in ("quant", "block1.conv", "block1.pool", "block2.conv", "flatten", "fc1", "fc2", "dequant", ""):
        assert path in by_path, path
    assert by_path["block1.conv"].shape == (4, 28, 28, 8)
    assert by_path["fc2"].quantized_type == "Linear"
    # Recompute fc1's row by hand from independently captured outputs.
    with record_calls(float_model, lambda p, m: p == "fc1") as (rec_f, log_f):
        rec_f(x)
    with record_calls(int8_model, lambda p, m: p == "fc1") as (rec_q, log_q):
        rec_q(x)
    f = np.asarray(log_f.calls[0].output, np.float64)
    q_t = log_q.calls[0].output
    q = (np.asarray(q_t.int_data, np.float64) - float(q_t.q_zero_point())) * float(q_t.q_scale())
    expected = 20 * np.log10(np.sqrt((f ** 2).sum()) / np.sqrt(((f - q) ** 2).sum()))
    assert by_path["fc1"].sqnr_db == pytest.approx(expected, rel=1e-6)
    assert by_path["fc1"].max_abs_error == pytest.approx(np.abs(f - q).max(), rel=1e-6)
    # Quantizing the input alone: error of rounding to the input scale, at most half a step.
    step = float(int8_model.quant.scale.get_value())
    assert by_path["quant"].max_abs_error <= step / 2 * (1 + 1e-5)
    # Modules that exist only in the unfused float graph are reported as skipped, not dropped silently.
    assert ("fc1.linear", "not called in the quantized model") in result.skipped
    text, md = str(result), result.to_markdown()
    assert "block2.conv" in text and md.startswith("| path |")
    fig = result.plot()
    assert len(fig.axes[0].patches) == len(result.layers)


def test_compare_leaves_models_untouched(cnn_models):
    float_model, _, int8_model = cnn_models
    compare(float_model, int8_model, images(2))
    assert type(int8_model.fc1).__name__ == "Linear" and type(float_model.block1.conv).__name__ == "ConvReLU"


class TwoLayer(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(8, 16, rngs=rngs)
        self.relu = jqnn.ReLU()
        self.fc2 = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
        return self.fc2(self.relu(self.fc1(x)))


def test_sensitivity_analysis_one_layer_at_a_time():
    model = TwoLayer(nnx.Rngs(0))
    rng = np.random.default_rng(0)
    data = [jnp.asarray(rng.normal(size=(16, 8)).astype(np.float32)) for _ in range(2)]
    x_eval = jnp.asarray(rng.normal(size=(32, 8)).astype(np.float32))
    reference = np.asarray(model(x_eval))
    seen = []

    def eval_fn(m):
        seen.append(sorted(type(mod).__name__ for _, mod in jq.named_modules(m)))
        return compute_sqnr(reference, np.asarray(m(x_eval)))

    assert quantizable_layers(model) == ["fc1", "fc2"]
    result = sensitivity_analysis(model, minmax_qconfig(), data, eval_fn)
    assert result.float_metric == math.inf
    assert set(result.per_layer) == {"fc1", "fc2"}
    assert all(20 < v < 80 for v in result.per_layer.values())
    # Exactly one quantized Linear per trial, the other left float.
    for names in seen[1:]:
        assert names.count("Linear") == 2  # quantized Linear + float nnx.Linear share the class name
        assert "Quantize" in names and "DeQuantize" in names
    assert "fc1" in result.to_markdown() and len(result.ranked()) == 2
