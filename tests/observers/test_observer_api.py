"""The observer contract: hashable configs, pure jittable/vmappable updates without retracing,
NaN/Inf recorded in state, clear errors."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant.observers as jo
from jaxquant import dtypes as D

PER_TENSOR = [jo.MinMaxObserver(), jo.MovingAverageMinMaxObserver(), jo.HistogramObserver(bins=64)]
PER_CHANNEL = [jo.PerChannelMinMaxObserver(dtype=D.qint8, qscheme=D.per_channel_symmetric),
               jo.MovingAveragePerChannelMinMaxObserver()]
ALL = PER_TENSOR + PER_CHANNEL


def test_configs_are_hashable_and_factories_chain():
    a = jo.MinMaxObserver(dtype=D.qint8)
    assert a == jo.MinMaxObserver(dtype=D.qint8) and hash(a) == hash(jo.MinMaxObserver(dtype=D.qint8))
    f = jo.MinMaxObserver.with_args(dtype=D.qint8).with_args(qscheme=D.per_tensor_symmetric)
    assert hash(f) == hash(jo.MinMaxObserver.with_args(qscheme=D.per_tensor_symmetric, dtype=D.qint8))
    obs = f(reduce_range=True)
    assert (obs.dtype, obs.qscheme, obs.reduce_range) == (D.qint8, D.per_tensor_symmetric, True)
    assert f() is not f() and f() == f()
    assert jo.as_observer(jo.default_weight_observer) == jo.MinMaxObserver(dtype=D.qint8, qscheme=D.per_tensor_symmetric)
    assert jo.as_observer(jo.MinMaxObserver) == jo.MinMaxObserver()
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.dtype = D.quint8


def test_effective_range_matches_pytorch_rules():
    assert jo.MinMaxObserver().quant_range == (0, 255)
    assert jo.MinMaxObserver(reduce_range=True).quant_range == (0, 127)
    assert jo.MinMaxObserver(dtype=D.qint8, reduce_range=True).quant_range == (-64, 63)
    assert jo.MinMaxObserver(dtype=D.qint8, quant_min=-8, quant_max=7, reduce_range=True).quant_range == (-4, 3)
    assert jo.MinMaxObserver(dtype=D.qint4).quant_range == (-8, 7)


def make_state(obs, shape=(4, 6)):
    return obs.init(shape)


@pytest.mark.parametrize("obs", ALL, ids=lambda o: type(o).__name__)
def test_jit_without_retracing(obs):
    traces = []

    @jax.jit
    def step(state, x):
        traces.append(1)
        return obs.update(state, x)

    state = make_state(obs)
    rng = np.random.default_rng(0)
    for _ in range(5):
        state = step(state, rng.standard_normal((4, 6)).astype(np.float32))
    assert len(traces) == 1
    scale, zp = jax.jit(obs.calculate_qparams)(state)
    assert np.all(np.isfinite(np.asarray(scale))) and zp.dtype == jnp.int32


@pytest.mark.parametrize("obs", ALL, ids=lambda o: type(o).__name__)
def test_vmap_over_independent_states_equals_separate_runs(obs):
    rng = np.random.default_rng(1)
    xs = (rng.standard_normal((3, 2, 4, 6)) * np.array([1.0, 10.0, 0.1])[:, None, None, None]).astype(np.float32)
    states = jax.tree_util.tree_map(lambda a: jnp.stack([a] * 3), make_state(obs))
    vupdate = jax.jit(jax.vmap(obs.update))
    for b in range(2):
        states = vupdate(states, xs[:, b])
    v_scale, v_zp = jax.jit(jax.vmap(obs.calculate_qparams))(states)
    for i in range(3):
        s = make_state(obs)
        for b in range(2):
            s = obs.update(s, xs[i, b])
        scale, zp = obs.calculate_qparams(s)
        np.testing.assert_array_equal(np.asarray(v_scale[i]), np.asarray(scale))
        np.testing.assert_array_equal(np.asarray(v_zp[i]), np.asarray(zp))


@pytest.mark.parametrize("obs", ALL, ids=lambda o: type(o).__name__)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_is_flagged_ignored_and_raises_on_concrete_qparams(obs, bad):
    x = np.linspace(-1, 2, 24, dtype=np.float32).reshape(4, 6)
    clean = jax.jit(obs.update)(make_state(obs), x)
    y = x.copy()
    y[1, 2] = bad
    state = jax.jit(obs.update)(make_state(obs), y)
    assert bool(state.nonfinite)
    assert np.all(np.isfinite(np.asarray(state.min_val))) and np.all(np.isfinite(np.asarray(state.max_val)))
    with pytest.raises(jo.NotCalibratedError, match=r"NaN/Inf.*clean the calibration data") as e:
        obs.calculate_qparams(state)
    assert type(obs).__name__ in str(e.value)
    with pytest.raises(jo.NotCalibratedError, match="layer1.conv"):
        jo.check_observer_state(obs, state, name="layer1.conv")
    # under jit nothing raises and nothing is NaN
    scale, _ = jax.jit(obs.calculate_qparams)(state)
    assert np.all(np.isfinite(np.asarray(scale)))
    assert not bool(clean.nonfinite)


@pytest.mark.parametrize("obs", ALL, ids=lambda o: type(o).__name__)
def test_qparams_before_data(obs):
    state = make_state(obs)
    with pytest.raises(jo.NotCalibratedError, match="has not observed any data; call it on representative data"):
        obs.calculate_qparams(state)
    scale, zp = jax.jit(obs.calculate_qparams)(state)  # PyTorch's defaults, never NaN
    np.testing.assert_array_equal(np.asarray(scale), np.ones_like(np.asarray(scale)))
    np.testing.assert_array_equal(np.asarray(zp), np.zeros_like(np.asarray(zp)))


@pytest.mark.parametrize("make,match", [
    (lambda: jo.MinMaxObserver(qscheme=D.per_channel_affine), "use PerChannelMinMaxObserver"),
    (lambda: jo.PerChannelMinMaxObserver(qscheme=D.per_tensor_affine), "use MinMaxObserver"),
    (lambda: jo.MinMaxObserver(qscheme=D.per_tensor_symmetric, reduce_range=True), "cannot reduce range"),
    (lambda: jo.PerChannelMinMaxObserver(qscheme=D.per_channel_symmetric, reduce_range=True), "cannot reduce range"),
    (lambda: jo.MinMaxObserver(quant_min=1, quant_max=10), "must include 0"),
    (lambda: jo.MinMaxObserver(dtype=D.qint8, quant_min=0, quant_max=0), "strictly less"),
    (lambda: jo.MinMaxObserver(dtype=D.qint8, quant_min=-200, quant_max=100), "does not fit"),
    (lambda: jo.MinMaxObserver(quant_min=0), "give both quant_min and quant_max"),
    (lambda: jo.MinMaxObserver(dtype=D.float16), "not a quantized dtype"),
    (lambda: jo.HistogramObserver(qscheme=D.per_channel_affine), "per channel"),
    (lambda: jo.HistogramObserver(is_dynamic=True), "dynamic"),
    (lambda: jo.PerChannelMinMaxObserver(is_dynamic=True), "dynamic"),
    (lambda: jo.MovingAverageMinMaxObserver(is_dynamic=True), "averaging_constant=1"),
    (lambda: jo.FixedQParamsObserver(scale=0.1, zero_point=300), "outside"),
])
def test_invalid_configs(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_per_channel_needs_shape_and_checks_channels():
    obs = jo.PerChannelMinMaxObserver()
    with pytest.raises(ValueError, match="needs an example array or its shape"):
        obs.init()
    with pytest.raises(ValueError, match="re-run init"):
        obs.update(obs.init((4, 6)), np.zeros((5, 6), np.float32))


def test_placeholder_like_observers_refuse_qparams_and_fixed_returns_config():
    for obs in [jo.PlaceholderObserver(), jo.NoopObserver(), jo.ReuseInputObserver(), jo.default_dynamic_quant_observer()]:
        state = obs.update(obs.init(), jnp.ones(3))
        assert int(state.num_batches) == 1
        with pytest.raises(NotImplementedError, match=type(obs).__name__):
            obs.calculate_qparams(state)
    fixed = jo.default_fixed_qparams_range_neg1to1_observer()
    s, z = fixed.calculate_qparams(fixed.init())
    assert float(s) == 2.0 / 256.0 and int(z) == 128 and s.dtype == jnp.float32 and z.dtype == jnp.int32


def test_recording_observer_keeps_last_capacity_inputs():
    obs = jo.RecordingObserver(capacity=3)
    step = jax.jit(obs.update)
    state = obs.init((2,))
    for i in range(5):
        state = step(state, jnp.full((2,), float(i)))
    got = [float(v[0]) for v in obs.get_tensor_value(state)]
    assert got == [2.0, 3.0, 4.0]
    with pytest.raises(NotImplementedError):
        obs.calculate_qparams(state)


def test_empty_input_leaves_state_unchanged():
    obs = jo.MinMaxObserver()
    s = obs.update(obs.init(), jnp.ones(3))
    s2 = obs.update(s, jnp.zeros((0,)))
    assert int(s2.num_batches) == 1


def test_minmax_hand_worked_example():
    # x in [-1, 3]: scale = 4 / 255, zero point = 0 - round(-1 / scale) = round(63.75) = 64
    obs = jo.MinMaxObserver()
    scale, zp = obs.calculate_qparams(obs.update(obs.init(), jnp.array([-1.0, 0.5, 3.0])))
    assert float(scale) == float(np.float32(4.0) / np.float32(255.0)) and int(zp) == 64
    # symmetric quint8: zero point 128, scale = 2 * max|x| / 255
    obs = jo.MinMaxObserver(qscheme=D.per_tensor_symmetric)
    scale, zp = obs.calculate_qparams(obs.update(obs.init(), jnp.array([-1.0, 3.0])))
    assert float(scale) == float(np.float32(3.0) / np.float32(127.5)) and int(zp) == 128
