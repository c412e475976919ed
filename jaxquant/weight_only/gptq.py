"""GPTQ (Frantar, Ashkboos, Hoefler, Alistarh 2022): quantize a layer's weight column by column,
spreading each column's rounding error over the not-yet-quantized columns through the inverse
Hessian of the layer's reconstruction loss.

Notation as in the paper: ``W`` is ``(d_row, d_col)`` = (out, in) (the transpose of a flax kernel),
``X`` the layer inputs ``(d_col, rows)``, ``H = 2 X X^T`` (``(d_col, d_col)``). Damping adds
``lambda = damp_percent * mean(diag H)`` to the diagonal. With ``U = Cholesky(H^-1)^T`` (upper), the
update after quantizing column ``i`` is ``E_i = (w_i - q_i) / U_ii`` and
``W[:, i:] -= E_i U[i, i:]``. *Lazy batch updates*: columns are processed in blocks of ``B``;
inside a block only the block is updated, and the rest of ``W`` gets one rank-``B`` update
``W[:, end:] -= E_block U[block, end:]`` per block. *Act-order*: columns are visited in decreasing
``diag(H)``; groups then use qparams fixed from the unquantized weight ("static groups") so that each
group keeps one scale. Without act-order a group's qparams are chosen from the partially updated
weight when its first column is reached (the reference implementation's behaviour).
"""
from __future__ import annotations

from functools import partial
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.weight_only.blockwise import (BlockQuantizedWeight, block_layout, codes_for, from_codes,
                                            group_qparams)

__all__ = ["gptq_quantize", "quantize_gptq", "GPTQError"]


class GPTQError(ValueError):
    """GPTQ could not run on a layer (too little calibration data, a Hessian that damping cannot fix)."""


@partial(jax.jit, static_argnames=("bits", "gs", "symmetric", "block", "act_order"))
def _gptq(w, u, perm, static_scale, static_zp, *, bits, gs, symmetric, block, act_order):
    """Lazy-batch GPTQ on ``w`` ``(n, kp)`` (columns already permuted); returns codes and group qparams.

    Without act-order, ``block`` equals the group size when there are several groups, so a group's
    qparams are chosen from the block as it stands when the block starts (after all earlier blocks'
    updates), exactly when the reference implementation chooses them.
    """
    n, kp = w.shape
    codes = jnp.zeros((n, kp), jnp.int32)
    scale, zp = static_scale, static_zp
    grouped = static_scale.shape[1] > 1
    for b0 in range(0, kp, block):
        b1 = min(b0 + block, kp)
        wb = w[:, b0:b1]
        ub = u[b0:b1, b0:b1]
        if not act_order and grouped:
            bs, bz = group_qparams(wb, bits, symmetric)
            scale, zp = scale.at[:, b0 // gs].set(bs), zp.at[:, b0 // gs].set(bz)

        def body(i, carry, b0=b0, ub=ub, scale=scale, zp=zp):
            wb, cb, errs = carry
            grp = perm[b0 + i] // gs if act_order else b0 // gs
            s, z = scale[:, grp], zp[:, grp]
            col = jax.lax.dynamic_slice_in_dim(wb, i, 1, axis=1)[:, 0]
            q = codes_for(col, s, z, bits)
            err = (col - (q - z).astype(jnp.float32) * s) / ub[i, i]
            # U is upper triangular: this only moves columns >= i of the block.
            wb = wb - err[:, None] * ub[i][None, :]
            cb = jax.lax.dynamic_update_slice_in_dim(cb, q[:, None], i, axis=1)
            errs = jax.lax.dynamic_update_slice_in_dim(errs, err[:, None], i, axis=1)
            return wb, cb, errs

        init = (wb, jnp.zeros((n, b1 - b0), jnp.int32), jnp.zeros((n, b1 - b0), jnp.float32))
        wb, cb, errs = jax.lax.fori_loop(0, b1 - b0, body, init)
        codes = codes.at[:, b0:b1].set(cb)
        if b1 < kp:
            w = w.at[:, b1:].add(-errs @ u[b0:b1, b1:])
    return codes, scale, zp


def gptq_quantize(kernel: jax.Array, xtx: np.ndarray, rows: int, *, bits: int = 4, group_size: Optional[int] = 128,
                  symmetric: bool = True, allow_partial_group: bool = False, damp_percent: float = 0.01,
                  block_size: int = 128, act_order: bool = False, where: str = "gptq") -> BlockQuantizedWeight:
    """GPTQ-quantize a flax kernel ``(K, N)`` given its inputs' ``X^T X`` ``(K, K)`` over ``rows`` rows.

    Args:
      kernel: float ``(in_features, out_features)``.
      xtx: ``sum X^T X`` from :func:`jaxquant.weight_only.calibration.collect_linear_stats`.
      rows: number of calibration rows behind ``xtx``; fewer than ``in_features`` raises.
      bits, group_size, symmetric, allow_partial_group: the target format (as ``quantize_blockwise``);
        ``bits=8, group_size=None`` is per-channel int8 (decodes through the same weight-only kernels as
        ``int8_weight_only()``).
      damp_percent: ``lambda / mean(diag H)``.
      block_size: ``B`` of the lazy batch updates (the group size when grouped without act-order).
      act_order: visit columns by decreasing ``diag(H)`` (static group qparams).
    Returns:
      A :class:`BlockQuantizedWeight` (same layout as round-to-nearest).
    Raises:
      GPTQError naming the layer: too few calibration rows, a Hessian still singular after damping,
      bits other than 4/8, a non-positive block size, or statistics of the wrong size. ValueError:
      a group size that does not divide ``in_features`` (without ``allow_partial_group``).
    """
    if bits not in (4, 8):
        raise GPTQError(f"{where}: bits must be 4 or 8 (the stored int4/int8 formats), got {bits!r}")
    if not isinstance(block_size, int) or block_size < 1:
        raise GPTQError(f"{where}: block_size (columns per lazy batch update) must be a positive int, "
                        f"got {block_size!r}")
    w_kn = jnp.asarray(kernel, jnp.float32)
    if w_kn.ndim != 2:
        raise GPTQError(f"{where}: expected a 2-D (in_features, out_features) kernel, got shape {w_kn.shape}")
    k, n = w_kn.shape
    if np.shape(xtx) != (k, k):
        raise GPTQError(f"{where}: X^T X has shape {np.shape(xtx)}, expected ({k}, {k}) for a kernel of "
                        f"{k} inputs; collect the statistics on this layer's inputs")
    if rows < k:
        raise GPTQError(f"{where}: {rows} calibration rows for {k} inputs; X^T X has rank <= {rows} < {k}. Give at "
                        f"least {k} input rows (more or longer calibration sequences)")
    if damp_percent < 0:
        raise GPTQError(f"{where}: damp_percent must be >= 0, got {damp_percent}")
    gs, g = block_layout(k, group_size, allow_partial_group, where)
    kp = g * gs
    h = np.zeros((kp, kp), np.float64)
    h[:k, :k] = 2.0 * np.asarray(xtx, np.float64) / rows
    w = np.zeros((n, kp), np.float32)
    w[:, :k] = np.asarray(w_kn).T
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0  # padded or never-active inputs: their weight cannot matter
    w[:, dead] = 0.0
    perm = np.arange(kp)
    if act_order:
        perm = np.argsort(-np.diag(h), kind="stable")
    # Static group qparams (act-order): from the unquantized weight, in original column order.
    wg = jnp.asarray(w).reshape(n, g, gs)
    static_scale, static_zp = group_qparams(wg, bits, symmetric)
    hp = h[np.ix_(perm, perm)]
    hp[np.diag_indices(kp)] += damp_percent * np.mean(np.diag(hp))
    try:
        chol = np.linalg.cholesky(hp)
        hinv = np.linalg.inv(chol).T @ np.linalg.inv(chol)
        u = np.linalg.cholesky(hinv).T
    except np.linalg.LinAlgError:
        u = None
    if u is None or not np.all(np.isfinite(u)):
        raise GPTQError(f"{where}: the damped Hessian is not positive definite (damp_percent={damp_percent}); "
                        "raise damp_percent (e.g. 0.01-0.1) or give more calibration data")
    codes, scale, zp = _gptq(jnp.asarray(w[:, perm]), jnp.asarray(u, jnp.float32), jnp.asarray(perm, jnp.int32),
                             static_scale, static_zp, bits=bits, gs=gs, symmetric=symmetric,
                             block=gs if (g > 1 and not act_order) else min(block_size, kp),
                             act_order=act_order)
    inv = np.argsort(perm)
    codes = jnp.asarray(codes)[:, inv]
    return from_codes(codes, scale, zp, bits=bits, group_size=gs, in_features=k, symmetric=symmetric)


def quantize_gptq(model, stats: dict, config, *, damp_percent: float = 0.01, act_order: bool = False,
                  block_size: int = 128, progress: bool = True):
    """GPTQ every layer in ``stats`` (from ``collect_linear_stats``) to ``config`` (a ``WeightOnlyConfig``).

    Returns a new model with ``WeightOnlyLinear`` layers (same format and kernels as round-to-nearest).
    Layers are quantized from the float model's inputs (one calibration pass, not sequentially).
    """
    from jaxquant.weight_only.api import quantize_calibrated

    def layer_fn(kernel, st, cfg, where):
        return gptq_quantize(kernel, st.xtx, st.rows, bits=cfg.bits, group_size=cfg.group_size,
                             symmetric=cfg.symmetric, allow_partial_group=cfg.allow_partial_group,
                             damp_percent=damp_percent, block_size=block_size, act_order=act_order,
                             where=where), None

    return quantize_calibrated(model, stats, config, layer_fn, desc="gptq", progress=progress)
