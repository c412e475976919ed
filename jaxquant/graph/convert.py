"""Convert: observed (or QAT) program + observer state -> :class:`~jaxquant.graph.program.QuantizedProgram`;
and the dynamic / weight-only conversions that need no calibration.

Weights are quantized with the qconfig's weight observer exactly as eager ``from_float`` does
(:func:`jaxquant.core.weights.quantize_weight`, flax layout, per channel on the output axis) and
prepacked once; the int8 program holds no float weight of a quantized op and does no transpose of one.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxquant.core.qparams import calculate_qparams
from jaxquant.core.weights import activation_per_token, quantize_weight
from jaxquant.dtypes import qint8, quint8
from jaxquant.graph import kernels as K
from jaxquant.graph.analysis import Analysis, GraphQuantizationError, Unit
from jaxquant.graph.fold import weight_channel_axes
from jaxquant.graph.program import (
    ObservedProgram,
    QuantizedProgram,
    _conv_perms,
    _dot_layout,
    _flax_weight,
    _runtime_needed,
    _state_key,
)
from jaxquant.observers import check_observer_state

__all__ = ["convert_static", "convert_without_calibration", "unit_meta", "pack_unit"]


def _checked_qparams(obs, state, path):
    check_observer_state(obs, state, name=path)
    # the same compiled function eager convert uses: the histogram search rounds the same way
    scale, zp = calculate_qparams(obs, state)
    if obs.dtype not in (quint8, qint8):
        raise GraphQuantizationError(f"graph.convert: '{path}': static quantization needs quint8 or qint8 "
                                     f"activations, {obs!r} uses {obs.dtype!r}")
    scale = jnp.asarray(scale, jnp.float32).reshape(())
    if not np.isfinite(float(scale)) or float(scale) <= 0:
        raise GraphQuantizationError(f"graph.convert: '{path}': observer {obs!r} gave an invalid scale {float(scale)}")
    return scale, jnp.asarray(zp).astype(jnp.int32).reshape(()), obs.dtype


def _check_unit_weight(a: Analysis, u: Unit) -> None:
    if u.kind == "linear" and _dot_layout(a, u) is None:
        raise GraphQuantizationError(
            f"graph: '{u.path}' (dot_general at op {u.op.index}): the weight operand has batch dimensions, so no "
            f"(in, out) weight can be identified; keep it float with QConfigMapping().set_module_name('{u.path}', None)")
    if u.kind == "conv":
        p = u.op.params
        if p["batch_group_count"] != 1:
            raise GraphQuantizationError(
                f"graph: '{u.path}' (conv_general_dilated at op {u.op.index}): batch_group_count "
                f"{p['batch_group_count']} has no int8 kernel; keep it float with "
                f"QConfigMapping().set_module_name('{u.path}', None)")


def _floats(a: Analysis, pre: dict) -> dict:
    return {_state_key(k): jnp.asarray(pre[k]) for k in sorted(_runtime_needed(a)) if k in pre}


def unit_meta(a: Analysis, u: Unit, mode: str, *, out_dtype=None, reduce_range: bool = True,
              per_token: bool = False, w_dtype=None) -> dict:
    """The static (non-array) metadata the int8 program needs for unit ``u``: all of it follows from the
    analysis and these few flags, so a saved program stores only the flags (``jq.save``)."""
    if u.kind == "matmul":
        return {"mode": mode}
    if mode == "weight_only":
        return {"mode": mode, "w_dtype": np.dtype(w_dtype)}
    relu = u.act == "relu" or (isinstance(u.act, tuple) and u.act[1] == 0.0)
    if mode == "static" and u.kind == "conv":
        return {"mode": mode, "perms": _conv_perms(u), "out_dtype": out_dtype, "relu": relu}
    meta = _linear_meta(a, u, mode, out_dtype)
    if mode == "static":
        meta["relu"] = relu
    else:
        meta["reduce_range"], meta["per_token"] = bool(reduce_range), bool(per_token)
    return meta


def pack_unit(a: Analysis, u: Unit, raw: dict):
    """Prepack a unit's int8 weight (``raw``: ``w_q`` in flax layout, ``w_scale``, ``w_zp``, ``bias``)."""
    if u.kind == "conv":
        p = u.op.params
        return K.pack_conv(raw["w_q"], raw["w_scale"], raw["w_zp"], raw.get("bias"),
                           strides=tuple(p["window_strides"]), padding=tuple(map(tuple, p["padding"])),
                           dilation=tuple(p["rhs_dilation"]), groups=int(p["feature_group_count"]),
                           input_dilation=tuple(p["lhs_dilation"]))
    return K.pack_linear(raw["w_q"], raw["w_scale"], raw["w_zp"], raw.get("bias"))


def _linear_meta(a: Analysis, u: Unit, mode: str, out_dtype=None):
    xperm, wperm, nxf, nwf = _dot_layout(a, u)
    w_shape = np.shape(u.w.value) if not hasattr(u.w, "__index__") and not isinstance(u.w, int) else \
        a.graph.avals[u.w].shape
    wfree_shape = tuple(w_shape[d] for d in wperm[len(wperm) - nwf:])
    return {"mode": mode, "layout": (xperm, wperm, nxf, nwf), "wfree_shape": wfree_shape, "out_dtype": out_dtype}


def _clamp_codes(u: Unit, scale, zp, dtype):
    if not isinstance(u.act, tuple):
        return None
    _, lo, hi = u.act
    q = lambda v: jnp.clip(jnp.round(jnp.float32(v) / scale) + zp, dtype.min, dtype.max).astype(jnp.int32)
    return (q(lo), q(hi))


def convert_static(program: ObservedProgram, state: dict, params=None) -> QuantizedProgram:
    """The int8 program of a calibrated observed program (static PTQ) or a trained QAT program."""
    a, plan = program.analysis, program.plan
    params = program.params if params is None else params
    missing = [k for k in (_state_key(v) for v in plan.observers) if k not in state]
    if missing or len(state) != len(plan.observers):
        raise GraphQuantizationError(
            f"graph.convert: the observer state has {len(state)} entries but the program has {len(plan.observers)} "
            f"observers (missing: {missing[:5]}); pass the state that calibrate/prepare returned for this program")
    pre, folded = program.host_fold(params)
    qp = {"units": {}, "float_units": {}, "acts": {}, "floats": _floats(a, pre)}
    static, raw = {"acts": {}}, {}
    for vid, (obs, _, path) in plan.observers.items():
        key = _state_key(vid)
        scale, zp, dtype = _checked_qparams(obs, state[key], f"{path} (graph value {key})")
        qp["acts"][key] = (scale, zp)
        static["acts"][key] = dtype
    for i, u in a.units.items():
        if u.kind == "matmul":
            if i in plan.unit_qconfigs:
                static[i] = {"mode": "static"}
                qp["units"][str(i)] = {}
            continue
        w, bias = folded[i]
        if i not in plan.unit_qconfigs:
            qp["float_units"][str(i)] = (jnp.asarray(w), None if bias is None else jnp.asarray(bias))
            continue
        _check_unit_weight(a, u)
        qconfig = plan.unit_qconfigs[i]
        x_scale, x_zp = qp["acts"][_state_key(plan.source[u.x])]
        out_scale, out_zp = qp["acts"][_state_key(u.out)]
        out_dtype = static["acts"][_state_key(u.out)]
        wq = quantize_weight(_flax_weight(a, u, jnp.asarray(w)), qconfig, u.path)
        n = wq.shape[-1]
        w_scale, w_zp = wq.channel_qparams()
        w_scale = jnp.broadcast_to(w_scale, (n,)).astype(jnp.float32)
        w_zp = jnp.broadcast_to(w_zp, (n,)).astype(jnp.int32)
        b = None if bias is None else jnp.asarray(bias, jnp.float32)
        entry = {"out_scale": out_scale, "out_zp": out_zp}
        clamp = _clamp_codes(u, out_scale, out_zp, out_dtype)
        if clamp is not None:
            entry["clamp"] = clamp
        raw[str(i)] = {"w_q": wq.int_data, "w_scale": w_scale, "w_zp": w_zp, "bias": b}
        entry["packed"] = pack_unit(a, u, raw[str(i)])
        static[i] = unit_meta(a, u, "static", out_dtype=out_dtype)
        qp["units"][str(i)] = entry
    return QuantizedProgram(a, plan, qp, static, "static", raw)


def convert_without_calibration(a: Analysis, plan, params, mode: str, *, reduce_range: bool = True,
                                per_token=None) -> QuantizedProgram:
    """Dynamic (activation qparams per call) or weight-only conversion."""
    helper = ObservedProgram(a, plan, params, {})
    pre, folded = helper.host_fold(params)
    qp = {"units": {}, "float_units": {}, "acts": {}, "floats": _floats(a, pre)}
    static, raw = {"acts": {}}, {}
    for i, u in a.units.items():
        if u.kind == "matmul":
            if i in plan.unit_qconfigs and mode == "dynamic":
                static[i] = unit_meta(a, u, "dynamic")
                qp["units"][str(i)] = {}
            continue
        w, bias = folded[i]
        quantize = i in plan.unit_qconfigs and not (mode == "dynamic" and u.kind == "conv")
        if not quantize:
            qp["float_units"][str(i)] = (jnp.asarray(w), None if bias is None else jnp.asarray(bias))
            continue
        _check_unit_weight(a, u)
        qconfig = plan.unit_qconfigs[i]
        b = None if bias is None else jnp.asarray(bias, jnp.float32)
        if mode == "weight_only":
            wq = quantize_weight(jnp.moveaxis(jnp.asarray(w, jnp.float32), weight_channel_axes(a, u), -1)
                                 .reshape(_w_lead(w, a, u) + (-1,)), qconfig, u.path)
            n = wq.shape[-1]
            w_scale, w_zp = wq.channel_qparams()
            shape = tuple(w.shape[d] if d in weight_channel_axes(a, u) else 1 for d in range(np.ndim(w)))
            qp["units"][str(i)] = {"w_q": _restore(wq.int_data, w, a, u),
                                   "w_scale": jnp.broadcast_to(w_scale, (n,)).reshape(shape),
                                   "w_zp": jnp.broadcast_to(w_zp, (n,)).reshape(shape).astype(jnp.float32),
                                   "bias": b}
            static[i] = unit_meta(a, u, "weight_only", w_dtype=np.asarray(w).dtype)
            continue
        wq = quantize_weight(_flax_weight(a, u, jnp.asarray(w)), qconfig, u.path)
        w_scale, w_zp = wq.channel_qparams()
        raw[str(i)] = {"w_q": wq.int_data, "w_scale": w_scale, "w_zp": w_zp, "bias": b}
        qp["units"][str(i)] = {"packed": pack_unit(a, u, raw[str(i)])}
        static[i] = unit_meta(a, u, "dynamic", reduce_range=reduce_range,
                              per_token=activation_per_token(qconfig) if per_token is None else bool(per_token))
    return QuantizedProgram(a, plan, qp, static, mode, raw)


def _w_lead(w, a, u):
    axes = weight_channel_axes(a, u)
    return tuple(s for d, s in enumerate(np.shape(w)) if d not in axes)


def _restore(wq_moved, w, a, u):
    """An int8 weight quantized with its channel axes flattened last, back in the operand layout."""
    axes = weight_channel_axes(a, u)
    chan = tuple(np.shape(w)[d] for d in axes)
    return jnp.moveaxis(wq_moved.reshape(_w_lead(w, a, u) + chan), tuple(range(-len(axes), 0)), axes)
