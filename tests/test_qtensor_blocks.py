"""QTensor granularity as blocks: per-group quantize/dequantize against a numpy reference, the
derived ``blocks`` of per-tensor/per-channel tensors, and the per-group weight observer."""
import jax
import numpy as np
import pytest

from jaxquant.dtypes import per_channel_symmetric, qint4, qint8
from jaxquant.observers import PerChannelMinMaxObserver
from jaxquant.qtensor import (dequantize, expand_qparams, quantize_per_channel, quantize_per_group, quantize_per_tensor)


def np_quantize_per_group(x, scales, zps, block, qmin, qmax):
    """Written out per block: q = clip(round_half_even(float32(x * float32(1/s)) + zp))."""
    q = np.empty(x.shape, np.int64)
    for idx in np.ndindex(*scales.shape):
        sl = tuple(slice(i * b, (i + 1) * b) for i, b in zip(idx, block))
        inv = np.float32(1) / np.float32(scales[idx])
        q[sl] = np.clip(np.round((x[sl] * inv).astype(np.float32) + np.float32(zps[idx])), qmin, qmax)
    return q


def np_dequantize_per_group(q, scales, zps, block):
    out = np.empty(q.shape, np.float32)
    for idx in np.ndindex(*scales.shape):
        sl = tuple(slice(i * b, (i + 1) * b) for i, b in zip(idx, block))
        out[sl] = (q[sl].astype(np.int32) - zps[idx]).astype(np.float32) * np.float32(scales[idx])
    return out


@pytest.mark.parametrize("shape,block", [((8, 6), (4, 1)), ((6, 12), (1, 4)), ((4, 6, 8), (2, 3, 4))])
@pytest.mark.parametrize("dtype", [qint8, qint4])
def test_per_group_quantize_dequantize_match_numpy(shape, block, dtype):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    qshape = tuple(d // b for d, b in zip(shape, block))
    scales = rng.uniform(0.01, 0.5, qshape).astype(np.float32)
    zps = rng.integers(dtype.min // 2, dtype.max // 2 + 1, qshape).astype(np.int32)
    q = quantize_per_group(x, scales, zps, block, dtype)
    assert q.block_size == block and q.axis is None and q.scale.shape == qshape and q.blocks == block
    want = np_quantize_per_group(x, scales, zps, block, dtype.min, dtype.max)
    np.testing.assert_array_equal(np.asarray(q.int_data).astype(np.int64), want)
    assert want.min() >= dtype.min and want.max() <= dtype.max and len(np.unique(want)) > 4
    np.testing.assert_array_equal(np.asarray(dequantize(q)), np_dequantize_per_group(want, scales, zps, block))
    # jit: the block size is static metadata
    np.testing.assert_array_equal(np.asarray(jax.jit(dequantize)(q)), np.asarray(dequantize(q)))


def test_one_group_per_axis_is_per_channel_and_per_tensor():
    # a block spanning whole axes gives the same integers as per channel / per tensor
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 7)).astype(np.float32)
    s = rng.uniform(0.01, 0.1, 7).astype(np.float32)
    z = rng.integers(-3, 4, 7).astype(np.int32)
    pc = quantize_per_channel(x, s, z, 1, qint8)
    pg = quantize_per_group(x, s[None], z[None], (5, 1), qint8)
    np.testing.assert_array_equal(np.asarray(pg.int_data), np.asarray(pc.int_data))
    np.testing.assert_array_equal(np.asarray(dequantize(pg)), np.asarray(dequantize(pc)))
    assert pc.blocks == pc.block_size == (5, 1) and pc.scale.shape == (1, 7)  # block_size always set
    pt = quantize_per_tensor(x, 0.05, 3, qint8)
    assert pt.block_size == (5, 7) and pt.scale.shape == (1, 1) and pt.q_scale().shape == ()
    s_b, z_b = expand_qparams(pc)
    assert s_b.shape == (1, 7) and z_b.shape == (1, 7)


def test_per_group_errors():
    x = np.zeros((6, 4), np.float32)
    with pytest.raises(ValueError, match="block_size .* dividing"):
        quantize_per_group(x, np.ones((2, 4), np.float32), np.zeros((2, 4), np.int32), (4, 1))
    with pytest.raises(ValueError, match="must have shape \\(3, 4\\)"):
        quantize_per_group(x, np.ones((3,), np.float32), np.zeros((3,), np.int32), (2, 1))
    with pytest.raises(ValueError, match="scale"):
        quantize_per_group(x, np.zeros((3, 4), np.float32), np.zeros((3, 4), np.int32), (2, 1))
    with pytest.raises(ValueError, match="q_per_channel_scales"):
        quantize_per_group(x, np.ones((3, 4), np.float32), np.zeros((3, 4), np.int32), (2, 1)).q_per_channel_scales()


def test_per_group_observer_matches_numpy_min_max():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((4, 12)).astype(np.float32)  # PyTorch layout (out, in), groups of 4 inputs
    obs = PerChannelMinMaxObserver(dtype=qint8, qscheme=per_channel_symmetric, block_size=(1, 4))
    state = obs.update(obs.init(w), w)
    blocks = w.reshape(4, 3, 4)
    np.testing.assert_array_equal(np.asarray(state.min_val), blocks.min(-1))
    np.testing.assert_array_equal(np.asarray(state.max_val), blocks.max(-1))
    scale, zp = obs.calculate_qparams(state)
    assert scale.shape == zp.shape == (4, 3)
    # symmetric qint8: PyTorch's per-channel rule block by block, max(|min|, |max|) / 127.5
    want = np.maximum(np.maximum(-blocks.min(-1), blocks.max(-1)) / np.float32(255 / 2), np.finfo(np.float32).eps)
    np.testing.assert_allclose(np.asarray(scale), want, rtol=1e-6)
    q = quantize_per_group(w, scale, zp, (1, 4), qint8)
    err = np.abs(np.asarray(dequantize(q)) - w)
    assert np.all(err <= np.asarray(scale).repeat(4, axis=1) / 2 + 1e-7)
    with pytest.raises(ValueError, match="re-run init"):
        obs.update(state, np.zeros((4, 8), np.float32))


@pytest.mark.parametrize("bits,symmetric,group", [(8, True, 4), (4, False, 4), (4, True, None)])
def test_block_quantized_weight_is_a_per_group_qtensor(bits, symmetric, group):
    from jaxquant.weight_only.blockwise import quantize_blockwise
    rng = np.random.default_rng(3)
    w = rng.normal(size=(10, 5)).astype(np.float32)  # K = 10: partial last group of 4
    bq = quantize_blockwise(w, bits=bits, group_size=group, symmetric=symmetric, allow_partial_group=True)
    q = bq.codes()
    gs = 10 if group is None else group
    assert q.block_size == (1, gs) and q.shape == (5, bq.padded_in_features) and q.scale.shape == (5, bq.n_groups)
    assert q.dtype.max == (1 << bits) - 1 and q.axis is None
    # int4: the container keeps two rows per byte; the QTensor holds them unpacked
    assert bq.data.shape[0] == (3 if bits == 4 else 5)
    codes = np.asarray(q.int_data).astype(np.int64)
    want = np_dequantize_per_group(codes, np.asarray(bq.scale), np.asarray(bq.zero_point), (1, gs))[:, :10].T
    np.testing.assert_array_equal(np.asarray(bq.dequantize()), want)
    # and the codes are round(w / s) + zp of each group (numpy, per group; XLA's float32 division may
    # differ from numpy's by an ulp, which moves a value sitting on a .5 tie by one code)
    wt = np.pad(w.T, ((0, 0), (0, bq.padded_in_features - 10)))
    s = np.repeat(np.asarray(bq.scale), gs, axis=1)
    z = np.repeat(np.asarray(bq.zero_point), gs, axis=1)
    want_codes = np.clip(np.round(wt / s) + z, 0, (1 << bits) - 1)
    assert np.abs(codes - want_codes).max() <= 1 and (codes != want_codes).mean() < 0.05
