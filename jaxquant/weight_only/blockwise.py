"""Per-group (block-wise) quantized weights: int8 or int4 codes, one scale and zero point per
``group_size`` consecutive input features of each output channel.

One small pytree class, :class:`BlockQuantizedWeight`, holds a ``(K, N)`` (flax layout: in, out)
weight as

* ``data``: uint8 codes in the decode layout, output channels as rows: ``(N, Kp)`` for 8 bits;
  for 4 bits two codes per byte, ``(ceil(N/2), Kp)``, the low nibble holding row ``n`` and the high
  nibble row ``n + ceil(N/2)`` (packing along N lets the kernel unpack with a mask and a shift and
  feed each half straight to a dot -- see ``jaxquant.weight_only.matmul``);
* ``scale`` float32 ``(N, G)`` and ``zero_point`` int32 ``(N, G)`` in the unsigned code domain, so
  ``w[k, n] = scale[n, g] * (code[n, k] - zero_point[n, g])`` with ``g = k // group_size``.

``Kp = G * group_size`` is ``K`` rounded up when ``allow_partial_group`` pads the last group with
zero weights. Symmetric quantization uses PyTorch's signed range (``[-128, 127]`` / ``[-8, 7]``,
``scale = max|w| / ((qmax - qmin) / 2)``) stored shifted by ``2**(bits-1)``; asymmetric uses the
unsigned range with the zero point chosen so that 0 is exact (PyTorch's observer rule).
The codes are a per-group :class:`~jaxquant.qtensor.QTensor` (:meth:`BlockQuantizedWeight.codes`:
``(N, Kp)`` ``quint8``/``quint4`` with ``block_size (1, group_size)``), and :func:`dequantize_blockwise`
is QTensor's one dequantize path over it. The container keeps the packed decode layout above as
its fields (two int4 rows per byte), which the weight-only matmul and its native kernel read as is.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.dtypes import per_channel_affine, per_channel_symmetric, quint4, quint8
from jaxquant.qtensor import QTensor, dequantize

__all__ = ["BlockQuantizedWeight", "quantize_blockwise", "dequantize_blockwise", "block_layout",
           "pack_int4_rows", "unpack_int4_rows", "group_qparams", "codes_for"]

_EPS = float(np.finfo(np.float32).eps)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockQuantizedWeight:
    """A ``(in_features, out_features)`` weight quantized per group of ``group_size`` inputs.

    Attributes:
      data: uint8 ``(N, Kp)`` (8 bits) or ``(ceil(N/2), Kp)`` (4 bits, two rows per byte).
      scale: float32 ``(N, G)``.
      zero_point: int32 ``(N, G)``, unsigned code domain (``2**(bits-1)`` when symmetric).
      bits, group_size, in_features, out_features, symmetric: static metadata.
    """

    data: jax.Array
    scale: jax.Array
    zero_point: jax.Array
    bits: int = dataclasses.field(metadata=dict(static=True))
    group_size: int = dataclasses.field(metadata=dict(static=True))
    in_features: int = dataclasses.field(metadata=dict(static=True))
    out_features: int = dataclasses.field(metadata=dict(static=True))
    symmetric: bool = dataclasses.field(metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, int]:
        return (self.in_features, self.out_features)

    @property
    def n_groups(self) -> int:
        return int(self.scale.shape[-1])

    @property
    def padded_in_features(self) -> int:
        return self.n_groups * self.group_size

    @property
    def nbytes(self) -> int:
        """Bytes of codes + scales + zero points (what a checkpoint of this weight holds)."""
        return int(self.data.size * 1 + self.scale.size * 4 + (0 if self.symmetric else self.zero_point.size * 4))

    def dequantize(self) -> jax.Array:
        """float32 ``(in_features, out_features)``."""
        return dequantize_blockwise(self)

    def codes(self) -> QTensor:
        """The unsigned codes as a per-group QTensor ``(N, Kp)`` (output channels as rows, int4
        unpacked): ``quint8``/``quint4``, ``block_size (1, group_size)``, ``scale``/``zero_point``
        ``(N, G)``; ``per_channel_symmetric`` when symmetric (zero point ``2**(bits-1)``)."""
        return QTensor(_codes_matrix(self), self.scale, self.zero_point, quint4 if self.bits == 4 else quint8,
                       per_channel_symmetric if self.symmetric else per_channel_affine, None,
                       (1, self.group_size))

    def __repr__(self) -> str:
        g = "per-channel" if self.n_groups == 1 else f"group {self.group_size}"
        return (f"BlockQuantizedWeight(int{self.bits}, {g}, {'symmetric' if self.symmetric else 'asymmetric'}, "
                f"shape=({self.in_features}, {self.out_features}))")


def block_layout(in_features: int, group_size: Optional[int], allow_partial_group: bool,
                 where: str = "") -> tuple[int, int]:
    """``(group_size, n_groups)`` for ``in_features`` inputs; ``group_size=None`` is per channel.

    Raises ValueError naming ``where`` if the group size does not divide ``in_features`` and
    ``allow_partial_group`` is False.
    """
    k = int(in_features)
    if group_size is None:
        return k, 1
    gs = int(group_size)
    if gs < 1:
        raise ValueError(f"{where}: group_size must be a positive integer, got {group_size}")
    if k % gs:
        if not allow_partial_group:
            divisors = [d for d in (16, 32, 64, 128, 256) if k % d == 0]
            raise ValueError(f"{where}: group_size {gs} does not divide the contraction size {k}; use a divisor "
                             f"({', '.join(map(str, divisors)) or 'none of 16..256'}), group_size=None (per channel), "
                             "or allow_partial_group=True (the last group is narrower, padded with zero weights)")
        return gs, -(-k // gs)
    return gs, k // gs


def _ranges(bits: int, symmetric: bool) -> tuple[int, int]:
    if bits not in (4, 8):
        raise ValueError(f"weight-only quantization supports 4 or 8 bits, got {bits}")
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if symmetric else (0, (1 << bits) - 1)


def group_qparams(w_groups: jax.Array, bits: int, symmetric: bool) -> tuple[jax.Array, jax.Array]:
    """Scale float32 and zero point int32 (unsigned code domain) per group.

    ``w_groups``: float ``(..., group_size)``; returns two ``(...)`` arrays.
    """
    qmin, qmax = _ranges(bits, symmetric)
    w = w_groups.astype(jnp.float32)
    if symmetric:
        amax = jnp.max(jnp.abs(w), axis=-1)
        scale = jnp.maximum(amax / ((qmax - qmin) / 2), _EPS)
        zp = jnp.full(scale.shape, -qmin, jnp.int32)
    else:
        mn = jnp.minimum(jnp.min(w, axis=-1), 0.0)
        mx = jnp.maximum(jnp.max(w, axis=-1), 0.0)
        scale = jnp.maximum((mx - mn) / (qmax - qmin), _EPS)
        zp = jnp.clip(qmin - jnp.round(mn / scale), qmin, qmax).astype(jnp.int32)
    return scale, zp


def codes_for(w: jax.Array, scale: jax.Array, zero_point: jax.Array, bits: int) -> jax.Array:
    """Unsigned codes ``clip(round(w / scale) + zero_point, 0, 2**bits - 1)`` (int32, broadcasting)."""
    q = jnp.round(w.astype(jnp.float32) / scale) + zero_point.astype(jnp.float32)
    return jnp.clip(q, 0, (1 << bits) - 1).astype(jnp.int32)


def pack_int4_rows(codes: jax.Array) -> jax.Array:
    """uint8 ``(ceil(N/2), K)`` from 4-bit codes ``(N, K)``: row ``n`` low nibble, ``n + N/2`` high."""
    n = codes.shape[0]
    half = -(-n // 2)
    c = jnp.pad(codes.astype(jnp.uint8), ((0, 2 * half - n), (0, 0)))
    return (c[:half] | (c[half:] << 4)).astype(jnp.uint8)


def unpack_int4_rows(packed: jax.Array, n: int) -> jax.Array:
    """Inverse of :func:`pack_int4_rows`: uint8 codes ``(n, K)``."""
    return jnp.concatenate([packed & 15, packed >> 4], axis=0)[:n]


def _codes_matrix(q: BlockQuantizedWeight) -> jax.Array:
    if q.bits == 4:
        return unpack_int4_rows(q.data, q.out_features)
    return q.data


def from_codes(codes_nk: jax.Array, scale: jax.Array, zero_point: jax.Array, *, bits: int, group_size: int,
               in_features: int, symmetric: bool) -> BlockQuantizedWeight:
    """Assemble a :class:`BlockQuantizedWeight` from unsigned codes ``(N, Kp)`` and ``(N, G)`` qparams."""
    n = codes_nk.shape[0]
    data = pack_int4_rows(codes_nk) if bits == 4 else codes_nk.astype(jnp.uint8)
    return BlockQuantizedWeight(data, jnp.asarray(scale, jnp.float32), jnp.asarray(zero_point, jnp.int32),
                                bits=int(bits), group_size=int(group_size), in_features=int(in_features),
                                out_features=int(n), symmetric=bool(symmetric))


def quantize_blockwise(w: jax.Array, *, bits: int = 8, group_size: Optional[int] = None, symmetric: bool = True,
                       allow_partial_group: bool = False, where: str = "quantize_blockwise") -> BlockQuantizedWeight:
    """Round-to-nearest (RTN) per-group quantization of a float ``(K, N)`` weight.

    Args:
      w: float ``(in_features, out_features)`` (flax kernel layout).
      bits: 8 or 4.
      group_size: inputs per group along K; ``None`` = one group (per output channel).
      symmetric: signed range, zero point fixed at ``2**(bits-1)``; else affine with 0 exact.
      allow_partial_group: pad K to a multiple of ``group_size`` with zero weights.
      where: the layer name for error messages.
    """
    w = jnp.asarray(w)
    if w.ndim != 2 or not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(f"{where}: expected a float (in_features, out_features) weight, got {w.dtype}{w.shape}")
    if not isinstance(w, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(w))):
        raise ValueError(f"{where}: the weight holds Inf/NaN; fix the float model before quantizing")
    _ranges(bits, symmetric)
    k, n = w.shape
    gs, g = block_layout(k, group_size, allow_partial_group, where)
    wt = jnp.pad(w.astype(jnp.float32).T, ((0, 0), (0, g * gs - k))).reshape(n, g, gs)
    scale, zp = group_qparams(wt, bits, symmetric)
    codes = codes_for(wt, scale[..., None], zp[..., None], bits).reshape(n, g * gs)
    return from_codes(codes, scale, zp, bits=bits, group_size=gs, in_features=k, symmetric=symmetric)


def dequantize_blockwise(q: BlockQuantizedWeight) -> jax.Array:
    """float32 ``(in_features, out_features)``: ``scale * (code - zero_point)`` per group, through
    :func:`jaxquant.qtensor.dequantize` of :meth:`BlockQuantizedWeight.codes`."""
    return dequantize(q.codes())[:, :q.in_features].T
