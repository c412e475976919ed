"""A converted graph program as data: ``to_record`` gives a JSON-able description and named arrays;
``from_record`` rebuilds the program from them and a re-trace of the user's function (``jq.save`` /
``jq.load`` write and read the file; this module does no I/O).

Nothing from the record is executed and no program structure is read from it: the structure comes from
re-capturing ``fn`` (or the NNX model) on the example arguments. The record only says which units and
requantizing ops were quantized, with which mode and flags, and holds their arrays. A structural
fingerprint (every op's kind, arity and output dtypes; every unit's kind, path and fused activation) is
compared first, so a function that changed since saving is refused with the first op that differs.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.dtypes import qint8, quint8
from jaxquant.graph.analysis import Analysis, GraphQuantizationError, op_path
from jaxquant.graph.capture import Lit
from jaxquant.graph.convert import pack_unit, unit_meta
from jaxquant.graph.plan import make_plan
from jaxquant.graph.program import QuantizedProgram, _flax_weight, _runtime_needed, _state_key
from jaxquant.qconfig import get_default_qconfig

__all__ = ["to_record", "from_record", "RECORD_FORMAT"]

RECORD_FORMAT = "jaxquant.graph_program"
_MODES = ("static", "dynamic", "weight_only")
_RAW = ("w_q", "w_scale", "w_zp", "bias")
_UNIT_ARRAYS = ("out_scale", "out_zp", "w_q", "w_scale", "w_zp", "bias")


def _op_signature(a: Analysis) -> list:
    g = a.graph
    sig = []
    for op in g.ops:
        dtypes = ",".join(str(g.avals[o].dtype) for o in op.outputs)
        entry = f"{op.kind}/{len(op.inputs)}/{dtypes}"
        u = a.units.get(op.index)
        if u is not None:
            entry += f"|{u.kind}:{u.path}:{u.w_side}:{u.act!r}"
        sig.append(entry)
    return sig


def fingerprint(a: Analysis) -> str:
    """SHA-256 of the program's op signature (kinds, arity, output dtypes, units; not shapes, which
    follow the inputs)."""
    return hashlib.sha256(json.dumps(_op_signature(a)).encode()).hexdigest()


def to_record(prog: QuantizedProgram) -> tuple[dict, dict]:
    """``(header, arrays)``: a JSON-able dict and ``{name: numpy array}`` that define ``prog``."""
    if not isinstance(prog, QuantizedProgram):
        raise TypeError(f"graph: expected a QuantizedProgram, got {type(prog).__name__}")
    a, qp = prog.analysis, prog.params
    arrays: dict[str, np.ndarray] = {}
    units = {}
    for i, meta in prog.static.items():
        if i == "acts":
            continue
        key = str(i)
        entry = {"mode": meta["mode"]}
        if "reduce_range" in meta:
            entry["reduce_range"], entry["per_token"] = bool(meta["reduce_range"]), bool(meta["per_token"])
        if "w_dtype" in meta:
            entry["w_dtype"] = np.dtype(meta["w_dtype"]).name
        p = qp["units"][key]
        values = dict(prog.raw.get(key, {}))
        values.update({k: v for k, v in p.items() if k in _UNIT_ARRAYS})
        if "packed" in p and key not in prog.raw:
            raise GraphQuantizationError(f"graph: unit '{a.units[i].path}' has no unpacked weight to save "
                                         "(the program was built by hand?); convert it with jq.graph.convert")
        for k, v in values.items():
            if v is not None:
                arrays[f"units.{key}.{k}"] = np.asarray(v)
        if "clamp" in p:
            arrays[f"units.{key}.clamp_lo"], arrays[f"units.{key}.clamp_hi"] = map(np.asarray, p["clamp"])
        units[key] = entry
    for key, (w, b) in qp["float_units"].items():
        arrays[f"float_units.{key}.w"] = np.asarray(w)
        if b is not None:
            arrays[f"float_units.{key}.bias"] = np.asarray(b)
    for key, (scale, zp) in qp["acts"].items():
        arrays[f"acts.{key}.scale"], arrays[f"acts.{key}.zp"] = np.asarray(scale), np.asarray(zp)
    for key, v in qp["floats"].items():
        arrays[f"floats.{key}"] = np.asarray(v)
    header = {
        "mode": prog.mode,
        "n_ops": len(a.graph.ops),
        "fingerprint": fingerprint(a),
        "ops": _op_signature(a),
        "units": units,
        "requant": sorted(int(i) for i in prog.plan.requant),
        "acts": {k: d.name for k, d in prog.static["acts"].items()},
    }
    return header, arrays


def _fail(msg: str) -> GraphQuantizationError:
    return GraphQuantizationError(f"graph load: {msg}")


def _check_header(h: Any) -> None:
    if not isinstance(h, dict):
        raise _fail("the record is not an object")
    if h.get("mode") not in _MODES:
        raise _fail(f"mode {h.get('mode')!r} is not one of {_MODES}")
    if not isinstance(h.get("n_ops"), int) or not isinstance(h.get("fingerprint"), str):
        raise _fail("'n_ops' / 'fingerprint' missing")
    if not isinstance(h.get("ops"), list) or not all(isinstance(s, str) for s in h["ops"]):
        raise _fail("'ops' must be a list of strings")
    if not isinstance(h.get("units"), dict) or not all(isinstance(v, dict) for v in h["units"].values()):
        raise _fail("'units' must map unit indices to objects")
    if not isinstance(h.get("requant"), list) or not all(isinstance(i, int) for i in h["requant"]):
        raise _fail("'requant' must be a list of op indices")
    if not isinstance(h.get("acts"), dict) or not all(v in ("quint8", "qint8") for v in h["acts"].values()):
        raise _fail("'acts' must map value keys to 'quint8' or 'qint8'")


def _compare_structure(a: Analysis, h: dict) -> None:
    ours = _op_signature(a)
    if ours == h["ops"] and fingerprint(a) == h["fingerprint"]:
        return
    saved = h["ops"]
    first = next((i for i, (x, y) in enumerate(zip(saved, ours)) if x != y), min(len(saved), len(ours)))
    where = op_path(a, a.graph.ops[first]) if first < len(a.graph.ops) else "the end of the program"
    raise _fail(f"the function traced now has {len(ours)} ops, the saved program has {h['n_ops']}; they differ "
                f"from op {first} at '{where}' (saved {saved[first] if first < len(saved) else '-'!r}, now "
                f"{ours[first] if first < len(ours) else '-'!r}). Pass the same function (or model class) and "
                "example input shapes the program was converted from")


def _arr(arrays: dict, name: str, *, dtype=None, shape=None):
    if name not in arrays:
        raise _fail(f"array '{name}' is missing")
    v = arrays[name]
    if dtype is not None and v.dtype != np.dtype(dtype):
        raise _fail(f"array '{name}' has dtype {v.dtype}, expected {np.dtype(dtype)}")
    if shape is not None and tuple(v.shape) != tuple(shape):
        raise _fail(f"array '{name}' has shape {list(v.shape)}, expected {list(shape)}")
    return jnp.asarray(v)


def _weight_aval(a: Analysis, u):
    return np.shape(u.w.value) if isinstance(u.w, Lit) else tuple(a.graph.avals[u.w].shape)


def _channels_ok(v, n: int) -> bool:
    return v.shape in ((), (n,))


def from_record(a: Analysis, h: dict, arrays: dict) -> QuantizedProgram:
    """Rebuild the int8 program for the freshly captured analysis ``a`` from a record (``to_record``).
    Raises GraphQuantizationError naming the first differing op or the array that does not fit."""

    _check_header(h)
    _compare_structure(a, h)
    mode = h["mode"]
    unit_ids = []
    for key in h["units"]:
        if not key.isdigit() or int(key) not in a.units:
            raise _fail(f"saved unit {key!r} is not a dot/conv of this program")
        unit_ids.append(int(key))
    for i in h["requant"]:
        if not 0 <= i < len(a.graph.ops) or a.graph.ops[i].kind not in ("add", "concatenate"):
            raise _fail(f"saved requantizing op {i} is not an add/concatenate of this program")
    # the plan is rebuilt by the same dataflow pass as at prepare; only which ops were quantized comes
    # from the record (the placeholder qconfig's observers are never run)
    placeholder = get_default_qconfig("x86")
    qconfigs = {i: placeholder for i in unit_ids + list(h["requant"])}
    plan = make_plan(a, qconfigs, "static" if mode == "static" else mode)
    act_keys = sorted(_state_key(v) for v in plan.observers)
    if act_keys != sorted(h["acts"]):
        raise _fail(f"the saved program quantizes activations {sorted(h['acts'])[:6]}..., this program would "
                    f"quantize {act_keys[:6]}...; the record does not fit this function")
    dtypes = {"quint8": quint8, "qint8": qint8}
    static: dict = {"acts": {k: dtypes[v] for k, v in h["acts"].items()}}
    qp: dict = {"units": {}, "float_units": {}, "acts": {}, "floats": {}}
    raw: dict = {}
    for key in h["acts"]:
        qp["acts"][key] = (_arr(arrays, f"acts.{key}.scale", dtype=np.float32, shape=()),
                           _arr(arrays, f"acts.{key}.zp", dtype=np.int32, shape=()))
    for i in unit_ids:
        u, entry, key = a.units[i], h["units"][str(i)], str(i)
        if entry.get("mode") != mode:
            raise _fail(f"unit '{u.path}' has mode {entry.get('mode')!r} in a {mode} program")
        if u.kind == "matmul":
            static[i] = unit_meta(a, u, mode)
            qp["units"][key] = {}
            continue
        prefix = f"units.{key}."
        if mode == "weight_only":
            w_shape = _weight_aval(a, u)
            try:
                w_dtype = np.dtype(entry.get("w_dtype"))
            except TypeError:
                raise _fail(f"unit '{u.path}': bad w_dtype {entry.get('w_dtype')!r}") from None
            if w_dtype.name not in ("float32", "bfloat16", "float16"):
                raise _fail(f"unit '{u.path}': w_dtype {w_dtype.name} is not a float dtype")
            p = {"w_q": _arr(arrays, prefix + "w_q", shape=w_shape),
                 "w_scale": _arr(arrays, prefix + "w_scale"), "w_zp": _arr(arrays, prefix + "w_zp"),
                 "bias": _arr(arrays, prefix + "bias") if prefix + "bias" in arrays else None}
            for k in ("w_scale", "w_zp"):
                if p[k].ndim != len(w_shape) or any(s not in (1, d) for s, d in zip(p[k].shape, w_shape)):
                    raise _fail(f"array '{prefix + k}' has shape {list(p[k].shape)}, not broadcastable to {list(w_shape)}")
            if p["w_q"].dtype not in (jnp.int8, jnp.uint8):
                raise _fail(f"array '{prefix}w_q' has dtype {p['w_q'].dtype}, expected int8")
            qp["units"][key] = p
            static[i] = unit_meta(a, u, mode, w_dtype=w_dtype)
            continue
        flax_shape = jax.eval_shape(lambda w: _flax_weight(a, u, w),
                                    jax.ShapeDtypeStruct(_weight_aval(a, u), jnp.float32)).shape
        n = flax_shape[-1]
        r = {"w_q": _arr(arrays, prefix + "w_q", dtype=np.int8, shape=flax_shape),
             "w_scale": _arr(arrays, prefix + "w_scale", dtype=np.float32),
             "w_zp": _arr(arrays, prefix + "w_zp", dtype=np.int32),
             "bias": _arr(arrays, prefix + "bias", dtype=np.float32, shape=(n,)) if prefix + "bias" in arrays else None}
        for k in ("w_scale", "w_zp"):
            if not _channels_ok(r[k], n):
                raise _fail(f"array '{prefix + k}' has shape {list(r[k].shape)}, expected () or ({n},)")
        raw[key] = r
        p = {"packed": pack_unit(a, u, r)}
        if mode == "static":
            out_key = _state_key(u.out)
            if out_key not in qp["acts"]:
                raise _fail(f"unit '{u.path}' has no output qparams")
            p["out_scale"], p["out_zp"] = qp["acts"][out_key]
            if prefix + "clamp_lo" in arrays:
                p["clamp"] = (_arr(arrays, prefix + "clamp_lo", dtype=np.int32, shape=()),
                              _arr(arrays, prefix + "clamp_hi", dtype=np.int32, shape=()))
            static[i] = unit_meta(a, u, mode, out_dtype=static["acts"][out_key])
        else:
            if not isinstance(entry.get("reduce_range"), bool) or not isinstance(entry.get("per_token"), bool):
                raise _fail(f"unit '{u.path}': reduce_range / per_token must be booleans")
            static[i] = unit_meta(a, u, mode, reduce_range=entry["reduce_range"], per_token=entry["per_token"])
        qp["units"][key] = p
    for i, u in a.units.items():
        if u.kind == "matmul" or i in static:
            continue
        prefix = f"float_units.{i}."
        w = _arr(arrays, prefix + "w", shape=_weight_aval(a, u))
        qp["float_units"][str(i)] = (w, _arr(arrays, prefix + "bias") if prefix + "bias" in arrays else None)

    for vid in sorted(_runtime_needed(a)):
        key = _state_key(vid)
        aval = a.graph.avals[vid]
        qp["floats"][key] = _arr(arrays, f"floats.{key}", dtype=aval.dtype, shape=aval.shape)
    expected = _expected_names(qp, raw)
    unexpected = sorted(set(arrays) - expected)
    if unexpected:
        raise _fail(f"arrays {unexpected[:5]} do not belong to this program")
    return QuantizedProgram(a, plan, qp, static, mode, raw)


def _expected_names(qp: dict, raw: dict) -> set:
    names = set()
    for key, p in qp["units"].items():
        names.update(f"units.{key}.{k}" for k, v in p.items() if k in _UNIT_ARRAYS and v is not None)
        if "clamp" in p:
            names.update((f"units.{key}.clamp_lo", f"units.{key}.clamp_hi"))
    for key, r in raw.items():
        names.update(f"units.{key}.{k}" for k, v in r.items() if v is not None)
    for key, (w, b) in qp["float_units"].items():
        names.add(f"float_units.{key}.w")
        if b is not None:
            names.add(f"float_units.{key}.bias")
    for key in qp["acts"]:
        names.update((f"acts.{key}.scale", f"acts.{key}.zp"))
    names.update(f"floats.{key}" for key in qp["floats"])
    return names
