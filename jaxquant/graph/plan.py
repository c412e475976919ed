"""The plan: which units get which qconfig, where observers sit, and which values are int8 in the
converted program (a static dataflow pass over the captured graph).

Rules (PT2E's, on jaxpr ops): a quantized unit observes its activation input when that input is not
already int8, and observes its output (a ``matmul`` of two activations outputs float). Int8 flows
unchanged through the :data:`~jaxquant.graph.analysis.PASSTHROUGH` ops and ReLU; ``add`` / ``concatenate``
of int8 values requantize to their own observed output (``quantized::add``). Everything else is float.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Optional

from jaxquant.graph.analysis import PASSTHROUGH, REQUANT, Analysis, GraphQuantizationError, _is_zero
from jaxquant.graph.capture import Lit
from jaxquant.qconfig import QConfig
from jaxquant.qconfig_mapping import QConfigMapping, qconfig_for

__all__ = ["Plan", "make_plan", "resolve_qconfigs"]


@dataclasses.dataclass(eq=False)
class Plan:
    """``unit_qconfigs``: main-op index -> QConfig of every quantized unit; ``observers``: value id ->
    (observer instance, QConfig, path); ``int8``: value ids held as int8 in the converted program;
    ``passthrough`` / ``requant``: op indices; ``requant_paths``: op index -> path."""

    mode: str
    unit_qconfigs: dict
    observers: dict
    int8: set
    passthrough: set
    relu_passthrough: set
    requant: dict
    source: dict = dataclasses.field(default_factory=dict)  # int8 value id -> observed id giving its qparams


class _Sentinel:
    pass


def _object_key(mapping: QConfigMapping, kind: str, module_type: Any) -> Any:
    for key in mapping.object_type_qconfigs:
        if key is module_type and module_type is not None:
            return key
        if isinstance(key, str) and key == kind:
            return key
        if callable(key) and not isinstance(key, type) and getattr(key, "__name__", None) == kind:
            return key
    return _Sentinel


def resolve_qconfigs(a: Analysis, spec: Any, module_types: Optional[dict] = None, *, extra: Optional[dict] = None):
    """QConfig per unit (and per requant op in ``extra``: index -> (path, kind)) from a QConfig or
    QConfigMapping; raises when a rule of the mapping matches no op."""
    module_types = module_types or {}
    targets = [(i, u.path, u.op.kind if u.kind != "matmul" else "matmul") for i, u in a.units.items()]
    targets += [(i, p, k) for i, (p, k) in (extra or {}).items()]
    if spec is None:
        raise GraphQuantizationError("graph: no qconfig given; pass a QConfig (e.g. jq.get_default_qconfig('x86')) "
                                     "or a QConfigMapping")
    if isinstance(spec, QConfig):
        return {i: spec for i, _, _ in targets}
    if not isinstance(spec, QConfigMapping):
        raise TypeError(f"graph: expected a QConfig or QConfigMapping, got {type(spec).__name__}")
    out, hits = {}, set()
    for i, path, kind in targets:
        mtype = module_types.get(path)
        key = _object_key(spec, kind, mtype)
        if key is not _Sentinel:
            hits.add(("object_type", key))
        for regex in spec.module_name_regex_qconfigs:
            if re.match(regex, path):
                hits.add(("regex", regex))
                break
        name = path
        while name:
            if name in spec.module_name_qconfigs:
                hits.add(("name", name))
                break
            name = name.rsplit(".", 1)[0] if "." in name else ""
        out[i] = qconfig_for(spec, path, key)
    paths = sorted({p for _, p, _ in targets})
    shown = ", ".join(paths[:40]) + (" ..." if len(paths) > 40 else "")
    for key in spec.object_type_qconfigs:
        if ("object_type", key) not in hits:
            raise GraphQuantizationError(
                f"graph.prepare: QConfigMapping.set_object_type({getattr(key, '__name__', key)!r}) matches no op; "
                f"op kinds are 'dot_general', 'conv_general_dilated', 'matmul', 'add', 'concatenate' (or an NNX "
                f"module class); op paths: {shown}")
    for regex in spec.module_name_regex_qconfigs:
        if ("regex", regex) not in hits:
            raise GraphQuantizationError(
                f"graph.prepare: QConfigMapping.set_module_name_regex({regex!r}) matches no op path; op paths: {shown}")
    for name in spec.module_name_qconfigs:
        if ("name", name) not in hits:
            raise GraphQuantizationError(
                f"graph.prepare: QConfigMapping.set_module_name({name!r}) matches no op path; op paths: {shown}")
    return out


def requant_candidates(a: Analysis) -> dict:
    """index -> (path, kind) of every add / concatenate of two activations (named after the nearest
    preceding weighted unit's module)."""
    out, last, counts = {}, "", {}
    for op in a.graph.ops:
        if op.index in a.units and a.units[op.index].kind != "matmul":
            p = a.units[op.index].path
            last = p.rsplit(".", 1)[0] if "." in p else ""
        if op.kind in REQUANT and op.index not in a.absorbed and not any(o in a.param_derived for o in op.outputs):
            vars_in = [i for i in op.inputs if not isinstance(i, Lit)]
            if len(vars_in) >= 2:
                base = (last + "." if last else "") + op.kind
                n = counts.get(base, 0)
                counts[base] = n + 1
                out[op.index] = (f"{base}_{n}", op.kind)
    return out


def _activation_observer(qconfig, path: str):
    if qconfig.activation is None:
        raise GraphQuantizationError(f"graph: '{path}': its qconfig has no activation observer; static "
                                     "quantization needs one")
    obs = qconfig.activation()
    obs = getattr(obs, "activation_post_process", obs)  # a FakeQuantize config observes through its observer
    if getattr(obs, "qscheme", None) is not None and obs.qscheme.is_per_channel:
        raise GraphQuantizationError(f"graph: '{path}': activation observers must be per tensor, got {obs!r}")
    return obs


def make_plan(a: Analysis, qconfigs: dict, mode: str) -> Plan:
    """The static/QAT (observers), dynamic or weight-only plan for resolved ``qconfigs``."""
    g = a.graph
    units = {i: q for i, q in qconfigs.items() if q is not None and i in a.units}
    plan = Plan(mode, units, {}, set(), set(), set(), {})
    if mode not in ("static", "qat"):
        return plan

    def observe(vid, qconfig, path):
        if vid not in plan.observers:
            plan.observers[vid] = (_activation_observer(qconfig, path), qconfig, path)
        plan.int8.add(vid)
        plan.source[vid] = vid

    for op in g.ops:
        if op.index in a.absorbed or (op.outputs and op.outputs[0] in a.param_derived):
            continue
        if op.index in units:
            u, q = a.units[op.index], units[op.index]
            xs = u.x if u.kind == "matmul" else (u.x,)
            for x in xs:
                if isinstance(x, Lit):
                    continue
                if x not in plan.int8:
                    observe(x, q, u.path)
            if u.kind != "matmul":
                observe(u.out, q, u.path)
            continue
        vars_in = [i for i in op.inputs if not isinstance(i, Lit)]
        if not vars_in or len(op.outputs) != 1:
            continue
        if op.kind in PASSTHROUGH and vars_in[0] in plan.int8 and op.inputs[0] == vars_in[0] and len(vars_in) == 1:
            plan.passthrough.add(op.index)
            plan.int8.add(op.outputs[0])
            plan.source[op.outputs[0]] = plan.source[vars_in[0]]
        elif op.kind == "max" and len(op.inputs) == 2 and _is_zero(op.inputs[1]) and op.inputs[0] in plan.int8:
            plan.relu_passthrough.add(op.index)
            plan.int8.add(op.outputs[0])
            plan.source[op.outputs[0]] = plan.source[op.inputs[0]]
        elif op.index in qconfigs and qconfigs[op.index] is not None and all(v in plan.int8 for v in vars_in) \
                and len(vars_in) == len(op.inputs):
            plan.requant[op.index] = qconfigs[op.index]
            observe(op.outputs[0], qconfigs[op.index], f"{op.kind}_{op.index}")
    return plan
