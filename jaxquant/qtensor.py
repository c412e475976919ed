"""``QTensor``: integer data with its scale and zero point, as a pytree; quantize and dequantize.

Numerics follow PyTorch's x86 CPU kernels bit for bit: per tensor (fbgemm's ``Quantize``)
``q = clamp(round_half_even(fma(x, float32(1 / scale), zero_point)), qmin, qmax)``, per channel
``q = clamp(round_half_even(fl(x * float32(1 / scale)) + zero_point), qmin, qmax)``, and
``x = (q - zero_point) * scale``. For ``per_channel_affine_float_qparams`` (embedding weights) the
zero point is a float added before rounding: ``q = clamp(round(x * (1 / scale) + zero_point))``.

Argument checks that need values (scale > 0 and normal, zero point inside the dtype's range, no
NaN/Inf in the input) run only on concrete arrays, i.e. in eager calls. Under ``jax.jit``/``vmap``/
``grad`` the values are tracers the host cannot read, and a device-side check would cost every call
of the hot path; there bad values give meaningless integers, as in PyTorch. Debug by calling eagerly
(outside ``jit``) once, or with ``jax.disable_jit()``.
"""
from __future__ import annotations

import dataclasses
from typing import Hashable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxquant import torch_numerics as tn
from jaxquant.dtypes import (
    QDType,
    QScheme,
    per_channel_affine,
    per_channel_affine_float_qparams,
    per_tensor_affine,
    qint32,
    qint8,
    quint8,
)

ArrayLike = Union[jax.Array, np.ndarray, float, int]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QTensor:
    """A quantized tensor: ``int_data`` with its ``scale`` and ``zero_point``.

    Leaves (arrays): ``int_data`` (any shape, storage dtype of ``dtype``: int8/uint8/int32),
    ``scale`` (float32) and ``zero_point`` (int32; float32 for ``per_channel_affine_float_qparams``),
    both of the data's rank with ``shape[i] // block_size[i]`` entries along axis ``i``.
    Metadata (static, never traced): ``dtype`` (a :class:`~jaxquant.dtypes.QDType`), ``qscheme``,
    ``axis`` (the channel axis of a per-channel tensor, else ``None``) and ``block_size``.

    Granularity is one idea, ``block_size``: the size of the block of elements that shares one
    scale/zero point, one entry per data axis, always set. Per tensor it is the data's shape, per
    channel 1 on ``axis`` and the full size elsewhere, per group (from :func:`quantize_per_group`;
    int4 weights, GPTQ/AWQ) what was asked. :func:`dequantize` broadcasts every granularity the
    same way (:func:`expand_qparams`).

    The constructor also takes PyTorch's shapes (a ``()`` scale per tensor, ``(C,)`` per channel
    along ``axis``) and reshapes them to the data's rank, so files written before qparams had the
    data's rank load unchanged. PyTorch's accessors are views: :meth:`q_scale` / :meth:`q_zero_point`
    give ``()``, :meth:`q_per_channel_scales` / :meth:`q_per_channel_zero_points` give ``(C,)``.
    ``axis`` is kept next to ``block_size`` because a block size alone cannot say which axis is the
    channel axis when other axes have size 1 (PyTorch's ``q_per_channel_axis`` must).
    """

    int_data: jax.Array
    scale: jax.Array
    zero_point: jax.Array
    dtype: QDType = dataclasses.field(metadata=dict(static=True), default=quint8)
    qscheme: QScheme = dataclasses.field(metadata=dict(static=True), default=per_tensor_affine)
    axis: Optional[int] = dataclasses.field(metadata=dict(static=True), default=None)
    block_size: Optional[tuple[int, ...]] = dataclasses.field(metadata=dict(static=True), default=None)

    def __post_init__(self) -> None:
        data = self.int_data
        # pytree operations also build QTensors of placeholders (PartitionSpecs, None, shape structs)
        if not isinstance(data, (jax.Array, np.ndarray)):
            return
        ndim = data.ndim
        shape = tuple(data.shape)
        if self.axis is not None:
            if not -ndim <= self.axis < ndim:
                raise ValueError(f"QTensor: axis {self.axis} is out of range for data of shape {shape}")
            object.__setattr__(self, "axis", self.axis % ndim)
            blocks = tuple(1 if i == self.axis else d for i, d in enumerate(shape))
        elif self.block_size is None or not self.qscheme.is_per_channel:
            blocks = shape
        else:
            blocks = tuple(int(b) for b in self.block_size)
        object.__setattr__(self, "block_size", blocks)
        if len(blocks) != ndim or any(b <= 0 or d % b for d, b in zip(shape, blocks)):
            return  # reported by quantize_per_group; a stacked (vmapped) QTensor keeps what it was given
        qshape = tuple(d // b for d, b in zip(shape, blocks))
        for name in ("scale", "zero_point"):
            a = getattr(self, name)
            if not isinstance(a, (jax.Array, np.ndarray)):
                if not isinstance(a, (int, float, np.generic)):
                    continue
                a = jnp.asarray(a, jnp.float32 if name == "scale" else None)
            # PyTorch's () / (C,) qparams take the data's rank; a stacked QTensor's extra entries stay
            if tuple(a.shape) != qshape and a.size == int(np.prod(qshape)):
                a = a.reshape(qshape)
            object.__setattr__(self, name, a)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.int_data.shape)

    @property
    def blocks(self) -> tuple[int, ...]:
        """Elements sharing one scale along each axis: ``block_size``."""
        return tuple(self.block_size)

    @property
    def ndim(self) -> int:
        return self.int_data.ndim

    @property
    def nbytes(self) -> int:
        """Bytes held by data, scales and zero points."""
        return int(sum(np.dtype(a.dtype).itemsize * a.size for a in (self.int_data, self.scale, self.zero_point)))

    def int_repr(self) -> jax.Array:
        """The stored integers (int8/uint8/int32), same shape as the tensor."""
        return self.int_data

    def dequantize(self) -> jax.Array:
        """float32 values ``(q - zero_point) * scale``, same shape as the tensor."""
        return dequantize(self)

    def q_scale(self) -> jax.Array:
        """The scale of a per-tensor QTensor, float32 ``()``."""
        self._require_per_tensor("q_scale")
        return self.scale.reshape(())

    def q_zero_point(self) -> jax.Array:
        """The zero point of a per-tensor QTensor, int32 ``()``."""
        self._require_per_tensor("q_zero_point")
        return self.zero_point.reshape(())

    def q_per_channel_scales(self) -> jax.Array:
        """The scales of a per-channel QTensor, float32 ``(C,)``."""
        self._require_per_channel("q_per_channel_scales")
        return self.scale.reshape(-1)

    def q_per_channel_zero_points(self) -> jax.Array:
        """The zero points of a per-channel QTensor, ``(C,)``."""
        self._require_per_channel("q_per_channel_zero_points")
        return self.zero_point.reshape(-1)

    def q_per_channel_axis(self) -> int:
        self._require_per_channel("q_per_channel_axis")
        return self.axis  # type: ignore[return-value]

    def channel_qparams(self) -> tuple[jax.Array, jax.Array]:
        """``(scale, zero_point)`` as the kernels take them: ``()`` per tensor, ``(C,)`` per channel
        (:meth:`q_scale` or :meth:`q_per_channel_scales`, and the zero points likewise)."""
        if self.axis is not None:
            return self.q_per_channel_scales(), self.q_per_channel_zero_points()
        return self.q_scale(), self.q_zero_point()

    def with_int_data(self, int_data: jax.Array) -> "QTensor":
        """The same qparams and metadata over other integers of the same shape (e.g. after a max-pool)."""
        return dataclasses.replace(self, int_data=int_data)

    def _require_per_tensor(self, what: str) -> None:
        if self.axis is not None or self.qscheme.is_per_channel:
            raise ValueError(f"QTensor.{what}() needs a per-tensor QTensor; this one is {self.qscheme!r}"
                             + (f" along axis {self.axis}: use q_per_channel_* instead" if self.axis is not None
                                else f" with block_size {self.block_size}: read .scale (the data's rank)"))

    def _require_per_channel(self, what: str) -> None:
        if self.axis is None:
            raise ValueError(f"QTensor.{what}() needs a per-channel QTensor; this one is {self.qscheme!r}"
                             + (": use q_scale()/q_zero_point() instead" if not self.qscheme.is_per_channel
                                else f" with block_size {self.block_size}: read .scale (the data's rank)"))

    def __jax_array__(self):
        # Reached when a quantized activation flows into a float JAX op (jnp.*, nnx.relu, ...):
        # say what to do instead of JAX's generic "not a valid JAX type".
        raise TypeError(
            f"a quantized activation ({self!r}) reached a float operation. Insert a DeQuantStub before "
            "float code (or call .dequantize()), or use a jaxquant.nn module that accepts QTensors"
        )

    def __repr__(self) -> str:
        where = "" if self.axis is None else f", axis={self.axis}"
        if self.axis is None and self.qscheme.is_per_channel:
            where += f", block_size={tuple(self.block_size)}"
        return f"QTensor(shape={self.shape}, dtype={self.dtype!r}, qscheme={self.qscheme!r}{where})"


def _check_dtype(dtype: QDType, where: str) -> None:
    if not isinstance(dtype, QDType):
        raise TypeError(f"{where}: dtype must be a jaxquant quantized dtype (qint8, quint8, qint32, ...), "
                        f"got {dtype!r}")


def _check_float_input(x: jax.Array, where: str) -> jax.Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{where}: expected a floating-point input, got {x.dtype}")
    return x.astype(jnp.float32)


def _is_concrete(value: object) -> bool:
    """True unless ``value`` is being traced (jit/vmap/grad): only then can the host read it."""
    return not isinstance(value, jax.core.Tracer)


# XLA:CPU flushes denormal float32 to zero, so a denormal scale behaves as 0 (1/scale = inf).
_SMALLEST_NORMAL = float(np.finfo(np.float32).tiny)


def _check_scale(scale: object, where: str, allow_zero: bool = False) -> None:
    """Eager check that every scale is a finite, positive, normal float32 (or 0 when ``allow_zero``)."""
    if not _is_concrete(scale):
        return
    s = np.asarray(scale, np.float32).reshape(-1)
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(s) & ((s >= _SMALLEST_NORMAL) | ((s == 0) if allow_zero else False))
    if not ok.all():
        i = int(np.argmin(ok))
        which = "scale" if s.size == 1 else f"scale of channel {i}"
        raise ValueError(
            f"{where}: {which} is {float(s[i])!r}; it must be finite and {'>= 0' if allow_zero else '> 0'}, and "
            f"a non-zero scale at least {_SMALLEST_NORMAL:.4g} (float32's smallest normal: XLA:CPU flushes "
            "smaller ones to zero). Compute it with an observer or choose_qparams"
        )


def _check_zero_point(zero_point: object, dtype: QDType, where: str) -> None:
    """Eager check that integer zero points lie in ``[dtype.min, dtype.max]``."""
    if not _is_concrete(zero_point):
        return
    zp = np.asarray(zero_point).reshape(-1)
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(zp) & (zp >= dtype.min) & (zp <= dtype.max) if zp.dtype.kind == "f" else \
            (zp >= dtype.min) & (zp <= dtype.max)
    if not ok.all():
        i = int(np.argmin(ok))
        which = "zero_point" if zp.size == 1 else f"zero_point of channel {i}"
        raise ValueError(f"{where}: {which} is {zp[i].item()!r}, outside {dtype!r}'s range "
                         f"[{dtype.min}, {dtype.max}]; every value would clamp to one end")


def _check_per_tensor_qparams(scale: object, zero_point: object, where: str) -> None:
    """One scale and one integer zero point: a vector is a per-channel call in disguise (its first
    entry would not silently apply to everything), and a fractional zero point would be truncated."""
    for name, value in (("scale", scale), ("zero_point", zero_point)):
        if int(np.prod(np.shape(value))) != 1:
            raise ValueError(f"{where}: {name} must be a single value, got shape {tuple(np.shape(value))}; for "
                             "one scale and zero point per channel use quantize_per_channel(x, scales, "
                             "zero_points, axis, dtype)")
    if _is_concrete(zero_point):
        zp = np.asarray(zero_point)
        if zp.dtype.kind == "f" and np.isfinite(zp).all() and not np.array_equal(zp, np.round(zp)):
            raise ValueError(f"{where}: zero_point must be an integer, got {zp.reshape(-1)[0].item()!r}; round it "
                             "(choose_qparams and the observers return int32 zero points), as "
                             "torch.quantize_per_tensor only takes an int")


def _check_finite_input(x: jax.Array, where: str) -> None:
    """Eager check for NaN/Inf in a concrete input (a traced one cannot be read on the host)."""
    if not _is_concrete(x) or x.size == 0:
        return
    if not bool(jnp.all(jnp.isfinite(x))):
        n = int(jnp.sum(~jnp.isfinite(x)))
        raise ValueError(
            f"{where}: the input contains NaN or Inf ({n} of {x.size} values, after conversion to float32); "
            "they would become arbitrary integers silently. Find where they come from, or replace them "
            "first (jnp.nan_to_num)"
        )


def _fbgemm_codes(x: jax.Array, scale: jax.Array, zero_point: jax.Array, qmin: int, qmax: int) -> jax.Array:
    # fbgemm's 8-bit per-tensor Quantize: one fused multiply-add x * (1/scale) + zero_point, rounded
    # once to float32, then to the nearest integer (ties to even). Dividing, or rounding the product
    # first, flips about one near-tie value in ten.
    inv_scale = jnp.float32(1.0) / scale
    product = x * inv_scale
    fused = tn.fma(x, inv_scale, zero_point.astype(jnp.float32))
    # The FMA emulation splits its operands, which overflows for |operands| above ~8e34; there the
    # product alone (two roundings) decides, which only differs from the FMA at exact ties.
    fallback = jnp.round(product) + zero_point.astype(jnp.float32)
    q = jnp.where(jnp.isfinite(fused), jnp.round(fused), fallback)
    return jnp.clip(q, qmin, qmax)


def _scalar_kernel_codes(x: jax.Array, scale: jax.Array, zero_point: jax.Array, qmin: int, qmax: int) -> jax.Array:
    # PyTorch's quantize_val (per-channel, and qint32): the product rounds to float32 on its own.
    inv_scale = jnp.float32(1.0) / scale
    product = x * inv_scale
    pinned = tn.rounded(product)  # NaN when the product is +-inf; the product then clamps as is
    q = jnp.round(jnp.where(jnp.isfinite(pinned), pinned, product) + zero_point.astype(jnp.float32))
    return jnp.clip(q, qmin, qmax)


def quantize_per_tensor(
    x: ArrayLike,
    scale: ArrayLike,
    zero_point: ArrayLike,
    dtype: QDType = quint8,
) -> QTensor:
    """Quantize a float tensor with one scale and zero point (``torch.quantize_per_tensor``).

    Args:
      x: float array of any shape.
      scale: float32 scalar.
      zero_point: integer scalar.
      dtype: ``quint8``, ``qint8`` or ``qint32``; values are clamped to its full range.
    Returns:
      A per-tensor affine :class:`QTensor` with ``int_data`` of ``x.shape`` in the storage dtype.
    Raises:
      ValueError (eager calls only, see the module docstring): ``scale`` not finite, ``<= 0`` or
      denormal; ``zero_point`` outside the dtype's range or not an integer; NaN/Inf in ``x``.
      ValueError (also under jit): ``scale`` or ``zero_point`` with more than one element.
    """
    _check_dtype(dtype, "quantize_per_tensor")
    x = _check_float_input(x, "quantize_per_tensor")
    _check_per_tensor_qparams(scale, zero_point, "quantize_per_tensor")
    _check_scale(scale, "quantize_per_tensor")
    _check_zero_point(zero_point, dtype, "quantize_per_tensor")
    _check_finite_input(x, "quantize_per_tensor")
    scale = jnp.asarray(scale, jnp.float32).reshape(())
    zero_point = jnp.asarray(zero_point).astype(jnp.int32).reshape(())
    codes = _scalar_kernel_codes if dtype == qint32 else _fbgemm_codes
    q = codes(x, scale, zero_point, dtype.min, dtype.max)
    return QTensor(q.astype(dtype.storage), scale, zero_point, dtype, per_tensor_affine, None)


def _channel_shape(ndim: int, axis: int) -> list[int]:
    shape = [1] * ndim
    shape[axis] = -1
    return shape


def quantize_per_channel(
    x: ArrayLike,
    scales: ArrayLike,
    zero_points: ArrayLike,
    axis: int,
    dtype: QDType = qint8,
) -> QTensor:
    """Quantize with one scale and zero point per slice along ``axis`` (``torch.quantize_per_channel``).

    Args:
      x: float array; ``x.shape[axis] == C``.
      scales: float32 ``(C,)``.
      zero_points: ``(C,)``; integers give ``per_channel_affine``, floats give
        ``per_channel_affine_float_qparams`` (zero point added before rounding, as PyTorch does).
      axis: the channel axis (negative values count from the end; stored normalised).
      dtype: the quantized dtype.
    Returns:
      A per-channel :class:`QTensor`.
    Raises:
      ValueError (eager calls only): as :func:`quantize_per_tensor`, per channel (zero scales are
      allowed with float zero points).
    """
    _check_dtype(dtype, "quantize_per_channel")
    x = _check_float_input(x, "quantize_per_channel")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"quantize_per_channel: axis {axis} is out of range for an input of shape {x.shape}")
    axis = axis % x.ndim
    scales = jnp.asarray(scales, jnp.float32).reshape(-1)
    zero_points = jnp.asarray(zero_points)
    channels = x.shape[axis]
    if scales.shape[0] != channels or zero_points.reshape(-1).shape[0] != channels:
        raise ValueError(
            f"quantize_per_channel: expected {channels} scales and zero points for axis {axis} of an input of "
            f"shape {x.shape}, got {scales.shape[0]} and {zero_points.reshape(-1).shape[0]}"
        )
    float_qparams = jnp.issubdtype(zero_points.dtype, jnp.floating)
    # PyTorch treats a zero scale as 1 with float zero points (constant embedding rows)
    _check_scale(scales, "quantize_per_channel", allow_zero=float_qparams)
    if not float_qparams:
        _check_zero_point(zero_points, dtype, "quantize_per_channel")
    _check_finite_input(x, "quantize_per_channel")
    bshape = _channel_shape(x.ndim, axis)
    s = scales.reshape(bshape)
    if float_qparams:
        zp = zero_points.astype(jnp.float32).reshape(-1)
        # PyTorch treats a zero scale as 1 here (embedding rows that are constant).
        inv_scale = jnp.where(s == 0, jnp.float32(1.0), jnp.float32(1.0) / s)
        q = jnp.clip(jnp.round(x * inv_scale + zp.reshape(bshape)), dtype.min, dtype.max)
        return QTensor(q.astype(dtype.storage), scales, zp, dtype, per_channel_affine_float_qparams, axis)
    zp = zero_points.astype(jnp.int32).reshape(-1)
    q = _scalar_kernel_codes(x, s, zp.reshape(bshape), dtype.min, dtype.max)
    return QTensor(q.astype(dtype.storage), scales, zp, dtype, per_channel_affine, axis)


def _expand(a: jax.Array, shape: tuple[int, ...], block_size: tuple[int, ...]) -> jax.Array:
    # repeat each entry over its block along the axes with several blocks; an axis with one block
    # (size 1 in the qparams) broadcasts as is
    for i, b in enumerate(block_size):
        if a.shape[i] not in (1, shape[i]):
            a = jnp.repeat(a, b, axis=i, total_repeat_length=shape[i])
    return a


def expand_qparams(q: QTensor) -> tuple[jax.Array, jax.Array]:
    """``(scale, zero_point)`` of ``q`` shaped to broadcast against ``q.int_data``, for every
    granularity (all ones per tensor, 1 on all axes but ``axis`` per channel, the data's shape on
    the grouped axes per group). Dtypes as stored."""
    return _expand(q.scale, q.shape, q.block_size), _expand(q.zero_point, q.shape, q.block_size)


def dequantize(q: QTensor) -> jax.Array:
    """float32 ``(int_data - zero_point) * scale``, the qparams broadcast by :func:`expand_qparams`."""
    if not isinstance(q, QTensor):
        raise TypeError(f"dequantize expects a QTensor, got {type(q).__name__}")
    s, zp = expand_qparams(q)
    if q.dtype == qint32 or q.qscheme == per_channel_affine_float_qparams:
        # qint32: q - zero_point can leave int32 at the range ends; float32 is the result anyway.
        return (q.int_data.astype(jnp.float32) - zp.astype(jnp.float32)) * s
    return (q.int_data.astype(jnp.int32) - zp).astype(jnp.float32) * s


def group_qparams_shape(shape: tuple[int, ...], block_size: tuple[int, ...], where: str) -> tuple[int, ...]:
    """The scale shape ``shape[i] // block_size[i]`` of a per-group tensor; ValueError naming ``where``
    unless every block size is positive and divides its axis."""
    shape, block_size = tuple(int(d) for d in shape), tuple(int(b) for b in block_size)
    if len(block_size) != len(shape) or any(b <= 0 or d % b for d, b in zip(shape, block_size)):
        raise ValueError(f"{where}: block_size {block_size} must have one positive entry per axis of shape "
                         f"{shape}, each dividing its axis (pad the axis to a multiple of the group size)")
    return tuple(d // b for d, b in zip(shape, block_size))


def quantize_per_group(
    x: ArrayLike,
    scales: ArrayLike,
    zero_points: ArrayLike,
    block_size: tuple[int, ...],
    dtype: QDType = qint8,
    qscheme: QScheme = per_channel_affine,
) -> QTensor:
    """Quantize with one scale and zero point per block (per group along an axis; torchao's
    ``quantize_affine`` granularity), with PyTorch's per-channel rounding
    (``round(fl(x * (1/scale)) + zero_point)``, clamped to ``dtype``'s range).

    Args:
      x: float array.
      scales: float32 of ``x``'s rank, ``x.shape[i] // block_size[i]`` along axis ``i``.
      zero_points: integers of the same shape.
      block_size: elements per block along each axis, e.g. ``(32, 1)`` for a ``(K, N)`` weight with
        groups of 32 input features per output channel.
      dtype: the quantized dtype (its range clamps: ``qint4`` gives 4-bit integers in int8 storage).
      qscheme: recorded as metadata (``per_channel_affine`` or ``per_channel_symmetric``).
    Returns:
      A per-group :class:`QTensor` (``block_size`` set, ``axis`` None).
    """
    _check_dtype(dtype, "quantize_per_group")
    x = _check_float_input(x, "quantize_per_group")
    block_size = tuple(int(b) for b in block_size)
    qshape = group_qparams_shape(x.shape, block_size, "quantize_per_group")
    scales = jnp.asarray(scales, jnp.float32)
    zero_points = jnp.asarray(zero_points)
    if scales.shape != qshape or zero_points.shape != qshape:
        raise ValueError(f"quantize_per_group: scales and zero points must have shape {qshape} for block_size "
                         f"{block_size} over {x.shape}, got {scales.shape} and {zero_points.shape}")
    _check_scale(scales, "quantize_per_group")
    _check_zero_point(zero_points, dtype, "quantize_per_group")
    _check_finite_input(x, "quantize_per_group")
    zero_points = zero_points.astype(jnp.int32)
    q = _scalar_kernel_codes(x, _expand(scales, x.shape, block_size), _expand(zero_points, x.shape, block_size),
                             dtype.min, dtype.max)
    return QTensor(q.astype(dtype.storage), scales, zero_points, dtype, qscheme, None, block_size)


def shard_qtensor(q: QTensor, mesh: Mesh, axis_name: Hashable, axis: Optional[int] = None) -> QTensor:
    """Place a QTensor on ``mesh`` with its int data split along ``axis`` over mesh axis ``axis_name``.

    ``axis`` defaults to the QTensor's channel axis (output channels of a per-channel weight, the last
    axis in flax layout). Per-channel scales and zero points are split the same way when ``axis`` is
    the channel axis, so each device holds its channels' integers together with their scales;
    otherwise (per tensor, or splitting another axis) they are replicated.

    Args:
      q: a per-tensor or per-channel QTensor; ``q.shape[axis]`` must be divisible by the size of mesh
        axis ``axis_name``.
    Returns:
      The same QTensor (values unchanged) whose leaves are ``jax.Array``s with ``NamedSharding``.
    """
    if q.axis is None and q.qscheme.is_per_channel:
        raise ValueError(f"shard_qtensor: {q!r} is per group; only per-tensor and per-channel QTensors are supported")
    if axis is None:
        if q.axis is None:
            raise ValueError(f"shard_qtensor: {q!r} is per tensor; pass axis= (e.g. axis=-1 for output "
                             "features of a flax kernel)")
        axis = q.axis
    axis = axis % q.ndim
    n = mesh.shape[axis_name]
    if q.shape[axis] % n:
        raise ValueError(f"shard_qtensor: axis {axis} of {q!r} has {q.shape[axis]} entries, not divisible by the "
                         f"{n} devices of mesh axis {axis_name!r}; pad the layer or use a mesh axis that divides it")
    spec = [None] * q.ndim
    spec[axis] = axis_name
    qp = NamedSharding(mesh, P(*spec) if q.axis == axis else P())  # qparams have the data's rank
    return QTensor(jax.device_put(q.int_data, NamedSharding(mesh, P(*spec))), jax.device_put(q.scale, qp),
                   jax.device_put(q.zero_point, qp), q.dtype, q.qscheme, q.axis)
