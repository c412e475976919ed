"""``observer.merge(*states)``: one state from states that saw different data (other devices' shards),
checked against one observer that saw all of it (numpy-free: the reference is the observer itself on
the concatenated data, whose min/max and bin counts are exact)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq

RNG = np.random.default_rng(0)


def _parts(shape=(4, 8)):
    a = RNG.normal(size=shape).astype(np.float32)
    b = (3 * RNG.normal(size=shape)).astype(np.float32)
    return jnp.asarray(a), jnp.asarray(b)


@pytest.mark.parametrize("observer", [jq.MinMaxObserver(), jq.PerChannelMinMaxObserver(ch_axis=1)])
def test_min_max_merge_is_exact(observer):
    a, b = _parts()
    init = observer.init(a)
    merged = observer.merge(observer.update(init, a), observer.update(observer.update(init, b), b))
    whole = observer.update(init, jnp.concatenate([a, b]))
    np.testing.assert_array_equal(merged.min_val, whole.min_val)
    np.testing.assert_array_equal(merged.max_val, whole.max_val)
    assert int(merged.num_batches) == 2  # the largest per-device count: data-parallel steps, not shards
    assert not bool(merged.nonfinite)
    flagged = observer.merge(observer.update(init, a), observer.update(init, b.at[0, 0].set(jnp.nan)))
    assert bool(flagged.nonfinite)


def test_histogram_merge_sums_on_a_shared_range_and_keeps_mass_on_a_union_range():
    observer = jq.HistogramObserver(bins=16)
    update, merge = jax.jit(observer.update), jax.jit(observer.merge)
    a, b = _parts()
    lo, hi = jnp.minimum(a.min(), b.min()), jnp.maximum(a.max(), b.max())
    init = observer.init()
    # different ranges: re-binned into the union range, every count kept; an empty third device adds nothing
    merged = merge(update(init, a), update(init, b), init)
    assert float(merged.min_val) == float(lo) and float(merged.max_val) == float(hi)
    np.testing.assert_allclose(float(jnp.sum(merged.histogram)), a.size + b.size, rtol=1e-6)
    # both shards hold the global min and max, so each histogram is already on the global range: exact
    a, b = (x.at[0, 0].set(lo).at[0, 1].set(hi) for x in (a, b))
    merged = merge(update(init, a), update(init, b))
    np.testing.assert_array_equal(merged.histogram, update(init, jnp.concatenate([a, b])).histogram)


def test_counting_observers_merge_counts():
    observer = jq.PlaceholderObserver()
    a, b = _parts()
    s1 = observer.update(observer.init(), a)
    s3 = observer.update(observer.update(observer.update(observer.init(), b), b), b)
    assert int(observer.merge(s1, s3).num_batches) == 3


def test_moving_average_and_unmergeable_observers_refuse():
    a, _ = _parts()
    observer = jq.MovingAverageMinMaxObserver()
    state = observer.update(observer.init(), a)
    with pytest.raises(ValueError, match="sharded_update"):
        observer.merge(state, state)
    mse = jq.MSEObserver()
    with pytest.raises(NotImplementedError, match="no merge rule"):
        mse.merge(mse.init(), mse.init())
