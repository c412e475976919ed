"""AWQ, activation-aware weight quantization (Lin et al. 2023).

Salient input channels (large mean activation magnitude ``s_X``) are protected by scaling them up
before quantization and dividing the input by the same factor: with ``s = s_X^alpha`` (normalised
so that ``sqrt(max(s) min(s)) = 1``),
``Q(W diag(s)) (diag(s)^-1 X)`` replaces ``Q(W) X``. ``alpha`` is searched on a grid to minimise the
layer's output error ``|| W X - Q(W diag(s)) diag(s)^-1 X ||^2``, computed exactly from the
calibration Hessian as ``tr(E^T (X X^T) E)`` with ``E = W - diag(s)^-1 Q(diag(s) W)`` in flax layout
(no activation samples needed). Here ``diag(s)^-1`` stays in the layer (``input_scale``: one
elementwise divide per call) instead of being folded into the previous op, so any ``nnx.Linear``
can take it.

The paper's weight-clipping search follows: for each output channel and group, the quantization
range is shrunk to ``r * max|w|`` for ``r`` on a grid (1.0 down to 0.5) and the ``r`` with the
smallest output error of that group, ``e_g^T (X_g^T X_g) e_g`` (the Hessian's diagonal block for the
group's inputs, after the input scaling), is kept. ``r = 1`` is in the grid, so clipping never raises
a group's error on the calibration data.
"""
from __future__ import annotations

from functools import partial
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.weight_only.blockwise import (BlockQuantizedWeight, block_layout, codes_for, from_codes,
                                            group_qparams, quantize_blockwise)

__all__ = ["awq_search", "awq_quantize", "awq_clip", "quantize_awq", "DEFAULT_ALPHA_GRID", "DEFAULT_CLIP_GRID"]

DEFAULT_ALPHA_GRID: tuple[float, ...] = tuple(np.round(np.arange(0.0, 1.0001, 0.05), 2))
DEFAULT_CLIP_GRID: tuple[float, ...] = tuple(np.round(np.arange(1.0, 0.4999, -0.05), 2))


def _fake_quant(w, bits, gs, symmetric, allow_partial):
    return quantize_blockwise(w, bits=bits, group_size=gs, symmetric=symmetric,
                              allow_partial_group=allow_partial).dequantize()


@partial(jax.jit, static_argnames=("bits", "gs", "symmetric", "allow_partial"))
def _losses(kernel, xtx, s_x, alphas, *, bits, gs, symmetric, allow_partial):
    def one(alpha):
        s = jnp.power(jnp.maximum(s_x, 1e-8), alpha)
        s = s / jnp.sqrt(jnp.max(s) * jnp.min(s))
        wq = _fake_quant(kernel * s[:, None], bits, gs, symmetric, allow_partial) / s[:, None]
        e = kernel - wq
        return jnp.sum(e * (xtx @ e)), s

    return jax.lax.map(one, alphas)


def awq_search(kernel: jax.Array, xtx: np.ndarray, abs_mean: np.ndarray, rows: int, *, bits: int = 4,
               group_size: Optional[int] = 128, symmetric: bool = True, allow_partial_group: bool = False,
               alpha_grid: Sequence[float] = DEFAULT_ALPHA_GRID, where: str = "awq") -> tuple[float, np.ndarray, np.ndarray]:
    """Grid-search AWQ's ``alpha`` for one layer.

    Args:
      kernel: float ``(K, N)``; xtx ``(K, K)`` and abs_mean ``(K,)`` from the calibration pass; rows the
        number of input rows behind them (must be >= 1).
    Returns:
      ``(best_alpha, s (K,), losses (len(alpha_grid),))``; ``alpha = 0`` is plain round-to-nearest, so
      the chosen loss is never above RTN's.
    """
    if rows < 1:
        raise ValueError(f"{where}: no calibration rows reached this layer; run real inputs through the model")
    k = kernel.shape[0]
    block_layout(k, group_size, allow_partial_group, where)  # fail early with the layer's name
    losses, scales = _losses(jnp.asarray(kernel, jnp.float32), jnp.asarray(xtx / rows, jnp.float32),
                             jnp.asarray(abs_mean, jnp.float32), jnp.asarray(alpha_grid, jnp.float32),
                             bits=bits, gs=group_size, symmetric=symmetric, allow_partial=allow_partial_group)
    losses = np.asarray(losses)
    best = int(np.argmin(losses))
    return float(alpha_grid[best]), np.asarray(scales[best]), losses


@partial(jax.jit, static_argnames=("bits", "symmetric"))
def _clip_losses(wt, hblocks, ratios, *, bits, symmetric):
    def one(r):
        scale, zp = group_qparams(wt * r, bits, symmetric)  # the range of r * w: clipped codes below
        e = wt - (codes_for(wt, scale[..., None], zp[..., None], bits) - zp[..., None]).astype(jnp.float32) * scale[..., None]
        return jnp.einsum("ngi,gij,ngj->ng", e, hblocks, e)

    return jax.lax.map(one, ratios)


def awq_clip(kernel: jax.Array, xtx: np.ndarray, rows: int, *, bits: int = 4, group_size: Optional[int] = 128,
             symmetric: bool = True, allow_partial_group: bool = False,
             clip_grid: Sequence[float] = DEFAULT_CLIP_GRID, where: str = "awq") -> tuple[BlockQuantizedWeight, np.ndarray]:
    """Quantize ``kernel`` ``(K, N)`` with AWQ's per-group clipping search.

    Args:
      kernel: float ``(K, N)`` (already multiplied by AWQ's ``diag(s)``); xtx ``(K, K)`` the input
        Hessian seen by that kernel (i.e. of ``X diag(s)^-1``); rows the rows behind it.
      clip_grid: shrink ratios ``r`` of the quantization range; must contain 1.0.
    Returns:
      ``(BlockQuantizedWeight, ratio (N, G))``: the chosen ``r`` per output channel and group.
    """
    if 1.0 not in tuple(float(r) for r in clip_grid):
        raise ValueError(f"{where}: clip_grid must contain 1.0 (no clipping), got {tuple(clip_grid)}")
    w = jnp.asarray(kernel, jnp.float32)
    k, n = w.shape
    gs, g = block_layout(k, group_size, allow_partial_group, where)
    kp = g * gs
    wt = jnp.pad(w.T, ((0, 0), (0, kp - k))).reshape(n, g, gs)
    h = np.zeros((kp, kp), np.float32)
    h[:k, :k] = np.asarray(xtx, np.float32) / max(rows, 1)
    hblocks = jnp.asarray(np.stack([h[i * gs:(i + 1) * gs, i * gs:(i + 1) * gs] for i in range(g)]))
    ratios = jnp.asarray(clip_grid, jnp.float32)
    losses = _clip_losses(wt, hblocks, ratios, bits=bits, symmetric=symmetric)  # (R, n, g)
    best = ratios[jnp.argmin(losses, axis=0)]  # (n, g)
    scale, zp = group_qparams(wt * best[..., None], bits, symmetric)
    codes = codes_for(wt, scale[..., None], zp[..., None], bits).reshape(n, kp)
    q = from_codes(codes, scale, zp, bits=bits, group_size=gs, in_features=k, symmetric=symmetric)
    return q, np.asarray(best)


def awq_quantize(kernel: jax.Array, xtx: np.ndarray, abs_mean: np.ndarray, rows: int, **kw) -> tuple[BlockQuantizedWeight, jax.Array]:
    """``(quantized diag(s) W, s)``: the weight for a ``WeightOnlyLinear`` whose ``input_scale`` is ``s``.

    ``clip_grid=None`` skips the clipping search (plain round-to-nearest of ``diag(s) W``).
    """
    where = kw.pop("where", "awq")
    alpha_grid = kw.pop("alpha_grid", DEFAULT_ALPHA_GRID)
    clip_grid = kw.pop("clip_grid", DEFAULT_CLIP_GRID)
    _, s, _ = awq_search(kernel, xtx, abs_mean, rows, alpha_grid=alpha_grid, where=where, **kw)
    fmt = dict(bits=kw.get("bits", 4), group_size=kw.get("group_size", 128), symmetric=kw.get("symmetric", True),
               allow_partial_group=kw.get("allow_partial_group", False))
    scaled = jnp.asarray(kernel, jnp.float32) * jnp.asarray(s)[:, None]
    if clip_grid is None:
        q = quantize_blockwise(scaled, where=where, **fmt)
    else:
        inv = 1.0 / np.asarray(s, np.float64)
        q, _ = awq_clip(scaled, np.asarray(xtx, np.float64) * inv[:, None] * inv[None, :], rows,
                        clip_grid=clip_grid, where=where, **fmt)
    return q, jnp.asarray(s, jnp.float32)


def quantize_awq(model, stats: dict, config, *, alpha_grid: Sequence[float] = DEFAULT_ALPHA_GRID,
                 clip_grid: Optional[Sequence[float]] = DEFAULT_CLIP_GRID, progress: bool = True):
    """AWQ every layer in ``stats`` (from ``collect_linear_stats``) to ``config`` (a ``WeightOnlyConfig``);
    returns a new model of ``WeightOnlyLinear`` layers carrying their ``input_scale``. ``clip_grid=None``
    turns the clipping search off."""
    from jaxquant.weight_only.api import quantize_calibrated

    def layer_fn(kernel, st, cfg, where):
        return awq_quantize(kernel, st.xtx, st.abs_mean, st.rows, bits=cfg.bits, group_size=cfg.group_size,
                            symmetric=cfg.symmetric, allow_partial_group=cfg.allow_partial_group,
                            alpha_grid=alpha_grid, clip_grid=clip_grid, where=where)

    return quantize_calibrated(model, stats, config, layer_fn, desc="awq", progress=progress)
