"""PercentileObserver and MSEObserver against numpy references (np.percentile, hand-computed MSE)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant import dequantize, qint8, quantize_per_channel, quantize_per_tensor, quint8
from jaxquant.dtypes import per_channel_symmetric, per_tensor_affine, per_tensor_symmetric
from jaxquant.observers import (
    MinMaxObserver,
    MSEObserver,
    NotCalibratedError,
    PercentileObserver,
    PerChannelMinMaxObserver,
    check_observer_state,
)


def _feed(obs, batches, init_arg=None, jit=True):
    update = jax.jit(obs.update) if jit else obs.update  # jit: one compile instead of many eager ops
    state = obs.init(init_arg)
    for b in batches:
        state = update(state, jnp.asarray(b))
    return state


def _outlier_data(seed=0, n=200_000):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n).astype(np.float32)
    x[:5] = [60.0, -45.0, 38.0, 52.0, -70.0]  # rare outliers that own min/max
    return rng.permutation(x)


def _mse_numpy(x, scale, zp, dtype):
    deq = np.asarray(dequantize(quantize_per_tensor(x, scale, zp, dtype)))
    return float(np.mean((deq.astype(np.float64) - x.astype(np.float64)) ** 2))


# ---- PercentileObserver -------------------------------------------------------------------------


@pytest.mark.parametrize("qscheme,dtype", [(per_tensor_affine, quint8), (per_tensor_symmetric, qint8)])
def test_percentile_100_equals_minmax(qscheme, dtype):
    rng = np.random.default_rng(1)
    batches = [rng.normal(0.3, 2.0, (64, 33)).astype(np.float32) for _ in range(3)]
    batches[1][0, 0] = 9.5  # range grows between batches
    p = PercentileObserver(percentile=100.0, qscheme=qscheme, dtype=dtype)
    m = MinMaxObserver(qscheme=qscheme, dtype=dtype)
    sp, sm = _feed(p, batches), _feed(m, batches)
    lo, hi = p.percentile_range(sp)
    width = float(sm.max_val - sm.min_val) / p.bins
    # bound: the CDF end points sit within one bin width of the data's min and max
    assert abs(float(lo) - float(sm.min_val)) <= width
    assert abs(float(hi) - float(sm.max_val)) <= width
    (s1, z1), (s2, z2) = p.calculate_qparams(sp), m.calculate_qparams(sm)
    qmin, qmax = m.quant_range
    # one bin width of range moves the scale by at most width / (qmax - qmin)
    assert abs(float(s1) - float(s2)) <= width / (qmax - qmin) + 1e-7
    assert abs(int(z1) - int(z2)) <= 1


@pytest.mark.parametrize("percentile", [99.9, 99.0])
def test_percentile_with_outliers_matches_np_percentile(percentile):
    x = _outlier_data()
    obs = PercentileObserver(percentile=percentile)
    state = _feed(obs, [x])
    lo, hi = (float(v) for v in obs.percentile_range(state))
    width = (float(x.max()) - float(x.min())) / obs.bins
    xs = np.sort(x.astype(np.float64))
    for q, got in ((100.0 - percentile, lo), (percentile, hi)):
        ref = float(np.percentile(x.astype(np.float64), q))
        rank = q / 100.0 * x.size
        k = int(np.clip(np.floor(rank), 1, x.size - 2))
        gap = xs[k + 1] - xs[k - 1]  # spacing of the order statistics around the rank (dense here)
        assert gap < 0.1 * width
        assert abs(got - ref) <= width + gap, (q, got, ref, width)
    # much tighter than min/max (outliers span [-70, 60]; the normal bulk |x| < ~3.3 at 99.9)
    assert hi - lo < 0.1 * (float(x.max()) - float(x.min()))
    scale, zp = obs.calculate_qparams(state)
    ref_scale = np.float32(max(hi, 0.0) - min(lo, 0.0)) / np.float32(255)
    np.testing.assert_allclose(float(scale), ref_scale, rtol=1e-6)
    assert int(zp) == int(np.clip(0 - np.round(np.float32(min(lo, 0.0)) / np.float32(scale)), 0, 255))


def test_percentile_rejects_bad_config():
    with pytest.raises(ValueError, match="PercentileObserver: percentile"):
        PercentileObserver(percentile=30.0)
    with pytest.raises(ValueError, match="per channel"):
        PercentileObserver(qscheme=per_channel_symmetric)


# ---- MSEObserver --------------------------------------------------------------------------------


@pytest.mark.parametrize("qscheme,dtype", [(per_tensor_affine, quint8), (per_tensor_symmetric, qint8)])
def test_mse_beats_minmax_on_heavy_tails(qscheme, dtype):
    rng = np.random.default_rng(2)
    x = rng.standard_t(3, size=40_000).astype(np.float32)
    batches = np.split(x, 4)
    mse, mm = MSEObserver(qscheme=qscheme, dtype=dtype), MinMaxObserver(qscheme=qscheme, dtype=dtype)
    s_mse, s_mm = _feed(mse, batches), _feed(mm, batches)
    sc1, zp1 = mse.calculate_qparams(s_mse)
    sc2, zp2 = mm.calculate_qparams(s_mm)
    e_mse, e_mm = _mse_numpy(x, sc1, zp1, dtype), _mse_numpy(x, sc2, zp2, dtype)
    assert e_mse <= e_mm
    assert float(mse.best_shrink(s_mse)) < 1.0  # heavy tails: clipping actually helps
    # the returned qparams are the formula's for the chosen shrink of the final min/max
    a = float(mse.best_shrink(s_mse))
    ref_sc, ref_zp = mm._calculate_qparams(jnp.float32(a) * s_mm.min_val, jnp.float32(a) * s_mm.max_val)
    assert float(sc1) == float(ref_sc) and int(zp1) == int(ref_zp)
    # the winning candidate's accumulated error is the numpy MSE of that range (one batch =
    # final range here since range grows only at first; compare on the sums, tolerance 1e-3 rel)
    one = _feed(mse, [x])
    k = int(np.argmin(np.asarray(one.sq_err)[::-1]))
    k = mse.grid - 1 - k
    a1 = mse.shrink_factors[k]
    sc, zp = mm._calculate_qparams(jnp.float32(a1) * one.min_val, jnp.float32(a1) * one.max_val)
    np.testing.assert_allclose(float(one.sq_err[k]) / x.size, _mse_numpy(x, sc, zp, dtype), rtol=1e-3)


def test_mse_equals_minmax_on_uniform():
    rng = np.random.default_rng(3)
    x = rng.uniform(-1.0, 3.0, size=50_000).astype(np.float32)
    mse, mm = MSEObserver(), MinMaxObserver()
    s1, s2 = _feed(mse, np.split(x, 5)), _feed(mm, np.split(x, 5))
    assert float(mse.best_shrink(s1)) == 1.0
    (sc1, zp1), (sc2, zp2) = mse.calculate_qparams(s1), mm.calculate_qparams(s2)
    np.testing.assert_allclose(float(sc1), float(sc2), rtol=1e-6)
    assert int(zp1) == int(zp2)


def test_mse_per_channel():
    rng = np.random.default_rng(4)
    w = rng.standard_t(2, size=(4096, 16)).astype(np.float32)  # flax dense kernel (in, out)
    w[..., 0] = rng.uniform(-1, 1, size=w.shape[:-1])  # one uniform channel: keeps its min/max
    obs = MSEObserver(qscheme=per_channel_symmetric, dtype=qint8, ch_axis=-1)
    ref = PerChannelMinMaxObserver(qscheme=per_channel_symmetric, dtype=qint8, ch_axis=-1)
    s, sr = _feed(obs, [w], w.shape), _feed(ref, [w], w.shape)
    assert s.sq_err.shape == (obs.grid, 16)
    scale, zp = obs.calculate_qparams(s)
    rscale, rzp = ref.calculate_qparams(sr)
    assert scale.shape == (16,) and zp.dtype == jnp.int32
    assert float(obs.best_shrink(s)[0]) == 1.0
    np.testing.assert_allclose(float(scale[0]), float(rscale[0]), rtol=1e-6)

    def err(sc, z):
        d = np.asarray(dequantize(quantize_per_channel(w, sc, z, axis=-1, dtype=qint8)))
        return ((d.astype(np.float64) - w) ** 2).reshape(-1, 16).mean(0)

    e, er = err(scale, zp), err(rscale, rzp)
    assert np.all(e <= er * (1 + 1e-6))
    assert np.sum(e) < np.sum(er)


def test_mse_rejects_bad_config():
    from jaxquant.dtypes import per_channel_affine_float_qparams

    with pytest.raises(ValueError, match="MSEObserver: per_channel_affine_float_qparams"):
        MSEObserver(qscheme=per_channel_affine_float_qparams)
    with pytest.raises(ValueError, match="MSEObserver.init needs"):
        MSEObserver(qscheme=per_channel_symmetric, dtype=qint8).init()


# ---- shared contract ------------------------------------------------------------------------------


OBSERVERS = [
    ("percentile", lambda: PercentileObserver(percentile=99.0, bins=256), None),
    ("mse", lambda: MSEObserver(), None),
    ("mse_per_channel", lambda: MSEObserver(qscheme=per_channel_symmetric, dtype=qint8, ch_axis=1), (4, 6)),
]


@pytest.mark.parametrize("name,make,shape", OBSERVERS)
def test_jit_no_retrace(name, make, shape):
    obs = make()
    traces = []

    def step(state, x):
        traces.append(1)
        return obs.update(state, x)

    step_j = jax.jit(step)
    rng = np.random.default_rng(5)
    state = obs.init(shape)
    batches = [rng.normal(size=(4, 6)).astype(np.float32) * (i + 1) for i in range(3)]
    for b in batches:
        state = step_j(state, jnp.asarray(b))
    assert len(traces) == 1
    eager = _feed(obs, batches, shape, jit=False)
    for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(eager)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    s_j, z_j = jax.jit(obs.calculate_qparams)(state)
    s_e, z_e = obs.calculate_qparams(eager)
    np.testing.assert_allclose(np.asarray(s_j), np.asarray(s_e), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(z_j), np.asarray(z_e))


@pytest.mark.parametrize("name,make,shape", OBSERVERS)
def test_nan_and_empty_raise(name, make, shape):
    obs = make()
    cls = type(obs).__name__
    with pytest.raises(NotCalibratedError, match=f"{cls}.*not observed any data"):
        obs.calculate_qparams(obs.init(shape))
    x = np.ones((4, 6), np.float32)
    x[1, 2] = np.nan
    state = obs.update(obs.init(shape), jnp.asarray(x))
    with pytest.raises(NotCalibratedError, match=f"{cls}.*NaN/Inf"):
        obs.calculate_qparams(state)
    with pytest.raises(NotCalibratedError, match="at conv1"):
        check_observer_state(obs, state, name="conv1")
    # the NaN was left out of the statistics: nothing non-finite in the state
    for leaf in jax.tree_util.tree_leaves(state._replace(min_val=0.0, max_val=0.0)):
        assert np.all(np.isfinite(np.asarray(leaf, np.float32)))
    # under jit an empty state gives finite defaults, never NaN
    s, z = jax.jit(obs.calculate_qparams)(obs.init(shape))
    assert np.all(np.asarray(s) == 1.0) and np.all(np.asarray(z) == 0)
