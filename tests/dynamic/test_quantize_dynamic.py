"""quantize_dynamic against torch.ao.quantization.quantize_dynamic (x86 engine) on the same weights
and inputs, plus hand-checked numerics, errors and jit behaviour.

Bounds: with identical int8 weights and identical activation qparams the integer accumulators are
identical, so outputs differ only by float32 rounding in ``acc * (x_scale * w_scale) + bias``
(a few ulp). PyTorch picks the activation zero point in float64, we in float32 (see
``jaxquant/choose_qparams.py``): in a rare tie one element's quantized value may differ by one
step, moving one output by at most ``x_scale * w_scale * max|w_q| <= x_scale * max|w|``. The
asserts use that one-step bound, computed from the data, not a guessed tolerance.
"""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxquant.nn as jqnn
from jaxquant import bfloat16, float16, qint8, quint8
from jaxquant import qconfig as qc
from jaxquant.choose_qparams import choose_qparams
from jaxquant.nn import dynamic as nnqd
from jaxquant.native import use_native
from jaxquant.nn.intrinsic import LinearReLU
from jaxquant.transforms.quantize_dynamic import get_default_dynamic_quant_module_mappings, quantize_dynamic

torch = pytest.importorskip("torch")
torch.backends.quantized.engine = "x86"
warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")


def _mlp_pair(seed=0, k=16, h=32, n=8):
    torch.manual_seed(seed)
    tm = torch.nn.Sequential(torch.nn.Linear(k, h), torch.nn.ReLU(), torch.nn.Linear(h, n))
    jm = nnx.Sequential(nnx.Linear(k, h, rngs=nnx.Rngs(0)), jqnn.ReLU(), nnx.Linear(h, n, rngs=nnx.Rngs(0)))
    for i in (0, 2):
        jm.layers[i].kernel.set_value(jnp.asarray(tm[i].weight.detach().numpy().T))
        jm.layers[i].bias.set_value(jnp.asarray(tm[i].bias.detach().numpy()))
    return tm, jm


@nnx.jit
def run(model, x):
    """One compiled program per model structure: eager op-by-op dispatch is much slower to warm up."""
    return model(x)


def _one_step_bound(x, w_float):
    """One activation quantization step (reduce_range: 127 levels) times the largest |w| column sum
    is the most one differing activation integer can move an output."""
    scale, _ = choose_qparams(jnp.asarray(x), quint8, reduce_range=True)
    return float(scale) * float(np.abs(w_float).max()) + 1e-6


@pytest.mark.parametrize("qconfig_name", ["default_dynamic_qconfig", "per_channel_dynamic_qconfig"])
def test_mlp_matches_torch(qconfig_name):
    tm, jm = _mlp_pair()
    tqc = getattr(torch.ao.quantization, qconfig_name)
    tq = torch.ao.quantization.quantize_dynamic(tm, {torch.nn.Linear: tqc}, dtype=torch.qint8)
    jq = quantize_dynamic(jm, {nnx.Linear: getattr(qc, qconfig_name)})
    for i in (0, 2):
        tw = tq[i].weight()
        jw = jq.layers[i].weight()
        if qconfig_name.startswith("per_channel"):
            # PerChannelMinMaxObserver's symmetric scale is still 1 ulp off PyTorch's for some channels
            # (XLA rewrites x / 127.5 into x * (1 / 127.5); jaxquant/torch_numerics.true_divide is the
            # fix), which can move a rounding tie by one integer step.
            np.testing.assert_allclose(np.asarray(jw.q_per_channel_scales()),
                                       tw.q_per_channel_scales().numpy().astype(np.float32), rtol=2e-7)
            diff = np.asarray(jw.int_repr(), np.int32) - tw.int_repr().numpy().T
            assert np.abs(diff).max() <= 1 and np.mean(diff != 0) < 0.02
        else:
            np.testing.assert_array_equal(np.asarray(jw.int_repr()), tw.int_repr().numpy().T)
            assert float(jw.q_scale()) == np.float32(tw.q_scale())
    x = np.random.default_rng(1).normal(size=(6, 16)).astype(np.float32) * 3
    yt = tq(torch.from_numpy(x)).detach().numpy()
    yj = np.asarray(run(jq, jnp.asarray(x)))
    h = np.maximum(x @ np.asarray(jm.layers[0].kernel.get_value()) + np.asarray(jm.layers[0].bias.get_value()), 0)
    bound = (_one_step_bound(x, jm.layers[0].kernel.get_value()) * 32 * 2  # through layer 2's |W| sum
             + _one_step_bound(h, jm.layers[2].kernel.get_value()))
    err = np.abs(yt - yj).max()
    assert err <= bound, (err, bound)
    if not qconfig_name.startswith("per_channel"):  # same weights: identical up to float rounding
        assert err <= 1e-5 * max(1.0, np.abs(yt).max())
        # the quantized model must really differ from float (else the test could not fail)
        yf = np.asarray(run(jm, jnp.asarray(x)))
        assert np.abs(yf - yj).max() > 10 * err


def test_dynamic_linear_hand_computed():
    """One layer written out in numpy: fbgemm's dynamic pipeline with reduce_range (levels 0..127)."""
    rng = np.random.default_rng(3)
    w = rng.normal(size=(5, 4)).astype(np.float32)
    b = rng.normal(size=(4,)).astype(np.float32)
    x = rng.normal(size=(3, 5)).astype(np.float32)
    lin = nnx.Linear(5, 4, rngs=nnx.Rngs(0))
    lin.kernel.set_value(jnp.asarray(w)); lin.bias.set_value(jnp.asarray(b))
    q = nnqd.Linear.from_float(lin, qc.default_dynamic_qconfig, "lin")
    ws = np.float32(np.abs(w).max() / np.float32(127.5))
    wq = np.clip(np.round(w * (np.float32(1) / ws)), -128, 127)
    lo, hi = min(x.min(), 0), max(x.max(), 0)
    xs = np.float32((np.float64(hi) - lo) / 127)
    zp = np.clip(np.round(0 - lo / xs), 0, 127)
    xq = np.clip(np.round(x * (np.float32(1) / xs) + zp), 0, 127)
    ref = ((xq - zp) @ wq).astype(np.float32) * (xs * ws) + b
    np.testing.assert_allclose(np.asarray(q(jnp.asarray(x))), ref, rtol=1e-6, atol=1e-6)


def test_per_token_is_more_accurate_and_runs_per_row():
    rng = np.random.default_rng(0)
    lin = nnx.Linear(64, 32, rngs=nnx.Rngs(0))
    x = rng.normal(size=(8, 64)).astype(np.float32) * np.logspace(-2, 1, 8, dtype=np.float32)[:, None]
    yf = np.asarray(lin(jnp.asarray(x)))
    per_tensor = quantize_dynamic(nnx.Sequential(lin))
    per_token = quantize_dynamic(nnx.Sequential(lin), per_token=True)
    assert per_token.layers[0].per_token and not per_tensor.layers[0].per_token
    e_tensor = np.abs(np.asarray(per_tensor(jnp.asarray(x))) - yf)[:4].max()
    e_token = np.abs(np.asarray(per_token(jnp.asarray(x))) - yf)[:4].max()
    assert e_token < e_tensor / 4  # small rows get their own scale
    # each row alone equals a per-tensor call on that row
    for r in (0, 7):
        np.testing.assert_allclose(np.asarray(per_token(jnp.asarray(x)))[r],
                                   np.asarray(per_tensor(jnp.asarray(x[r:r + 1])))[0], rtol=1e-6, atol=1e-6)


def _torch_lstm_to_flax(tl, cell, h):
    wih, whh = tl.weight_ih.detach().numpy(), tl.weight_hh.detach().numpy()
    b = (tl.bias_ih + tl.bias_hh).detach().numpy()
    for g, (li, lh) in enumerate([("ii", "hi"), ("if_", "hf"), ("ig", "hg"), ("io", "ho")]):
        getattr(cell, li).kernel.set_value(jnp.asarray(wih[g * h:(g + 1) * h].T))
        getattr(cell, lh).kernel.set_value(jnp.asarray(whh[g * h:(g + 1) * h].T))
        getattr(cell, lh).bias.set_value(jnp.asarray(b[g * h:(g + 1) * h]))


@pytest.mark.slow  # ~30 s on a loaded 2-core machine, mostly XLA compiles
def test_lstm_cell_matches_torch_dynamic_lstm_cell():
    """Per step, PyTorch's dynamic LSTMCell quantizes x and h with their own scales, as ours does."""
    I, H, B, T = 12, 16, 3, 6
    torch.manual_seed(0)
    tl = torch.nn.LSTMCell(I, H)
    cell = nnx.LSTMCell(I, H, rngs=nnx.Rngs(0))
    _torch_lstm_to_flax(tl, cell, H)
    tq = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(tl), {torch.nn.LSTMCell}, dtype=torch.qint8)[0]
    jq = quantize_dynamic(nnx.Sequential(cell)).layers[0]
    assert isinstance(jq, nnqd.LSTMCell)
    tw_ih = torch.ops.quantized.linear_unpack(tq._packed_weight_ih)[0]
    np.testing.assert_array_equal(np.asarray(jq.dense_i.weight().int_repr()), tw_ih.int_repr().numpy().T)
    xs = np.random.default_rng(0).normal(size=(T, B, I)).astype(np.float32)
    ht = ct = torch.zeros(B, H)
    carry = jq.initialize_carry((B, I))
    for t in range(T):
        ht, ct = tq(torch.from_numpy(xs[t]), (ht, ct))
        carry, y = jq(carry, jnp.asarray(xs[t]))
        np.testing.assert_allclose(np.asarray(y), ht.detach().numpy(), atol=2e-5)
        np.testing.assert_allclose(np.asarray(carry[0]), ct.detach().numpy(), atol=2e-5)


@pytest.mark.slow  # ~30 s on a loaded 2-core machine, mostly XLA compiles
def test_gru_cell_matches_torch():
    I, H, B, T = 10, 8, 2, 5
    torch.manual_seed(1)
    tg = torch.nn.GRUCell(I, H)
    with torch.no_grad():
        tg.bias_hh.zero_()  # flax's GRUCell has no hidden bias
    cell = nnx.GRUCell(I, H, rngs=nnx.Rngs(0))
    cell.dense_i.kernel.set_value(jnp.asarray(tg.weight_ih.detach().numpy().T))
    cell.dense_i.bias.set_value(jnp.asarray(tg.bias_ih.detach().numpy()))
    cell.dense_h.kernel.set_value(jnp.asarray(tg.weight_hh.detach().numpy().T))
    tq = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(tg), {torch.nn.GRUCell}, dtype=torch.qint8)[0]
    jq = quantize_dynamic(nnx.Sequential(cell)).layers[0]
    assert isinstance(jq, nnqd.GRUCell)
    xs = np.random.default_rng(2).normal(size=(T, B, I)).astype(np.float32)
    ht = torch.zeros(B, H)
    h = jq.initialize_carry((B, I))
    for t in range(T):
        ht = tq(torch.from_numpy(xs[t]), ht)
        h, _ = jq(h, jnp.asarray(xs[t]))
        np.testing.assert_allclose(np.asarray(h), ht.detach().numpy(), atol=2e-5)


@pytest.mark.slow  # ~30 s on a loaded 2-core machine, mostly XLA compiles
def test_optimized_lstm_cell_in_rnn_and_jit_no_retrace():
    cell = nnx.OptimizedLSTMCell(6, 8, rngs=nnx.Rngs(0))
    model = nnx.Sequential(nnx.RNN(cell), nnx.Linear(8, 3, rngs=nnx.Rngs(1)))
    q = quantize_dynamic(model)
    assert isinstance(q.layers[0].cell, nnqd.LSTMCell) and isinstance(q.layers[1], nnqd.Linear)
    traces = []

    @nnx.jit
    def f(m, x):
        traces.append(1)
        return m(x)

    x = jax.random.normal(jax.random.key(0), (2, 5, 6))
    y1 = f(q, x)
    y2 = f(q, x + 1.0)
    assert len(traces) == 1
    assert y1.shape == (2, 5, 3) and y2.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y1), np.asarray(nnx.clone(q)(x)), atol=1e-6)
    # int8 really runs: the lowered pure-XLA module has a u8 x s8 dot (the native backend would
    # replace the Linear's dot with a custom call, tests/native)
    graphdef, state = nnx.split(q)
    with use_native(False):
        hlo = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, x).as_text()
    assert "ui8" in hlo and "i8" in hlo and "dot_general" in hlo


def test_embedding_matches_torch_quantized_embedding():
    torch.manual_seed(0)
    te = torch.nn.Embedding(50, 24)
    te.qconfig = torch.ao.quantization.float_qparams_weight_only_qconfig
    tq = torch.ao.nn.quantized.Embedding.from_float(te)
    emb = nnx.Embed(50, 24, rngs=nnx.Rngs(0))
    emb.embedding.set_value(jnp.asarray(te.weight.detach().numpy()))
    jq = quantize_dynamic(nnx.Sequential(emb), dtype=quint8).layers[0]
    assert isinstance(jq, nnqd.Embedding)
    tw, jw = tq.weight(), jq.weight()
    np.testing.assert_array_equal(np.asarray(jw.int_repr()), tw.int_repr().numpy())
    # scales: equal up to 1 ulp until the observer divides exactly (see test_mlp_matches_torch)
    np.testing.assert_allclose(np.asarray(jw.q_per_channel_scales()), tw.q_per_channel_scales().numpy(),
                               rtol=2.5e-7)
    np.testing.assert_allclose(np.asarray(jw.q_per_channel_zero_points()),
                               tw.q_per_channel_zero_points().numpy(), rtol=1e-6, atol=1e-5)
    idx = np.random.default_rng(0).integers(0, 50, size=(4, 7))
    yt = tq(torch.from_numpy(idx)).numpy()
    yj = np.asarray(jq(jnp.asarray(idx)))
    # fma(q, scale, bias) cancels near 0, so compare in ulps of the row's magnitude: 1-ulp scale
    # differences (observer division, see above) move q * scale by at most ~1 ulp of the row max
    row_mag = np.abs(te.weight.detach().numpy()).max(axis=1)[idx][..., None]
    assert np.all(np.abs(yt - yj) <= 4 * np.spacing(row_mag))  # 255*ulp(scale) ~ 2 ulp(range), bias 1, rounding 1
    # and 8-bit per-row error vs float is at most half a step per row
    steps = np.asarray(jw.q_per_channel_scales())[idx][..., None]
    assert np.all(np.abs(yj - te.weight.detach().numpy()[idx]) <= 0.5 * steps + 1e-6)


def test_float16_linear_matches_torch():
    tm, jm = _mlp_pair(seed=2)
    with torch.no_grad():
        tm[0].weight[0, 0] = 1e5  # saturates to the float16 max in both
    jm.layers[0].kernel.set_value(jnp.asarray(tm[0].weight.detach().numpy().T))
    tq = torch.ao.quantization.quantize_dynamic(tm, {torch.nn.Linear}, dtype=torch.float16)
    jq = quantize_dynamic(jm, {nnx.Linear}, dtype=float16)
    assert isinstance(jq.layers[0], nnqd.Float16Linear)
    assert jq.layers[0].kernel.get_value().dtype == jnp.float16
    assert float(jq.layers[0].kernel.get_value()[0, 0]) == 65504.0
    x = np.random.default_rng(0).normal(size=(4, 16)).astype(np.float32)
    yt = tq(torch.from_numpy(x)).detach().numpy()
    yj = np.asarray(run(jq, jnp.asarray(x)))
    np.testing.assert_allclose(yj, yt, rtol=1e-5, atol=1e-3)


@pytest.mark.slow  # ~30 s on a loaded 2-core machine, mostly XLA compiles
def test_bfloat16_variant_and_lstm_float16():
    model = nnx.Sequential(nnx.RNN(nnx.LSTMCell(4, 8, rngs=nnx.Rngs(0))), nnx.Linear(8, 2, rngs=nnx.Rngs(1)))
    x = jax.random.normal(jax.random.key(1), (2, 3, 4))
    yf = np.asarray(run(model, x))
    qb = quantize_dynamic(model, dtype=bfloat16)
    assert isinstance(qb.layers[1], nnqd.BFloat16Linear)
    assert qb.layers[1].kernel.get_value().dtype == jnp.bfloat16
    assert qb.layers[0].cell.dense_i.kernel.get_value().dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(run(qb, x)), yf, atol=5e-2)
    qh = quantize_dynamic(model, dtype=float16)
    assert isinstance(qh.layers[0].cell.dense_h, nnqd.Float16Linear)
    np.testing.assert_allclose(np.asarray(run(qh, x)), yf, atol=2e-3)


def test_linear_relu_and_spec_forms():
    lin = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
    model = nnx.Sequential(LinearReLU(lin, jqnn.ReLU()), nnx.Linear(4, 2, rngs=nnx.Rngs(1)))
    q = quantize_dynamic(model)
    assert q.layers[0].relu and not q.layers[1].relu
    x = jax.random.normal(jax.random.key(0), (3, 4)) * 2
    assert float(jnp.min(q.layers[0](x))) >= 0.0
    # dict by path: only layers.1, per channel
    q2 = quantize_dynamic(model, {"layers.1": qc.per_channel_dynamic_qconfig})
    assert isinstance(q2.layers[0], LinearReLU) and isinstance(q2.layers[1], nnqd.Linear)
    assert q2.layers[1].weight().axis == 1
    # a path entry of None beats the type entry
    q3 = quantize_dynamic(model, {nnx.Linear: qc.default_dynamic_qconfig, LinearReLU: qc.default_dynamic_qconfig,
                                  "layers.0": None})
    assert isinstance(q3.layers[0], LinearReLU) and isinstance(q3.layers[1], nnqd.Linear)
    # the input model is untouched; inplace edits it
    assert isinstance(model.layers[1], nnx.Linear)
    out = quantize_dynamic(model, inplace=True)
    assert out is model and isinstance(model.layers[1], nnqd.Linear)


def test_errors():
    model = nnx.Sequential(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), nnx.Embed(10, 4, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"layers\.0.*quint8"):
        quantize_dynamic(model, {nnx.Linear}, dtype=quint8)
    with pytest.raises(ValueError, match=r"layers\.1.*qint8"):
        quantize_dynamic(model, {nnx.Embed}, dtype=qint8)
    with pytest.raises(TypeError, match="neither a module type nor"):
        quantize_dynamic(model, {3: qc.default_dynamic_qconfig})
    with pytest.raises(TypeError, match="must be a QConfig"):
        quantize_dynamic(model, {nnx.Linear: "int8"})
    with pytest.raises(KeyError, match="layers.7"):
        quantize_dynamic(model, {"layers.7": qc.default_dynamic_qconfig})
    with pytest.raises(TypeError, match="qconfig_spec must be"):
        quantize_dynamic(model, 5)
    with pytest.raises(ValueError, match="unknown dtype|default settings"):
        quantize_dynamic(model, None, dtype=jnp.int16)
    with pytest.raises(ValueError, match="expects 4|input has 5"):
        quantize_dynamic(model).layers[0](jnp.ones((2, 5)))
    nan_model = nnx.Sequential(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
    nan_model.layers[0].kernel.set_value(jnp.array([[jnp.nan, 0.0], [1.0, 1.0]]))
    with pytest.raises(ValueError, match=r"layers\.0.*NaN"):
        quantize_dynamic(nan_model)
    conv_only = nnx.Sequential(nnx.Conv(1, 2, (3, 3), rngs=nnx.Rngs(0)))
    with pytest.warns(UserWarning, match="Conv"):
        same = quantize_dynamic(conv_only)
    assert isinstance(same.layers[0], nnx.Conv)


def test_default_mapping_is_read_only():
    m = get_default_dynamic_quant_module_mappings()
    assert m[nnx.Linear] is nnqd.Linear and m[nnx.Embed] is nnqd.Embedding
    with pytest.raises(TypeError):
        m[nnx.Conv] = nnqd.Linear
