"""Static int8 convolution (1-D/2-D/3-D, NHWC) and transposed convolution.

XLA's int8 ``conv_general_dilated`` runs YNNPACK's s8 x s8 path (no VNNI) and is barely
faster than float32; grouped convs via ``feature_group_count`` are 12-66x slower than
needed (PERF_NOTES). So the formulation is chosen by shape at prepack time:

* ``"dot"``: 1x1, stride 1, no padding: a plain u8 x s8 dot over pixels.
* ``"im2col"``: the k taps' strided slices concatenated along channels, then one u8 x s8
  dot of ``(pixels, taps*cin) x (taps*cin, cout)``; the batch is tiled (``lax.map``) so the
  im2col and int32 accumulator temporaries of a tile stay around ``IM2COL_TILE_BYTES``.
* ``"depthwise"``: ``groups == cin`` and one input channel per group: a taps-long
  shift-multiply-add loop in int32 that XLA fuses into one elementwise loop.
* ``"grouped"``: any other ``groups``: im2col per group and a batched u8 x s8 dot.

Padding is done with the *input zero point* (the quantized value of real 0), so padded taps
contribute exactly 0 to ``sum (x - zx)(w - zw)``, which lets every zero-point term be folded
into a per-output-channel int32 offset at prepack time. The output pipeline is
:func:`jaxquant.kernels.requantize.requantize` (fbgemm's formula).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxquant.dtypes import QDType
from jaxquant.kernels.linear import PackedWeight, int8_matmul_acc, pack_weight, to_uint8_activation
from jaxquant.kernels.mixed_dot import dot_general_u8s8
from jaxquant.kernels.requantize import output_multiplier, requantize
from jaxquant.native import ops as native_ops
from jaxquant.qtensor import QTensor

__all__ = ["PackedConv", "pack_conv", "quantized_conv", "pack_conv_transpose", "quantized_conv_transpose",
           "IM2COL_TILE_BYTES", "clamp_codes"]

Padding = Union[str, Sequence[tuple[int, int]]]

# Target size of one batch tile's temporaries: uint8 im2col plus int32 accumulator. Untiled, a large
# batch's temporaries page-fault under glibc malloc and fall out of cache between the dot and its
# epilogue; tiles that are too small pay XLA's per-kernel thread hand-off once per tile. Measured on
# 2 cores (ms): 3x3 64->64 @56 batch 32: 15.2 / 11.8 / 31.7 at 1 / 8 / 64 MB; Fashion-MNIST CNN batch
# 64: 2.40 / 1.81 / 1.70 at 2 / 8 / 32 MB, batch 256: 9.24 / 7.29 / 7.37.
IM2COL_TILE_BYTES = 8 << 20


def _field(static: bool = False):
    return dataclasses.field(metadata={"static": static})


def _tuple(v, n: int, name: str) -> tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * n
    v = tuple(int(i) for i in v)
    if len(v) != n:
        raise ValueError(f"{name} must have {n} entries (one per spatial dim), got {v}")
    return v


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedConv:
    """An int8 convolution's weight, packed once; nothing in it depends on the input or output qparams.

    Leaves: ``weight`` (a :class:`PackedWeight` of the ``(taps*cin, cout)`` matrix for
    "dot"/"im2col"), ``w_grouped`` (int8 ``(G, cout/G, taps*cin/G)`` for "grouped"),
    ``w_taps`` (int32 ``(taps, cout)`` = ``w - zw`` for "depthwise"), ``colsum`` int32 ``(cout,)``
    (``sum w`` over taps and input channels; for "depthwise" ``sum (w - zw)``), ``w_zero_point``
    int32 ``(cout,)``, ``w_scale`` float32 ``(cout,)``, ``bias`` float32 ``(cout,)`` or None.
    Static: the formulation ``kind``, the geometry (``padding`` may hold negative pairs, which crop,
    and ``input_dilation`` > 1 inserts zero-point pixels: a transposed convolution).
    """

    weight: Optional[PackedWeight]
    w_grouped: Optional[jax.Array]
    w_taps: Optional[jax.Array]
    colsum: jax.Array
    w_zero_point: jax.Array
    w_scale: jax.Array
    bias: Optional[jax.Array]
    kind: str = _field(static=True)
    kernel_size: tuple[int, ...] = _field(static=True)
    in_channels: int = _field(static=True)
    out_channels: int = _field(static=True)
    strides: tuple[int, ...] = _field(static=True)
    padding: Union[str, tuple[tuple[int, int], ...]] = _field(static=True)
    dilation: tuple[int, ...] = _field(static=True)
    groups: int = _field(static=True)
    has_w_zero_point: bool = _field(static=True)
    input_dilation: tuple[int, ...] = _field(static=True)
    # oneDNN's packed weight (uint8 blob) when the native backend took this conv at pack time, else None.
    native_weight: Optional[jax.Array] = dataclasses.field(default=None, metadata={"static": False})


def pack_conv(
    w_int8: jax.Array,
    w_scale: jax.Array,
    w_zero_point: jax.Array,
    bias: Optional[jax.Array] = None,
    *,
    strides: Union[int, Sequence[int]] = 1,
    padding: Padding = "VALID",
    dilation: Union[int, Sequence[int]] = 1,
    groups: int = 1,
    input_dilation: Union[int, Sequence[int]] = 1,
    act_lhs_kn: bool = False,
    native_weight: Optional[jax.Array] = None,
) -> PackedConv:
    """Pack an int8 conv weight once (at convert time) for :func:`quantized_conv`.

    Args:
      w_int8: int8 ``(k_1, ..., k_d, cin/groups, cout)`` (flax ``nnx.Conv`` kernel layout).
      w_scale: float32 ``()`` or ``(cout,)``; w_zero_point: int32 ``()`` or ``(cout,)``.
      bias: float32 ``(cout,)`` or None.
      strides, dilation: ints or one per spatial dim.
      padding: ``"SAME"``, ``"VALID"`` or explicit ``((lo, hi), ...)`` per spatial dim
        (PyTorch's ``padding=p`` is ``((p, p),) * d``); negative pairs crop.
      groups: feature groups; ``groups == cin`` with ``cin/groups == 1`` is depthwise.
      input_dilation: ints or one per spatial dim: ``s - 1`` zero-point pixels inserted between
        input pixels (``lax.conv_transpose``'s strides; see :func:`pack_conv_transpose`).
      act_lhs_kn: keep the dot weight untransposed (for packing inside a traced function, see
        :class:`PackedWeight`).
      native_weight: the oneDNN blob of this weight packed earlier, outside the trace (Linen packs
        inside ``apply``, where the weight and zero point are tracers): ``.native_weight`` of a
        concrete :func:`pack_conv` of the same weight and geometry, which exists only for a
        symmetric weight, so it also marks the zero point as 0.
    """
    w = jnp.asarray(w_int8)
    if w.dtype != jnp.int8 or w.ndim < 3:
        raise TypeError(f"conv weight must be int8 (k..., cin/groups, cout), got "
                        f"{w.dtype}{tuple(w.shape)}")
    nd = w.ndim - 2
    ks = tuple(int(k) for k in w.shape[:nd])
    cin_g, cout = int(w.shape[-2]), int(w.shape[-1])
    if cout % groups:
        raise ValueError(f"out channels {cout} not divisible by groups={groups}")
    cin = cin_g * groups
    strides_t = _tuple(strides, nd, "strides")
    dilation_t = _tuple(dilation, nd, "dilation")
    input_dilation_t = _tuple(input_dilation, nd, "input_dilation")
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            raise ValueError(f"padding must be 'SAME', 'VALID' or explicit pairs, got {padding!r}")
        padding_t: Union[str, tuple] = padding.upper()
    else:
        padding_t = tuple((int(lo), int(hi)) for lo, hi in padding)
        if len(padding_t) != nd:
            raise ValueError(f"padding needs {nd} (lo, hi) pairs, got {padding}")
    if (isinstance(padding_t, str) or any(s != 1 for s in strides_t)) and any(s != 1 for s in input_dilation_t):
        raise ValueError("input_dilation needs explicit padding and strides 1 (a transposed convolution)")
    taps = int(np.prod(ks))
    zw = jnp.broadcast_to(jnp.asarray(w_zero_point, jnp.int32), (cout,))
    w32 = w.astype(jnp.int32).reshape(taps * cin_g, cout)
    if bias is not None:
        bias = jnp.asarray(bias, jnp.float32)
        if bias.shape != (cout,):
            raise ValueError(f"bias must have shape ({cout},), got {bias.shape}")

    weight = w_grouped = w_taps = None
    pointwise = all(k == 1 for k in ks) and all(s == 1 for s in strides_t) and (
        padding_t in ("VALID", "SAME") or all(max(lo, 0) == max(hi, 0) == 0 for lo, hi in padding_t))
    if groups == 1:
        kind = "dot" if pointwise else "im2col"
        weight = pack_weight(w.reshape(taps * cin_g, cout), zw, layouts="act_lhs", act_lhs_kn=act_lhs_kn)
    elif cin_g == 1 and groups == cin:
        kind = "depthwise"
        w_taps = w32 - zw  # (taps, cout)
    else:
        kind = "grouped"
        cout_g = cout // groups
        # (taps, cin_g, G, cout_g) -> (G, cout_g, taps*cin_g)
        wg = w.reshape(taps, cin_g, groups, cout_g).transpose(2, 3, 0, 1)
        w_grouped = wg.reshape(groups, cout_g, taps * cin_g)
    has_zw = native_weight is None
    try:
        has_zw = bool(np.any(np.asarray(zw) != 0))
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        pass
    if has_zw:
        native_weight = None
    elif native_weight is None:
        # relu and the output dtype are per call now; the blob's layout does not depend on them.
        cfg = native_ops.conv_cfg(ks, strides_t, ((0, 0),) * nd, dilation_t, groups, cin, cout, False,
                                  bias is not None, "uint8")
        blob = native_ops.pack_conv_weight(w, cfg)
        native_weight = None if blob is None else jnp.asarray(blob)
    return PackedConv(
        native_weight=native_weight,
        weight=weight, w_grouped=w_grouped, w_taps=w_taps,
        colsum=jnp.sum(w32 if w_taps is None else w_taps, axis=0, dtype=jnp.int32), w_zero_point=zw,
        w_scale=jnp.broadcast_to(jnp.asarray(w_scale, jnp.float32), (cout,)), bias=bias,
        kind=kind, kernel_size=ks, in_channels=cin, out_channels=cout, strides=strides_t,
        padding=padding_t, dilation=dilation_t, groups=int(groups), has_w_zero_point=has_zw,
        input_dilation=input_dilation_t,
    )


def _input_offset(p: PackedConv, zx: jax.Array) -> jax.Array:
    """int32 ``(cout,)``: the zero-point terms ``K zx zw - zx colsum(W)`` of an input with (uint8)
    zero point ``zx`` (for depthwise, whose taps already hold ``w - zw``: ``-zx sum(w - zw)``)."""
    if p.kind == "depthwise":
        return -zx * p.colsum
    k_red = int(np.prod(p.kernel_size)) * (p.in_channels // p.groups)
    return k_red * zx * p.w_zero_point - zx * p.colsum


def _resolve_padding(p: PackedConv, spatial: Sequence[int]) -> list[tuple[int, int]]:
    if isinstance(p.padding, str):
        eff = [(k - 1) * d + 1 for k, d in zip(p.kernel_size, p.dilation)]
        return lax.padtype_to_pads(tuple(spatial), eff, p.strides, p.padding)
    return list(p.padding)


def _taps(x_pad: jax.Array, p: PackedConv, out_sp: Sequence[int]):
    """Yield, per kernel tap (row-major over kernel dims), the strided input slice
    ``(N, *out_sp, C)`` that the tap multiplies."""
    nd = len(p.kernel_size)
    for tap in itertools.product(*(range(k) for k in p.kernel_size)):
        start = [0] + [t * d for t, d in zip(tap, p.dilation)] + [0]
        limit = ([x_pad.shape[0]] + [s + (o - 1) * st + 1 for s, o, st in
                                      zip(start[1:1 + nd], out_sp, p.strides)] + [x_pad.shape[-1]])
        yield lax.slice(x_pad, start, limit, [1] + list(p.strides) + [1])


def _conv_acc(x_pad: jax.Array, zx: jax.Array, offset: jax.Array, p: PackedConv,
              out_sp: Sequence[int]) -> jax.Array:
    """int32 accumulator ``(N, *out_sp, cout)`` of one batch tile (x_pad uint8, padded)."""
    n = x_pad.shape[0]
    pixels = n * int(np.prod(out_sp))
    if p.kind == "depthwise":
        mult = p.out_channels // p.in_channels
        acc = None
        for t, xs in enumerate(_taps(x_pad, p, out_sp)):
            xs = xs.astype(jnp.int32)
            if mult > 1:
                xs = jnp.repeat(xs, mult, axis=-1)
            term = xs * p.w_taps[t]
            acc = term if acc is None else acc + term
        return acc + offset
    if p.kind == "dot":
        cols = x_pad.reshape(pixels, p.in_channels)
    else:
        cols = jnp.concatenate(list(_taps(x_pad, p, out_sp)), axis=-1)
        cols = cols.reshape(pixels, -1)
    if p.kind in ("dot", "im2col"):
        acc = int8_matmul_acc(cols, zx, p.weight, offset=offset, layout="act_lhs")
        return acc.reshape(n, *out_sp, p.out_channels)
    # grouped: (pixels, taps, G, cin_g) -> (G, pixels, taps*cin_g)
    g = p.groups
    cin_g = p.in_channels // g
    taps = int(np.prod(p.kernel_size))
    cols_g = cols.reshape(pixels, taps, g, cin_g).transpose(2, 0, 1, 3).reshape(g, pixels, -1)
    acc = dot_general_u8s8(cols_g, p.w_grouped, (((2,), (2,)), ((0,), (0,))))  # (G, P, cout_g)
    acc = acc.transpose(1, 0, 2).reshape(pixels, p.out_channels) + offset
    if p.has_w_zero_point:
        rowsum = jnp.sum(cols_g, axis=2, dtype=jnp.int32).T  # (P, G)
        acc = acc - jnp.repeat(rowsum, p.out_channels // g, axis=1) * p.w_zero_point
    return acc.reshape(n, *out_sp, p.out_channels)


def _batch_tile(n: int, bytes_per_image: int) -> int:
    """Largest divisor of n whose tile stays within IM2COL_TILE_BYTES (at least 1); a symbolic batch
    (jax.export) is not tiled."""
    if not isinstance(n, (int, np.integer)):
        return n
    best = 1
    for c in range(1, n + 1):
        if n % c == 0 and c * bytes_per_image <= IM2COL_TILE_BYTES:
            best = c
    return best


def clamp_codes(lo: float, hi: float, scale: jax.Array, zero_point: jax.Array) -> jax.Array:
    """int32 ``(2,)``: the output codes of the real bounds ``[lo, hi]`` under ``(scale, zero_point)``,
    each ``round(b / scale) + zero_point`` as the quantized ReLU6 module computes its upper code
    (``lo = 0`` gives the zero point); an infinite bound gives the int32 limit.

    Args:
      lo, hi: Python floats, ``lo <= hi`` (``-inf`` / ``inf`` for no bound).
      scale: float32 ``()``, > 0; zero_point: int ``()``.
    """
    if not lo <= hi:
        raise ValueError(f"clamp_codes: the clamp's lower bound {lo} is above its upper bound {hi}")
    zp = jnp.asarray(zero_point).astype(jnp.int32).reshape(())
    scale = jnp.asarray(scale, jnp.float32).reshape(())
    info = np.iinfo(np.int32)

    def code(b: float) -> jax.Array:
        if np.isinf(b):
            return jnp.int32(info.max if b > 0 else info.min)
        return jnp.round(jnp.float32(b) / scale).astype(jnp.int32) + zp
    return jnp.stack([code(lo), code(hi)])


def _clamp(y: jax.Array, clamp: jax.Array) -> jax.Array:
    """The saturated output codes ``y`` clipped to ``clamp`` int32 ``(2,)``: in int32, then back into
    ``y``'s dtype (as the quantized ReLU6 module clips, so the two give the same codes)."""
    info = jnp.iinfo(y.dtype)
    q = jnp.clip(y.astype(jnp.int32), clamp[0], clamp[1])
    return jnp.clip(q, int(info.min), int(info.max)).astype(y.dtype)


def quantized_conv(x: QTensor, packed: PackedConv, out_scale: jax.Array, out_zero_point: jax.Array, *,
                   out_dtype: QDType, relu: bool = False, clamp: Optional[jax.Array] = None) -> QTensor:
    """Static int8 convolution (or transposed convolution, see :func:`pack_conv_transpose`), channels
    last, PyTorch's x86 ``quantized::conv{1,2,3}d`` (fbgemm's output pipeline).

    Padding is done with the input's zero point (real 0), so padded taps contribute exactly 0; the
    terms that depend on the input's qparams (O(cout)) are folded per call.

    Args:
      x: per-tensor QTensor ``(N, *spatial, cin)``, uint8 or int8 data.
      packed: from :func:`pack_conv` or :func:`pack_conv_transpose`.
      out_scale, out_zero_point: float32 ``()`` / int32 ``()`` output qparams.
      out_dtype: ``quint8`` or ``qint8``; relu: fused ReLU.
      clamp: None, or int32 ``(2,)`` output codes (see :func:`clamp_codes`): "this conv is followed by
        a clip", e.g. a ReLU6 with the conv's output qparams. The saturated codes are clipped to
        ``[clamp[0], clamp[1]]``, the same codes as a separate quantized ReLU6 module gives; the
        native backend does it inside its conv call, the XLA kernels in the conv's epilogue.

    Returns:
      QTensor ``(N, *out_spatial, cout)`` of ``out_dtype``.
    """
    p = packed
    nd = len(p.kernel_size)
    if x.axis is not None:
        raise ValueError("quantized_conv: activations must be quantized per tensor, got a per-channel QTensor")
    if x.ndim != nd + 2 or x.shape[-1] != p.in_channels:
        raise ValueError(f"quantized_conv expects (N, {nd} spatial dims, {p.in_channels}) input, "
                         f"got shape {x.shape}")
    x_u8, zx = to_uint8_activation(x.int_data, x.q_zero_point())
    pads = None if isinstance(p.padding, str) else p.padding
    if any(s > 1 for s in p.input_dilation) or (pads and any(lo < 0 or hi < 0 for lo, hi in pads)):
        # interior padding inserts stride-1 copies of the zero point (real 0); negative pads crop
        x_u8 = lax.pad(x_u8, zx.astype(jnp.uint8), [(0, 0, 0)] + [
            (min(lo, 0), min(hi, 0), s - 1) for (lo, hi), s in zip(pads, p.input_dilation)] + [(0, 0, 0)])
        p = dataclasses.replace(p, padding=tuple((max(lo, 0), max(hi, 0)) for lo, hi in pads))
    offset = _input_offset(p, zx)
    act_times_w, multiplier = output_multiplier(x.q_scale(), p.w_scale, out_scale)
    bias_over_scale = None if p.bias is None else p.bias / act_times_w
    if p.kind != "dot":
        # Every tap slice reads the input; without the barrier XLA fuses the producer (the quantize
        # of a QuantStub, or the previous layer's requantize) into each slice and recomputes it
        # per tap (3% of the Fashion-MNIST CNN at batch 64).
        x_u8 = lax.optimization_barrier(x_u8)
    spatial = x_u8.shape[1:-1]
    pads = _resolve_padding(p, spatial)
    out_sp = [(s + lo + hi - ((k - 1) * d + 1)) // st + 1 for s, (lo, hi), k, d, st in
              zip(spatial, pads, p.kernel_size, p.dilation, p.strides)]
    if any(o <= 0 for o in out_sp):
        raise ValueError(f"quantized_conv: input spatial {tuple(spatial)} is smaller than the "
                         f"dilated kernel {p.kernel_size} (dilation {p.dilation})")
    n = x_u8.shape[0]
    if native_ops.conv_supported(x_u8.shape, p.native_weight, p.has_w_zero_point):
        cfg = native_ops.conv_cfg(p.kernel_size, p.strides, pads, p.dilation, p.groups, p.in_channels,
                                  p.out_channels, relu, bias_over_scale is not None, out_dtype.storage)
        if cfg is not None:
            y = native_ops.native_conv(x_u8, p.native_weight, p.colsum, bias_over_scale, multiplier, zx,
                                       out_zero_point, cfg, out_dtype.storage, clamp=clamp)
            return QTensor(y, out_scale, out_zero_point, out_dtype)

    def body(xt):
        # Padding inside the tile lets XLA fuse it into the tap slices instead of writing a
        # padded copy of the whole batch first.
        if any(lo or hi for lo, hi in pads):
            xt = lax.pad(xt, zx.astype(jnp.uint8), [(0, 0, 0)] + [(lo, hi, 0) for lo, hi in pads]
                         + [(0, 0, 0)])
        acc = _conv_acc(xt, zx, offset, p, out_sp)
        yt = requantize(acc, multiplier, out_zero_point, bias_over_scale=bias_over_scale, relu=relu,
                        out_dtype=out_dtype.storage)
        return yt if clamp is None else _clamp(yt, clamp)

    y = None
    if p.kind in ("dot", "im2col", "grouped"):
        # Per image: the uint8 im2col and the int32 accumulator the dot writes and the epilogue reads.
        im2col_row = 0 if p.kind == "dot" else int(np.prod(p.kernel_size)) * (p.in_channels // p.groups) * (
            p.groups if p.kind == "grouped" else 1)
        per_image = int(np.prod(out_sp)) * (im2col_row + 4 * p.out_channels)
        tile = _batch_tile(n, per_image)
        if tile is not n and tile < n:
            y = lax.map(body, x_u8.reshape(n // tile, tile, *x_u8.shape[1:]))
            y = y.reshape(n, *y.shape[2:])
    if y is None:
        y = body(x_u8)
    return QTensor(y, out_scale, out_zero_point, out_dtype)


# -------------------------------------------------------------------- transposed conv


def pack_conv_transpose(
    w_int8: jax.Array,
    w_scale: jax.Array,
    w_zero_point: jax.Array,
    bias: Optional[jax.Array] = None,
    *,
    strides: Union[int, Sequence[int]] = 1,
    padding: Union[int, Sequence[int]] = 0,
    output_padding: Union[int, Sequence[int]] = 0,
    dilation: Union[int, Sequence[int]] = 1,
    groups: int = 1,
) -> PackedConv:
    """Pack a transposed conv with PyTorch ``ConvTranspose{1,2,3}d`` semantics for
    :func:`quantized_conv_transpose`.

    ``w_int8`` is int8 ``(k..., cin, cout/groups)``: PyTorch's ``(cin, cout/groups, k...)``
    with the kernel dims moved first. ``padding``/``output_padding`` are PyTorch's ints.

    Formulation: dilate the input by ``strides`` (filling with the input zero point), pad by
    ``dilation*(k-1) - padding`` (+ ``output_padding`` at the end), and run the stride-1
    int8 conv with the spatially flipped kernel (:func:`pack_conv` with ``input_dilation``).
    """
    w = jnp.asarray(w_int8)
    if w.dtype != jnp.int8 or w.ndim < 3:
        raise TypeError(f"transposed conv weight must be int8 (k..., cin, cout/groups), got "
                        f"{w.dtype}{tuple(w.shape)}")
    nd = w.ndim - 2
    ks = w.shape[:nd]
    cin = int(w.shape[-2])
    if cin % groups:
        raise ValueError(f"in channels {cin} not divisible by groups={groups}")
    cin_g = cin // groups
    pad_t = _tuple(padding, nd, "padding")
    opad_t = _tuple(output_padding, nd, "output_padding")
    dil_t = _tuple(dilation, nd, "dilation")
    wf = jnp.flip(w, axis=tuple(range(nd)))
    # per group g: conv weight (k, cin_g, cout_g) = wf[..., g*cin_g:(g+1)*cin_g, :]
    wc = jnp.concatenate([wf[..., g * cin_g:(g + 1) * cin_g, :] for g in range(groups)], axis=-1)
    pads = tuple((d * (k - 1) - p, d * (k - 1) - p + op)
                 for k, p, op, d in zip(ks, pad_t, opad_t, dil_t))
    return pack_conv(wc, w_scale, w_zero_point, bias, strides=1, padding=pads, dilation=dil_t, groups=groups,
                     input_dilation=_tuple(strides, nd, "strides"))


def quantized_conv_transpose(x: QTensor, packed: PackedConv, out_scale: jax.Array, out_zero_point: jax.Array,
                             *, out_dtype: QDType, relu: bool = False) -> QTensor:
    """Static int8 transposed convolution, channels last: :func:`quantized_conv` of a
    :func:`pack_conv_transpose` weight.

    ``x``: per-tensor QTensor ``(N, *spatial, cin)``; returns ``(N, *out_spatial, cout)`` with
    ``out = (in - 1) * stride - 2 * padding + dilation * (k - 1) + output_padding + 1``.
    """
    return quantized_conv(x, packed, out_scale, out_zero_point, out_dtype=out_dtype, relu=relu)
