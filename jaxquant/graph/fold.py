"""Param-derived values and folding: evaluating what depends only on the params, and absorbing a unit's
per-channel epilogue (bias, inference BatchNorm) into its weight and bias.

On concrete params the evaluation is numpy float32 op by op (``rsqrt`` as ``1 / sqrt``), the arithmetic of
:mod:`jaxquant.fusion.bn_folding`, so a BatchNorm folded here equals eager ``fuse_modules`` bit for bit.
Traced params (QAT, a user's ``jax.jit``) use the same formulas in ``jnp``.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.graph.analysis import Analysis, Unit, WEIGHT_CHAIN
from jaxquant.graph.capture import Lit, eval_op

__all__ = ["prelude", "fold_unit", "weight_channel_axes"]


def _np_op(op, vals):
    k = op.kind
    f32 = [np.asarray(v) for v in vals]
    if k == "add":
        return f32[0] + f32[1]
    if k == "sub":
        return f32[0] - f32[1]
    if k == "mul":
        return f32[0] * f32[1]
    if k == "div":
        return f32[0] / f32[1]
    if k == "rsqrt":
        return f32[0].dtype.type(1) / np.sqrt(f32[0])
    if k == "sqrt":
        return np.sqrt(f32[0])
    if k == "neg":
        return -f32[0]
    return None


def prelude(a: Analysis, params_leaves, *, use_numpy: bool) -> dict:
    """Values of every param-derived op output, keyed by value id (params included)."""
    g = a.graph
    env: dict = dict(zip(g.param_ids, params_leaves))
    for op in g.ops:
        if not op.outputs or op.outputs[0] not in a.param_derived:
            continue
        vals = [x.value if isinstance(x, Lit) else env[x] for x in op.inputs]
        out = None
        numpy_ok = use_numpy and not any(jax.dtypes.issubdtype(g.avals[o].dtype, jax.dtypes.extended)
                                         for o in op.outputs) and not any(
            jax.dtypes.issubdtype(getattr(v, "dtype", np.float32), jax.dtypes.extended) for v in vals)
        if numpy_ok:
            res = _np_op(op, vals)
            if res is not None:
                dtype = g.avals[op.outputs[0]].dtype
                out = [np.asarray(res, dtype)]
        if out is None:
            out = eval_op(op, vals)
            if numpy_ok:
                out = [np.asarray(o) for o in out]
        env.update(zip(op.outputs, out))
    return env


def _value(env, atom):
    return atom.value if isinstance(atom, Lit) else env[atom]


def _channel_vector(a: Analysis, env, atom, unit: Unit, xp):
    """An epilogue operand as a flat ``(N,)`` vector over the unit's output channels."""
    g = a.graph
    out_shape = tuple(g.avals[unit.op.outputs[0]].shape)
    v = xp.asarray(_value(env, atom))
    v = v.reshape((1,) * (len(out_shape) - v.ndim) + tuple(v.shape))
    target = tuple(out_shape[i] if i in unit.channel_axes else 1 for i in range(len(out_shape)))
    v = xp.broadcast_to(v, target)
    n = int(np.prod([out_shape[i] for i in unit.channel_axes]))
    return v.reshape(n)


def _factors(a: Analysis, atom):
    """If a multiplier was computed as ``p * q`` of two param-derived values (BatchNorm's
    ``rsqrt(var + eps) * scale``), ``(p, q)``: the bias is then scaled by ``p`` then ``q``, PyTorch's order."""
    if isinstance(atom, Lit):
        return None
    producer = {o: op for op in a.graph.ops for o in op.outputs}
    op = producer.get(atom)
    while op is not None and op.kind in WEIGHT_CHAIN and not isinstance(op.inputs[0], Lit):
        op = producer.get(op.inputs[0])
    if op is not None and op.kind == "mul" and all(isinstance(i, Lit) or i in a.param_derived for i in op.inputs):
        return op.inputs
    return None


def weight_channel_axes(a: Analysis, unit: Unit) -> tuple:
    """The weight operand's output-channel axes, in the order they appear in the output."""
    op = unit.op
    w_nd = len(a.graph.avals[unit.w].shape) if not isinstance(unit.w, Lit) else np.ndim(unit.w.value)
    if unit.kind == "conv":
        return (op.params["dimension_numbers"].rhs_spec[0],)
    (lc, rc), (lb, rb) = op.params["dimension_numbers"]
    wc, wb = (lc, lb) if unit.w_side == 0 else (rc, rb)
    return tuple(d for d in range(w_nd) if d not in wc and d not in wb)


def fold_unit(a: Analysis, unit: Unit, env: dict, *, use_numpy: bool):
    """``(weight, bias)``: the weight operand (its own layout) with the epilogue's multipliers folded
    in, and the flat ``(N,)`` bias (None when the epilogue adds nothing)."""
    xp = np if use_numpy else jnp
    w = xp.asarray(_value(env, unit.w))
    dtype = np.float32 if use_numpy else jnp.float32
    waxes = weight_channel_axes(a, unit)
    wshape = tuple(w.shape[i] if i in waxes else 1 for i in range(w.ndim))
    bias = None
    for kind, atom in unit.epilogue:
        v = _channel_vector(a, env, atom, unit, xp).astype(dtype)
        if kind in ("add", "sub"):
            if bias is None:
                bias = xp.zeros_like(v)
            bias = bias + v if kind == "add" else bias - v
        elif kind == "mul":
            w = (w.astype(dtype) * v.reshape(wshape)).astype(w.dtype)
            if bias is not None:
                factors = _factors(a, atom)
                if factors is not None:
                    for f in factors:
                        bias = bias * _channel_vector(a, env, f, unit, xp).astype(dtype)
                else:
                    bias = bias * v
        elif kind == "div":
            w = (w.astype(dtype) / v.reshape(wshape)).astype(w.dtype)
            if bias is not None:
                bias = bias / v
    return w, bias
