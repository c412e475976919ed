"""``observer.sharded_update(state, shard, axis_name)``: each observer's own rule for a batch split over a
mapped axis, checked on one device with ``jax.vmap(..., axis_name=...)`` (whose collectives reduce
over the mapped axis as shard_map's do) against the same observer's ``update`` on the whole batch.
The 8-device shard_map/pmap runs are in tests/distributed/_cases.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant import distributed as jd

OBSERVERS = [
    jq.MinMaxObserver(),
    jq.MovingAverageMinMaxObserver(averaging_constant=0.3),
    jq.PerChannelMinMaxObserver(ch_axis=-1),
    jq.MovingAveragePerChannelMinMaxObserver(ch_axis=-1, averaging_constant=0.5),
    jq.HistogramObserver(bins=32),
    jq.PlaceholderObserver(),
]


def _batches():
    rng = np.random.default_rng(0)
    # different ranges per batch, so histograms grow (re-bin) and moving averages move
    return [(rng.normal(size=(8, 3, 5)) * s + o).astype(np.float32) for s, o in [(1.0, 0.0), (3.0, 1.0), (0.5, -2.0)]]


@pytest.mark.parametrize("obs", OBSERVERS, ids=lambda o: type(o).__name__)
def test_sharded_update_over_four_shards_equals_update_on_the_whole_batch(obs):
    batches = _batches()
    batches[1][2, 1, 3] = np.nan  # only one shard sees it: the flag must still reach every shard's state
    state = ref = obs.init(batches[0])
    step = jax.jit(jax.vmap(lambda s, x: obs.sharded_update(s, x, "d"), in_axes=(None, 0), axis_name="d"))
    for x in batches:
        ref = jax.jit(obs.update)(ref, jnp.asarray(x))
        per_shard = step(state, jnp.asarray(x.reshape(4, 2, 3, 5)))  # batch axis split in 4
        # replicated: every shard computed the same state
        for leaf in jax.tree.leaves(per_shard):
            np.testing.assert_array_equal(np.asarray(leaf), np.repeat(np.asarray(leaf)[:1], 4, axis=0))
        state = jax.tree.map(lambda a: a[0], per_shard)
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert bool(state.nonfinite) and int(state.num_batches) == 3


def test_functional_entry_point_and_wrapper_use_the_observers_rule():
    obs = jq.MovingAverageMinMaxObserver(averaging_constant=0.5)
    x = jnp.asarray(_batches()[1].reshape(4, 2, 3, 5))
    state = obs.update(obs.init(), jnp.asarray(_batches()[0]))
    wrapped = jd.AxisSyncedObserver(obs, "d")
    via_wrapper = jax.vmap(wrapped.update, in_axes=(None, 0), axis_name="d")(state, x)
    via_function = jax.vmap(lambda s, x: jd.sharded_update(wrapped, s, x, "d"), in_axes=(None, 0), axis_name="d")(state, x)
    want = obs.update(state, x.reshape(8, 3, 5))
    for a, b, w in zip(jax.tree.leaves(via_wrapper), jax.tree.leaves(via_function), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a)[0], np.asarray(w))
        np.testing.assert_array_equal(np.asarray(b)[0], np.asarray(w))
    # the moving average moved towards the global batch's min/max, not a shard's
    assert float(want.min_val) < float(state.min_val)

def test_sharded_update_refuses_observers_without_a_rule():
    for obs in (jq.MSEObserver(), jq.RecordingObserver()):
        with pytest.raises(TypeError, match="no cross-device rule.*all_gather"):
            jd.sharded_update(obs, obs.init((4,)), jnp.ones((4,)), "d")
        with pytest.raises(TypeError, match="AxisSyncedObserver: .* no cross-device rule"):
            jd.AxisSyncedObserver(obs, "d")
