"""AWQ, activation-aware weight quantization (Lin et al. 2023).

Salient input channels (large mean activation magnitude ``s_X``) are protected by scaling them up
before quantization and dividing the input by the same factor: with ``s = s_X^alpha`` (normalised
so that ``sqrt(max(s) min(s)) = 1``),
``Q(W diag(s)) (diag(s)^-1 X)`` replaces ``Q(W) X``. ``alpha`` is searched on a grid to minimise the
layer's output error ``|| W X - Q(W diag(s)) diag(s)^-1 X ||^2``, computed exactly from the
calibration Hessian as ``tr(E^T (X X^T) E)`` with ``E = W - diag(s)^-1 Q(diag(s) W)`` in flax layout
(no activation samples needed). Here ``diag(s)^-1`` stays in the layer (``input_scale``: one
elementwise divide per call) instead of being folded into the previous op, so any ``nnx.Linear``
can take it. (The paper's optional weight-clipping search is not implemented.)
"""
from __future__ import annotations

from functools import partial
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.weight_only.blockwise import BlockQuantizedWeight, block_layout, quantize_blockwise

__all__ = ["awq_search", "awq_quantize", "quantize_awq", "DEFAULT_ALPHA_GRID"]

DEFAULT_ALPHA_GRID: tuple[float, ...] = tuple(np.round(np.arange(0.0, 1.0001, 0.05), 2))


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


def awq_quantize(kernel: jax.Array, xtx: np.ndarray, abs_mean: np.ndarray, rows: int, **kw) -> tuple[BlockQuantizedWeight, jax.Array]:
    """``(quantized diag(s) W, s)``: the weight for a ``WeightOnlyLinear`` whose ``input_scale`` is ``s``."""
    where = kw.pop("where", "awq")
    alpha_grid = kw.pop("alpha_grid", DEFAULT_ALPHA_GRID)
    _, s, _ = awq_search(kernel, xtx, abs_mean, rows, alpha_grid=alpha_grid, where=where, **kw)
    q = quantize_blockwise(jnp.asarray(kernel, jnp.float32) * jnp.asarray(s)[:, None], bits=kw.get("bits", 4),
                           group_size=kw.get("group_size", 128), symmetric=kw.get("symmetric", True),
                           allow_partial_group=kw.get("allow_partial_group", False), where=where)
    return q, jnp.asarray(s, jnp.float32)


def quantize_awq(model, stats: dict, config, *, alpha_grid: Sequence[float] = DEFAULT_ALPHA_GRID,
                 progress: bool = True):
    """AWQ every layer in ``stats`` (from ``collect_linear_stats``) to ``config`` (a ``WeightOnlyConfig``);
    returns a new model of ``WeightOnlyLinear`` layers carrying their ``input_scale``."""
    from jaxquant.weight_only.api import quantize_calibrated

    def layer_fn(kernel, st, cfg, where):
        return awq_quantize(kernel, st.xtx, st.abs_mean, st.rows, bits=cfg.bits, group_size=cfg.group_size,
                            symmetric=cfg.symmetric, allow_partial_group=cfg.allow_partial_group,
                            alpha_grid=alpha_grid, where=where)

    return quantize_calibrated(model, stats, config, layer_fn, desc="awq", progress=progress)
