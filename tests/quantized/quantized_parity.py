"""Helpers shared by the quantized-module parity tests: the same integers as a jaxquant QTensor (NHWC)
and a PyTorch quantized tensor (NCHW), output qparams from a float reference, and the
"within one output step" comparison."""
from __future__ import annotations

import zlib

import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant.qtensor import QTensor

torch = pytest.importorskip("torch")

JQ_DTYPES = {"quint8": jq.quint8, "qint8": jq.qint8}
TORCH_DTYPES = {"quint8": torch.quint8, "qint8": torch.qint8}
STORAGE = {"quint8": np.uint8, "qint8": np.int8}
RANGES = {"quint8": (0, 255), "qint8": (-128, 127)}


def seed_of(*parts) -> int:
    """A stable seed from test parameters (``hash`` of a str changes between processes)."""
    return zlib.crc32(repr(parts).encode())


def channels_last_perm(ndim: int) -> tuple[int, ...]:
    """Axes taking an NC... (torch) array to N...C (ours)."""
    return (0, *range(2, ndim), 1)


def channels_first_perm(ndim: int) -> tuple[int, ...]:
    """Axes taking an N...C (ours) array to NC... (torch)."""
    return (0, ndim - 1, *range(1, ndim - 1))


def torch_q(ints: np.ndarray, scale: float, zero_point: int, dtype: str):
    """A per-tensor PyTorch quantized tensor holding exactly ``ints``."""
    data = torch.from_numpy(np.ascontiguousarray(ints.astype(STORAGE[dtype])))
    return torch._make_per_tensor_quantized_tensor(data, float(np.float32(scale)), int(zero_point))


def random_inputs(rng, shape, scale: float, zero_point: int, dtype: str, to_torch_perm=None):
    """Random integers over the whole dtype range as ``(ours QTensor, torch quantized tensor)``.

    ``shape`` is our layout; ``to_torch_perm`` (e.g. :func:`channels_first_perm`) reorders for torch.
    """
    lo, hi = RANGES[dtype]
    ints = rng.integers(lo, hi + 1, size=shape)
    ours = QTensor(jnp.asarray(ints.astype(STORAGE[dtype])), jnp.float32(scale), jnp.int32(zero_point),
                   JQ_DTYPES[dtype])
    theirs_ints = ints.transpose(to_torch_perm) if to_torch_perm is not None else ints
    return ours, torch_q(theirs_ints, scale, zero_point, dtype)


def output_qparams(y_float: np.ndarray, dtype: str = "quint8") -> tuple[float, int]:
    """Affine qparams covering ``y_float``'s range (what a MinMax observer would pick, give or take)."""
    lo, hi = RANGES[dtype]
    y_min, y_max = min(float(y_float.min()), 0.0), max(float(y_float.max()), 0.0)
    scale = float(np.float32(max(y_max - y_min, 1e-6) / (hi - lo)))
    zero_point = int(np.clip(lo - round(y_min / scale), lo, hi))
    return scale, zero_point


def signed_weight(rng, torch_shape, per_channel: bool, axis: int = 0):
    """A random float weight and its int8 quantization (symmetric, PyTorch layout) as
    ``(torch qint8 weight, ints, scales)``; scales are per ``axis`` channel or a single one."""
    ints = rng.integers(-128, 128, size=torch_shape)
    if per_channel:
        scales = rng.uniform(0.002, 0.02, size=torch_shape[axis]).astype(np.float32)
        tw = torch._make_per_channel_quantized_tensor(
            torch.from_numpy(ints.astype(np.int8)), torch.from_numpy(scales.astype(np.float64)),
            torch.zeros(torch_shape[axis], dtype=torch.int64), axis)
    else:
        scales = np.float32(rng.uniform(0.002, 0.02))
        tw = torch._make_per_tensor_quantized_tensor(torch.from_numpy(ints.astype(np.int8)), float(scales), 0)
    return tw, ints, scales


def ours_weight(ints_ours_layout: np.ndarray, scales, per_channel: bool) -> QTensor:
    """Our int8 weight QTensor (output channels last when ``per_channel``)."""
    data = jnp.asarray(ints_ours_layout.astype(np.int8))
    if per_channel:
        n = ints_ours_layout.shape[-1]
        return QTensor(data, jnp.asarray(scales, jnp.float32), jnp.zeros((n,), jnp.int32), jq.qint8,
                       jq.per_channel_symmetric, data.ndim - 1)
    return QTensor(data, jnp.float32(scales), jnp.int32(0), jq.qint8, jq.per_tensor_symmetric, None)


def assert_within_one_step(ours: QTensor, theirs, to_ours_perm=None, min_fraction: float = 0.99,
                           exact: bool = False, check_nontrivial: bool = True,
                           max_saturated: float = 0.5) -> None:
    """Same qparams; integers equal (``exact``) or within one step on ``min_fraction`` of elements.

    A qint8 result is compared with a quint8 PyTorch result through its real values (the same
    values with every integer and zero point shifted by 128). ``check_nontrivial`` guards against a
    comparison that passes because both outputs are saturated or constant.
    """
    t_ints = theirs.int_repr().numpy().astype(np.int64)
    if to_ours_perm is not None:
        t_ints = t_ints.transpose(to_ours_perm)
    o_ints = np.asarray(ours.int_repr()).astype(np.int64)
    t_zp, o_zp = int(theirs.q_zero_point()), int(ours.q_zero_point())
    shift = 0
    if ours.dtype == jq.qint8 and theirs.dtype == torch.quint8:
        shift = 128
    assert o_ints.shape == t_ints.shape, (o_ints.shape, t_ints.shape)
    np.testing.assert_allclose(float(ours.q_scale()), theirs.q_scale(), rtol=1e-6)
    assert o_zp + shift == t_zp, (o_zp, t_zp)
    diff = np.abs(o_ints + shift - t_ints)
    if exact:
        assert diff.max() == 0, f"{int((diff > 0).sum())} of {diff.size} integers differ (max {diff.max()})"
    else:
        frac = float(np.mean(diff <= 1))
        assert frac >= min_fraction, f"only {frac:.4f} within one step (max diff {diff.max()})"
    if check_nontrivial:
        lo, hi = t_ints.min(), t_ints.max()
        assert len(np.unique(t_ints)) > 8, "reference output is nearly constant: test inputs are degenerate"
        saturated = np.mean((t_ints == 0) | (t_ints == 255)) if theirs.dtype == torch.quint8 else \
            np.mean((t_ints == -128) | (t_ints == 127))
        assert saturated < max_saturated, f"{saturated:.2f} of the reference output is saturated ({lo}..{hi})"
