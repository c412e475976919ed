"""Multi-device cases; run by test_distributed.py in a subprocess with 8 forced host CPU devices.

Not collected by a plain ``pytest tests/`` (the file name does not match ``test_*.py``), because in
that process jax is already initialised with one device. Run directly with
``XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m pytest tests/distributed/_cases.py``.

Every ``shard_map`` here runs under ``jax.jit``, as it would in use: called eagerly, shard_map runs
its body op by op on each of the 8 devices (60 s for the histogram sync instead of 5 s).
"""
import functools
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxquant as jq  # noqa: E402
import jaxquant.nn as jqnn  # noqa: E402
from jaxquant import distributed as jd  # noqa: E402
from jaxquant.nn.variables import QuantStats  # noqa: E402

N_DEV = 8


def _mesh(name="data"):
    # Mesh() gives Auto axes; jax.make_mesh's default (Explicit) is covered separately below
    return Mesh(np.array(jax.devices()), (name,))


def _put(x, mesh, spec):
    return jax.device_put(x, NamedSharding(mesh, spec))


def _assert_tree_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for u, v in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def _assert_tree_close(a, b, rtol=1e-5, atol=1e-6):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for u, v in zip(la, lb):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol)


def _observers():
    return [
        jq.MinMaxObserver(),
        jq.MinMaxObserver(qscheme=jq.per_tensor_symmetric, dtype=jq.qint8),
        jq.MovingAverageMinMaxObserver(averaging_constant=0.3),
        jq.PerChannelMinMaxObserver(ch_axis=-1),
        jq.MovingAveragePerChannelMinMaxObserver(ch_axis=-1, averaging_constant=0.5),
        jq.HistogramObserver(bins=128),
    ]


def _batches(seed=0):
    rng = np.random.default_rng(seed)
    # each batch a different range, so histogram growth (re-binning) is exercised
    return [jnp.asarray((rng.normal(size=(16, 3, 5)) * s + o).astype(np.float32))
            for s, o in [(1.0, 0.0), (3.0, 1.0), (0.5, -2.0)]]


def _reference(obs, batches):
    state = obs.init(batches[0])
    for x in batches:
        state = obs.update(state, x)
    return state


def test_sees_eight_devices():
    assert jax.device_count() == N_DEV, f"XLA_FLAGS was not applied: {jax.devices()}"


@pytest.mark.parametrize("obs", _observers(), ids=lambda o: type(o).__name__)
def test_observer_under_jit_with_sharded_batch_equals_one_device(obs):
    mesh = _mesh()
    batches = _batches()
    ref = _reference(obs, batches)
    step = jax.jit(obs.update)
    state = obs.init(batches[0])
    for x in batches:
        xs = _put(x, mesh, P("data"))
        assert len(xs.sharding.device_set) == N_DEV
        state = step(state, xs)
    _assert_tree_equal(ref, state)
    _assert_tree_equal(obs.calculate_qparams(ref), obs.calculate_qparams(state))


@pytest.mark.parametrize("obs", _observers(), ids=lambda o: type(o).__name__)
def test_sharded_update_under_shard_map_equals_one_device(obs):
    mesh = _mesh()
    batches = _batches(1)
    ref = _reference(obs, batches)

    @jax.jit
    def step(state, x):
        return jax.shard_map(lambda s, x: jd.sharded_update(obs, s, x, "data"), mesh=mesh,
                             in_specs=(P(), P("data")), out_specs=P())(state, x)

    state = obs.init(batches[0])
    for x in batches:
        state = step(state, _put(x, mesh, P("data")))
    _assert_tree_equal(ref, state)


@pytest.mark.parametrize("obs", [jq.MinMaxObserver(), jq.PerChannelMinMaxObserver(ch_axis=-1)],
                         ids=lambda o: type(o).__name__)
def test_sharded_update_under_pmap_equals_one_device(obs):
    batches = _batches(2)
    ref = _reference(obs, batches)
    step = jax.pmap(lambda s, x: jd.sharded_update(obs, s, x, "i"), axis_name="i", in_axes=(None, 0))
    state = obs.init(batches[0])
    for x in batches:
        per_device = step(state, x.reshape(N_DEV, -1, *x.shape[1:]))
        # replicated: every device holds the same state
        for leaf in jax.tree.leaves(per_device):
            assert all(np.array_equal(leaf[0], leaf[i]) for i in range(N_DEV))
        state = jax.tree.map(lambda a: a[0], per_device)
    _assert_tree_equal(ref, state)


def test_sharded_update_keeps_nonfinite_flag_from_any_shard():
    obs = jq.MinMaxObserver()
    mesh = _mesh()
    x = np.random.default_rng(3).normal(size=(16, 4)).astype(np.float32)
    x[13, 2] = np.nan  # lives on device 6 only
    f = jax.jit(jax.shard_map(lambda s, x: jd.sharded_update(obs, s, x, "data"), mesh=mesh,
                              in_specs=(P(), P("data")), out_specs=P()))
    got = f(obs.init(), _put(jnp.asarray(x), mesh, P("data")))
    _assert_tree_equal(obs.update(obs.init(), jnp.asarray(x)), got)
    assert bool(got.nonfinite)


def test_sync_observer_state_minmax_and_per_channel_are_exact():
    mesh = _mesh()
    x = jnp.asarray(np.random.default_rng(4).normal(size=(16, 6)).astype(np.float32))
    for obs in [jq.MinMaxObserver(), jq.PerChannelMinMaxObserver(ch_axis=1)]:
        def local_then_sync(s, x, obs=obs):
            return jd.sync_observer_state(obs, obs.update(s, x), "data")

        got = jax.jit(jax.shard_map(local_then_sync, mesh=mesh, in_specs=(P(), P("data")), out_specs=P()))(
            obs.init(x), _put(x, mesh, P("data")))
        _assert_tree_equal(obs.update(obs.init(x), x), got)


def test_sync_observer_state_histogram_exact_when_ranges_agree_and_mass_kept_otherwise():
    obs = jq.HistogramObserver(bins=16, upsample_rate=4)
    mesh = _mesh()
    rng = np.random.default_rng(5)
    x = rng.uniform(-1, 1, size=(N_DEV, 10)).astype(np.float32)
    x[:, 0], x[:, 1] = -1.0, 1.0  # every shard holds the global extremes: same range everywhere
    f = jax.jit(jax.shard_map(lambda s, x: jd.sync_observer_state(obs, obs.update(s, x), "data"), mesh=mesh,
                              in_specs=(P(), P("data")), out_specs=P()))
    got = f(obs.init(), _put(jnp.asarray(x), mesh, P("data")))
    _assert_tree_equal(obs.update(obs.init(), jnp.asarray(x)), got)
    # different ranges per shard: the merge re-bins (approximate) but keeps range and total mass
    y = rng.normal(size=(N_DEV, 10)).astype(np.float32) * np.arange(1, N_DEV + 1, dtype=np.float32)[:, None]
    got = f(obs.init(), _put(jnp.asarray(y), mesh, P("data")))
    assert float(got.min_val) == y.min() and float(got.max_val) == y.max()
    np.testing.assert_allclose(float(jnp.sum(got.histogram)), y.size, rtol=1e-6)


def test_sync_observer_state_refuses_moving_average():
    obs = jq.MovingAverageMinMaxObserver()
    f = jax.shard_map(lambda s: jd.sync_observer_state(obs, s, "data"), mesh=_mesh(), in_specs=P(), out_specs=P())
    with pytest.raises(ValueError, match="sharded_update"):
        f(obs.init())


def test_histogram_under_jit_with_explicit_mesh():
    mesh = jax.make_mesh((N_DEV,), ("data",))
    obs = jq.HistogramObserver(bins=64)
    x = _batches()[0]
    with jax.set_mesh(mesh):
        got = jax.jit(obs.update)(obs.init(), _put(x, mesh, P("data")))
    _assert_tree_equal(obs.update(obs.init(), x), got)


def test_histogram_local_update_inside_shard_map():
    obs = jq.HistogramObserver(bins=64)
    mesh = _mesh()
    a, b = _batches()[:2]  # b's range is wider: each device re-bins (while_loop) its local histogram

    def local_then_sync(s, a, b):
        return jd.sync_observer_state(obs, obs.update(obs.update(s, a), b), "data")

    # check_vma is on: the local update type-checks per device
    f = jax.jit(jax.shard_map(local_then_sync, mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=P()))
    state = f(obs.init(), _put(a, mesh, P("data")), _put(b, mesh, P("data")))
    both = np.concatenate([np.asarray(a).ravel(), np.asarray(b).ravel()])
    assert float(state.min_val) == both.min() and float(state.max_val) == both.max()
    np.testing.assert_allclose(float(jnp.sum(state.histogram)), both.size, rtol=1e-6)
    assert int(state.num_batches) == 2


# ---------------------------------------------------------------------------------- models


class MLP(nnx.Module):
    def __init__(self, rngs, d_in=16, d_hidden=32, d_out=8):
        self.quant = jqnn.QuantStub()
        self.fc1 = nnx.Linear(d_in, d_hidden, rngs=rngs)
        self.relu = jqnn.ReLU()
        self.fc2 = nnx.Linear(d_hidden, d_out, rngs=rngs)
        self.dequant = jqnn.DeQuantStub()

    def __call__(self, x):
        return self.dequant(self.fc2(self.relu(self.fc1(self.quant(x)))))


def _mlp_qconfig():
    # MinMax keeps compile time down; HistogramObserver's cross-device path is covered above
    return jq.QConfig(activation=jq.MinMaxObserver.with_args(reduce_range=True),
                      weight=jq.default_per_channel_weight_observer)


def _mlp_data(n=3, batch=16, seed=0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.normal(size=(batch, 16)).astype(np.float32) * (i + 1)) for i in range(n)]


def test_calibrate_prepared_model_with_sharded_batches_equals_one_device():
    mesh = _mesh()
    model = jq.fuse_modules(MLP(nnx.Rngs(0)), [["fc1", "relu"]])
    data = _mlp_data()
    ref = jq.calibrate(jq.prepare(model, _mlp_qconfig()), data, progress=False)
    got = jq.calibrate(jq.prepare(model, _mlp_qconfig()), [_put(x, mesh, P("data")) for x in data],
                       progress=False)
    # the input observer sees the raw data: exact; later ones see float dots of a different batch split
    _assert_tree_equal(nnx.state(ref.quant, QuantStats), nnx.state(got.quant, QuantStats))
    _assert_tree_close(nnx.state(ref, QuantStats), nnx.state(got, QuantStats))


def test_with_axis_name_calibrates_a_model_inside_shard_map():
    mesh = _mesh()
    model = jq.fuse_modules(MLP(nnx.Rngs(1)), [["fc1", "relu"]])
    data = _mlp_data(seed=1)
    ref = jq.calibrate(jq.prepare(model, _mlp_qconfig()), data, progress=False)

    prepared = jq.prepare(model, _mlp_qconfig())
    synced = jd.with_axis_name(prepared, "data")
    assert isinstance(synced.quant.activation_post_process.observer, jd.AxisSyncedObserver)
    assert not isinstance(prepared.quant.activation_post_process.observer, jd.AxisSyncedObserver)
    graphdef, stats, rest = nnx.split(synced, QuantStats, ...)

    @jax.jit
    def step(stats, x):
        def local(stats, x):
            m = nnx.merge(graphdef, stats, rest)
            m(x)
            return nnx.state(m, QuantStats)
        return jax.shard_map(local, mesh=mesh, in_specs=(P(), P("data")), out_specs=P())(stats, x)

    for x in data:
        stats = step(stats, _put(x, mesh, P("data")))
    nnx.update(synced, stats)
    calibrated = jd.without_axis_name(synced)
    _assert_tree_equal(nnx.state(ref.quant, QuantStats), nnx.state(calibrated.quant, QuantStats))
    _assert_tree_close(nnx.state(ref, QuantStats), nnx.state(calibrated, QuantStats))
    # and the int8 models agree
    x = data[0]
    np.testing.assert_allclose(np.asarray(jq.convert(ref)(x)), np.asarray(jq.convert(calibrated)(x)),
                               atol=2 * float(ref.fc2.activation_post_process.calculate_qparams()[0]))


def test_qat_data_parallel_equals_one_device():
    from jaxquant.fusion import fuse_modules_qat
    from jaxquant.models.fashion_cnn import FashionCNN, fusion_patterns
    from jaxquant.transforms.prepare_qat import prepare_qat

    def make():
        m = FashionCNN(width=4, rngs=nnx.Rngs(0))
        m = fuse_modules_qat(m, fusion_patterns(m))
        m.train()
        m.dropout.deterministic = True  # dropout masks are not part of what is compared
        return prepare_qat(m, jq.get_default_qat_qconfig("x86"))

    tx = optax.sgd(0.05, momentum=0.9)

    def train(model, batches):
        graphdef, params, stats, bstats, rest = nnx.split(model, nnx.Param, QuantStats, nnx.BatchStat, ...)
        opt_state = tx.init(params)

        @jax.jit
        def step(params, stats, bstats, opt_state, x, y):
            def loss_fn(params, stats, bstats):
                m = nnx.merge(graphdef, params, stats, bstats, rest, copy=True)
                loss = optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
                return loss, (nnx.state(m, QuantStats), nnx.state(m, nnx.BatchStat))

            (loss, (stats, bstats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, bstats)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), stats, bstats, opt_state

        for x, y in batches:
            params, stats, bstats, opt_state = step(params, stats, bstats, opt_state, x, y)
        return params, stats, bstats

    rng = np.random.default_rng(0)
    batches = [(jnp.asarray(rng.uniform(0, 1, size=(16, 28, 28, 1)).astype(np.float32)),
                jnp.asarray(rng.integers(0, 10, size=16))) for _ in range(2)]
    mesh = _mesh()
    ref = train(make(), batches)
    sharded = [(_put(x, mesh, P("data")), _put(y, mesh, P("data"))) for x, y in batches]
    got = train(make(), sharded)
    params, stats, bstats = got
    assert any(len(a.sharding.device_set) == N_DEV for a in jax.tree.leaves(stats))
    for r, g in zip(ref, got):
        _assert_tree_close(r, g, rtol=2e-4, atol=2e-5)
    # and the parameters really moved (a test that cannot fail would not)
    start = nnx.state(make(), nnx.Param)
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(params)))


# ------------------------------------------------------------------------- tensor parallel


@functools.lru_cache(maxsize=None)
def _converted_mlp(seed=0):
    model = jq.fuse_modules(MLP(nnx.Rngs(seed), d_in=24, d_hidden=64, d_out=16), [["fc1", "relu"]])
    prepared = jq.prepare(model, _mlp_qconfig())
    jq.calibrate(prepared, [jnp.asarray(np.random.default_rng(seed).normal(size=(32, 24)).astype(np.float32))],
                 progress=False)
    return jq.convert(prepared)


def _quantized_input(model, rows, seed=0):
    x = jnp.asarray(np.random.default_rng(seed + 10).normal(size=(rows, 24)).astype(np.float32))
    return model.quant(x)


def test_shard_qtensor_places_int8_data_with_their_scales():
    mesh = _mesh("model")
    w = _converted_mlp().fc1.weight()  # (24, 64) per output channel, axis 1
    ws = jd.shard_qtensor(w, mesh, "model")
    assert ws.int_data.dtype == jnp.int8 and ws.int_data.sharding.spec == P(None, "model")
    assert ws.scale.sharding.spec == P(None, "model")  # qparams of the data's rank, split with it
    data_shards = sorted(ws.int_data.addressable_shards, key=lambda s: s.device.id)
    scale_shards = {s.device: s for s in ws.scale.addressable_shards}
    for s in data_shards:
        cols = s.index[1]
        assert s.data.shape == (24, 64 // N_DEV)
        np.testing.assert_array_equal(np.asarray(scale_shards[s.device].data), np.asarray(w.scale)[:, cols])
    _assert_tree_equal(w, ws)
    with pytest.raises(ValueError, match="not divisible"):
        jd.shard_qtensor(jq.quantize_per_channel(jnp.ones((4, 6)), jnp.ones(6), jnp.zeros(6, jnp.int32), 1),
                         mesh, "model")


@pytest.mark.parametrize("rows", [1, 200])  # weight-LHS (small M) and activation-LHS layouts
def test_tensor_parallel_int8_mlp_equals_one_device_exactly(rows):
    mesh = _mesh("model")
    model = _converted_mlp()
    xq = _quantized_input(model, rows)
    h_ref = model.fc1(xq)
    y_ref = model.fc2(h_ref)

    h = jax.jit(lambda x: jd.column_parallel_linear(x, model.fc1, mesh, "model"))(xq)
    assert h.int_data.sharding.spec[-1] == "model"
    _assert_tree_equal(h_ref, h)
    y = jax.jit(lambda h: jd.row_parallel_linear(h, model.fc2, mesh, "model"))(h)
    _assert_tree_equal(y_ref, y)
    y_col = jax.jit(lambda h: jd.column_parallel_linear(h, model.fc2, mesh, "model"))(h_ref)
    _assert_tree_equal(y_ref, y_col)
    # the whole converted model on one device agrees with the tensor-parallel pair
    np.testing.assert_array_equal(np.asarray(model.dequant(y_ref)), np.asarray(y.dequantize()))
