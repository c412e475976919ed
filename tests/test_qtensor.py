"""quantize/dequantize against torch 2.13, QTensor methods, pytree behaviour, properties."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxquant import dtypes as D
from jaxquant.qtensor import dequantize, quantize_per_channel, quantize_per_tensor

torch = pytest.importorskip("torch")
TQ = {D.qint8: torch.qint8, D.quint8: torch.quint8, D.qint32: torch.qint32}


@pytest.mark.parametrize("dtype,zp", [(D.quint8, 128), (D.quint8, 0), (D.qint8, 0), (D.qint8, -5), (D.qint32, 7)])
@pytest.mark.parametrize("scale", [0.1, 1 / 3, 2.0**-7, 0.0173])
def test_per_tensor_matches_torch_including_ties(dtype, zp, scale):
    rng = np.random.default_rng(0)
    s32 = np.float32(scale)
    # exact ties k + 0.5 in units of the reciprocal-scaled input, plus random values beyond the range
    ties = (np.arange(-300, 300) + 0.5).astype(np.float32) / (np.float32(1) / s32)
    x = np.concatenate([ties, rng.standard_normal(500).astype(np.float32) * 40]).astype(np.float32)
    q = quantize_per_tensor(x, scale, zp, dtype)
    tq = torch.quantize_per_tensor(torch.from_numpy(x), float(s32), zp, TQ[dtype])
    np.testing.assert_array_equal(np.asarray(q.int_repr()).astype(np.int64), tq.int_repr().numpy().astype(np.int64))
    np.testing.assert_array_equal(np.asarray(q.dequantize()), tq.dequantize().numpy())
    assert float(q.q_scale()) == float(s32) and int(q.q_zero_point()) == zp


@pytest.mark.parametrize("axis", [0, 1, -1])
@pytest.mark.parametrize("dtype", [D.qint8, D.quint8])
def test_per_channel_matches_torch(axis, dtype):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((5, 7, 3)) * 10).astype(np.float32)
    c = x.shape[axis]
    scales = rng.uniform(0.01, 0.5, c).astype(np.float32)
    zps = rng.integers(0 if dtype == D.quint8 else -10, 20, c).astype(np.int32)
    q = quantize_per_channel(x, scales, zps, axis, dtype)
    tq = torch.quantize_per_channel(torch.from_numpy(x), torch.from_numpy(scales).double(),
                                    torch.from_numpy(zps).long(), axis % 3, TQ[dtype])
    np.testing.assert_array_equal(np.asarray(q.int_repr()).astype(np.int64), tq.int_repr().numpy().astype(np.int64))
    np.testing.assert_array_equal(np.asarray(q.dequantize()), tq.dequantize().numpy())
    np.testing.assert_array_equal(np.asarray(q.q_per_channel_scales()), scales)
    assert q.q_per_channel_axis() == axis % 3


def test_float_qparams_matches_torch():
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((6, 9))).astype(np.float32)
    scales = rng.uniform(0.005, 0.05, 6).astype(np.float32)
    zps = rng.uniform(0, 255, 6).astype(np.float32)
    q = quantize_per_channel(x, scales, zps, 0, D.quint8)
    tq = torch.quantize_per_channel(torch.from_numpy(x), torch.from_numpy(scales), torch.from_numpy(zps), 0, torch.quint8)
    np.testing.assert_array_equal(np.asarray(q.int_repr()).astype(np.int64), tq.int_repr().numpy().astype(np.int64))
    np.testing.assert_allclose(np.asarray(q.dequantize()), tq.dequantize().numpy(), rtol=0, atol=1e-6)


def test_methods_guard_per_tensor_vs_per_channel():
    q = quantize_per_tensor(jnp.ones(3), 0.1, 3, D.quint8)
    with pytest.raises(ValueError, match="q_per_channel_scales.*per-channel"):
        q.q_per_channel_scales()
    qc = quantize_per_channel(jnp.ones((2, 3)), jnp.ones(2), jnp.zeros(2, jnp.int32), 0)
    with pytest.raises(ValueError, match="q_scale.*per-tensor"):
        qc.q_scale()
    assert q.shape == (3,) and q.int_repr().dtype == jnp.uint8 and q.nbytes == 3 + 4 + 4


def test_pytree_jit_and_vmap():
    x = jnp.linspace(-2, 2, 12).reshape(3, 4)
    q = quantize_per_tensor(x, 0.05, 10, D.quint8)
    leaves, treedef = jax.tree_util.tree_flatten(q)
    assert len(leaves) == 3
    traces = []

    @jax.jit
    def roundtrip(q):
        traces.append(1)
        return q.dequantize() * 2

    roundtrip(q)
    roundtrip(quantize_per_tensor(x + 1, 0.07, 12, D.quint8))
    assert len(traces) == 1  # same static metadata: no retrace
    qs = jax.vmap(lambda row, s: quantize_per_tensor(row, s, 0, D.qint8))(x, jnp.array([0.1, 0.2, 0.3]))
    assert qs.int_data.shape == (3, 4) and qs.scale.shape == (3, 1)  # one (1,) scale of the data's rank per row
    rows = jax.vmap(dequantize)(qs)
    for i, s in enumerate([0.1, 0.2, 0.3]):
        np.testing.assert_array_equal(np.asarray(rows[i]), np.asarray(quantize_per_tensor(x[i], s, 0, D.qint8).dequantize()))


finite = st.floats(-1e3, 1e3, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(st.lists(finite, min_size=1, max_size=40), st.floats(1e-3, 10.0), st.integers(0, 255))
def test_roundtrip_within_half_step_inside_range(values, scale, zp):
    x = np.asarray(values, np.float32)
    s = np.float32(scale)
    lo, hi = (0 - zp) * s, (255 - zp) * s
    x = np.clip(x, lo, hi)
    err = np.abs(np.asarray(quantize_per_tensor(x, s, zp, D.quint8).dequantize()) - x)
    assert np.all(err <= s / 2 * (1 + 1e-5) + 1e-6 * np.abs(x))


@settings(max_examples=40, deadline=None)
@given(st.floats(1e-4, 10.0), st.integers(-128, 127))
def test_zero_is_exactly_representable(scale, zp):
    q = quantize_per_tensor(np.zeros(2, np.float32), scale, zp, D.qint8)
    assert np.all(np.asarray(q.int_repr()) == zp) and np.all(np.asarray(q.dequantize()) == 0.0)


@settings(max_examples=30, deadline=None)
@given(st.lists(finite, min_size=12, max_size=12), st.lists(st.floats(1e-3, 1.0), min_size=3, max_size=3),
       st.lists(st.integers(-20, 20), min_size=3, max_size=3))
def test_per_channel_equals_per_tensor_per_slice(values, scales, zps):
    x = np.asarray(values, np.float32).reshape(3, 4)
    scales = [float(np.float32(v)) for v in scales]
    q = quantize_per_channel(x, np.asarray(scales, np.float32), np.asarray(zps, np.int32), 0, D.qint8)
    for i in range(3):
        qi = quantize_per_tensor(x[i], scales[i], zps[i], D.qint8)
        np.testing.assert_array_equal(np.asarray(q.int_repr()[i]), np.asarray(qi.int_repr()))
        np.testing.assert_array_equal(np.asarray(q.dequantize()[i]), np.asarray(qi.dequantize()))
