"""FakeQuantize / FusedMovingAvgObsFakeQuantize / FixedQParamsFakeQuantize against PyTorch, flags, transforms."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant import dtypes as D
from jaxquant.fake_quant import (
    FakeQuantize,
    FixedQParamsFakeQuantize,
    FusedMovingAvgObsFakeQuantize,
    default_fixed_qparams_range_neg1to1_fake_quant,
    disable_fake_quant,
    disable_observer,
    enable_fake_quant,
    enable_observer,
    fake_quantize_per_channel_affine,
    fake_quantize_per_tensor_affine,
    fused_choose_qparams,
)
from jaxquant.observers.minmax import MinMaxObserver, MovingAverageMinMaxObserver
from jaxquant.observers.per_channel import MovingAveragePerChannelMinMaxObserver

CONFIGS = {
    "act": dict(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255, dtype=D.quint8, reduce_range=True),
    "wt": dict(observer=MovingAverageMinMaxObserver, quant_min=-128, quant_max=127, dtype=D.qint8,
               qscheme=D.per_tensor_symmetric),
    "pc": dict(observer=MovingAveragePerChannelMinMaxObserver, quant_min=-128, quant_max=127, dtype=D.qint8,
               qscheme=D.per_channel_symmetric, ch_axis=0),
    "pc127": dict(observer=MovingAveragePerChannelMinMaxObserver, quant_min=-127, quant_max=127, dtype=D.qint8,
                  qscheme=D.per_channel_symmetric, eps=2 ** -12),
}


def _torch_kwargs(torch, kw):
    from torch.ao.quantization import observer as tob

    out = dict(kw)
    out["observer"] = getattr(tob, kw["observer"].__name__)
    out["dtype"] = getattr(torch, kw["dtype"].name)
    if "qscheme" in kw:
        out["qscheme"] = getattr(torch, kw["qscheme"].name)
    return out


def _assert_step_matches(torch, state, y, x, tm):
    """State within one float32 ulp of PyTorch's (XLA may fold a division into a reciprocal multiply
    under jit), and the output exactly PyTorch's fake quantization with our qparams."""
    np.testing.assert_allclose(np.asarray(state.observer.min_val).reshape(-1),
                               tm.activation_post_process.min_val.numpy().reshape(-1), rtol=2.5e-7)
    np.testing.assert_allclose(np.asarray(state.observer.max_val).reshape(-1),
                               tm.activation_post_process.max_val.numpy().reshape(-1), rtol=2.5e-7)
    np.testing.assert_allclose(np.asarray(state.scale).reshape(-1), tm.scale.numpy().reshape(-1), rtol=2.5e-7)
    assert np.abs(np.asarray(state.zero_point).reshape(-1) - tm.zero_point.numpy().reshape(-1)).max() <= 1
    scale = torch.tensor(np.asarray(state.scale).reshape(-1))
    zp = torch.tensor(np.asarray(state.zero_point).reshape(-1))
    if state.scale.ndim:
        ref = torch.fake_quantize_per_channel_affine(torch.tensor(x), scale, zp, 0, tm.quant_min, tm.quant_max)
    else:
        ref = torch.fake_quantize_per_tensor_affine(torch.tensor(x), scale, zp, tm.quant_min, tm.quant_max)
    np.testing.assert_array_equal(np.asarray(y), ref.numpy())


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("fused", [False, True])
def test_matches_torch_over_batches(name, fused):
    torch = pytest.importorskip("torch")
    from torch.ao.quantization import fake_quantize as tfq

    cls, tcls = ((FusedMovingAvgObsFakeQuantize, tfq.FusedMovingAvgObsFakeQuantize) if fused
                 else (FakeQuantize, tfq.FakeQuantize))
    ours = cls(**CONFIGS[name])
    theirs = tcls(**_torch_kwargs(torch, CONFIGS[name]))
    assert (ours.quant_min, ours.quant_max) == (theirs.quant_min, theirs.quant_max)
    rng = np.random.default_rng(len(name))
    state = ours.init((6, 16))
    step = jax.jit(ours.apply)
    for b in range(4):
        x = rng.normal(0.3, 1.0 + b, (6, 16)).astype(np.float32)
        y, state = step(state, x)
        theirs(torch.tensor(x))
        _assert_step_matches(torch, state, y, x, theirs)
    # calculate_qparams is the observer's formula in both (also for the fused variant)
    s, z = ours.calculate_qparams(state)
    ts, tz = theirs.calculate_qparams()
    np.testing.assert_allclose(np.asarray(s).reshape(-1), ts.numpy().reshape(-1), rtol=2.5e-7)
    np.testing.assert_array_equal(np.asarray(z).reshape(-1), tz.numpy().reshape(-1))


def test_fused_qparams_formula_matches_torch_exactly():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    lows = np.concatenate([rng.normal(0, 3, 40), -rng.uniform(1e-7, 1e-5, 10), np.zeros(5), rng.uniform(0.1, 2, 5)])
    highs = lows + np.concatenate([rng.uniform(0, 5, 40), rng.uniform(1e-7, 1e-5, 10), np.zeros(5), rng.uniform(0, 2, 5)])
    for qmin, qmax, sym in [(0, 255, False), (0, 127, False), (-128, 127, True), (-127, 127, True), (0, 255, True)]:
        s, z = fused_choose_qparams(lows.astype(np.float32), highs.astype(np.float32), qmin, qmax, sym)
        for i, (lo, hi) in enumerate(zip(lows.astype(np.float32), highs.astype(np.float32))):
            ts, tz = torch.tensor([1.0]), torch.tensor([0], dtype=torch.int32)
            torch.fused_moving_avg_obs_fake_quant(torch.zeros(1), torch.tensor([0]), torch.tensor([1]),
                                                  torch.tensor([lo]), torch.tensor([hi]), ts, tz, 0.01, qmin, qmax,
                                                  0, False, sym)
            assert np.float32(s[i]) == ts.numpy()[0] and int(z[i]) == int(tz[0]), (lo, hi, qmin, qmax, sym)


def test_flags_toggle_without_retrace():
    fq = FakeQuantize(**CONFIGS["act"])
    traces = []

    @jax.jit
    def step(state, x):
        traces.append(1)
        return fq.apply(state, x)

    x = jnp.linspace(-1, 3, 32, dtype=jnp.float32)
    state = fq.init(x.shape)
    y, state = step(state, x)
    assert not np.array_equal(y, x)  # fake-quantized
    frozen = disable_observer(state)
    y2, s2 = step(frozen, 10 * x)
    np.testing.assert_array_equal(s2.observer.min_val, state.observer.min_val)  # statistics untouched
    np.testing.assert_array_equal(y2, fake_quantize_per_tensor_affine(10 * x, state.scale, state.zero_point, 0, 127))
    y3, s3 = step(disable_fake_quant(state), x)
    np.testing.assert_array_equal(y3, x)
    assert int(s3.observer.num_batches) == 2
    y4, _ = step(enable_fake_quant(enable_observer(disable_fake_quant(frozen))), x)
    assert not np.array_equal(y4, x)
    assert len(traces) == 1


def test_toggles_reach_nested_states_and_vmap_grad():
    fq = FakeQuantize(**CONFIGS["pc"])
    tree = {"a": fq.init((3, 4)), "b": [fq.init((3, 4))]}
    off = disable_observer(tree)
    assert int(off["a"].observer_enabled) == 0 and int(off["b"][0].observer_enabled) == 0
    assert int(off["a"].fake_quant_enabled) == 1
    # vmap over independent tensors, each with its own state
    xs = jnp.stack([jnp.arange(12.0).reshape(3, 4), -jnp.arange(12.0).reshape(3, 4)])
    states = jax.tree_util.tree_map(lambda a: jnp.stack([a, a]), fq.init((3, 4)))
    ys, new = jax.vmap(fq.apply)(states, xs)
    for i in range(2):
        y_i, s_i = fq.apply(fq.init((3, 4)), xs[i])
        np.testing.assert_array_equal(ys[i], y_i)
        np.testing.assert_array_equal(new.scale[i], s_i.scale)
    # straight-through gradient: passes where the unclamped integer is in range. The row maximum
    # sits at max / (max / 127.5) = 127.5 (up to rounding), which may round to 128 and be cut.
    g = jax.grad(lambda x: jnp.sum(fq.apply(fq.init((3, 4)), x)[0]))(xs[0])
    _, st = fq.apply(fq.init((3, 4)), xs[0])
    q = np.round(np.asarray(xs[0]) * (np.float32(1) / np.asarray(st.scale))[:, None])
    np.testing.assert_array_equal(g, ((q >= -128) & (q <= 127)).astype(np.float32))


def test_fixed_qparams_fake_quantize():
    fq = default_fixed_qparams_range_neg1to1_fake_quant()
    assert isinstance(fq, FixedQParamsFakeQuantize)
    state = fq.init()
    x = jnp.array([-2.0, -1.0, -0.5, 0.004, 0.99, 2.0], jnp.float32)
    y, state2 = fq.apply(state, x)
    # scale 2/256, zero point 128: q = clamp(round(x * 128) + 128, 0, 255)
    expected = (np.clip(np.round(np.asarray(x) * 128) + 128, 0, 255) - 128) * (2 / 256)
    np.testing.assert_array_equal(y, expected.astype(np.float32))
    s, z = fq.calculate_qparams(state2)
    assert float(s) == 2 / 256 and int(z) == 128
    with pytest.raises(TypeError, match="FixedQParamsObserver"):
        FixedQParamsFakeQuantize(observer=MinMaxObserver)


def test_config_errors_and_hashability():
    with pytest.raises(ValueError, match="less than or equal"):
        FakeQuantize(MovingAverageMinMaxObserver, quant_min=10, quant_max=0)
    with pytest.raises(ValueError, match="out of bound"):
        FakeQuantize(MovingAverageMinMaxObserver, quant_min=-128, quant_max=127)  # default dtype quint8
    with pytest.raises(TypeError, match="instance"):
        FakeQuantize(MovingAverageMinMaxObserver())
    with pytest.raises(TypeError, match="only works with MovingAverage"):
        FusedMovingAvgObsFakeQuantize(MinMaxObserver)
    with pytest.raises(ValueError, match="example_or_shape"):
        FakeQuantize(**CONFIGS["pc"]).init()
    a, b = FakeQuantize(**CONFIGS["wt"]), FakeQuantize(**CONFIGS["wt"])
    assert a == b and hash(a) == hash(b)
    assert FakeQuantize.with_args(**CONFIGS["wt"]) == FakeQuantize.with_args(**CONFIGS["wt"])
    assert dataclasses.is_dataclass(a.init())


def test_per_channel_float_qparams_embedding_fake_quant():
    from jaxquant.fake_quant import default_embedding_fake_quant

    fq = default_embedding_fake_quant()
    w = jnp.asarray(np.random.default_rng(0).normal(size=(10, 8)).astype(np.float32))
    y, state = fq.apply(fq.init(w.shape), w)
    assert state.zero_point.dtype == jnp.float32 and state.scale.shape == (10,)
    np.testing.assert_array_equal(y, fake_quantize_per_channel_affine(w, state.scale, state.zero_point, 0, 0, 255))
    # min and max of each row are representable: error at most half a step
    assert np.all(np.abs(np.asarray(y - w)) <= np.asarray(state.scale)[:, None] * 0.5 + 1e-6)
