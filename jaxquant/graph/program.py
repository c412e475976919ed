"""Observed, QAT and int8 programs: interpreters over the captured graph and its plan.

* :class:`ObservedProgram` (``prepare``): ``apply(params, observer_state, *inputs) -> (outputs,
  observer_state)``, the float program with each unit run fused (epilogue folded, as the int8 op will
  compute it) and observers updated where the plan puts them.
* :class:`QATProgram` (``prepare_qat``): the same with fake quantization on weights (per channel, fresh
  qparams per step) and on observed activations; differentiable in ``params``.
* :class:`QuantizedProgram` (``convert`` / ``quantize_dynamic``): ``apply(qparams, *inputs) -> outputs``, a
  plain jittable function of the int8 params pytree and the inputs.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.core.batches import iterate_batches
from jaxquant.core.weights import observer_quant_range, weight_observer
from jaxquant.fake_quant.functional import fake_quantize_per_channel_affine, fake_quantize_per_tensor_affine
from jaxquant.graph import kernels as K
from jaxquant.graph.analysis import Analysis, Unit
from jaxquant.graph.capture import Lit, eval_op
from jaxquant.graph.fold import fold_unit, prelude, weight_channel_axes
from jaxquant.graph.plan import Plan
from jaxquant.observers import check_observer_state
from jaxquant.qtensor import QTensor, dequantize, quantize_per_tensor

__all__ = ["ObservedProgram", "QATProgram", "QuantizedProgram", "unit_float"]


def _is_concrete(tree) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(tree))


def _act_apply(y, act):
    if act is None:
        return y
    if act == "relu":
        return jnp.maximum(y, jnp.zeros((), y.dtype))
    _, lo, hi = act
    return jnp.clip(y, lo, hi)


def unit_float(a: Analysis, u: Unit, x, w, bias):
    """A linear/conv unit in float: the original op on the folded weight, plus bias, plus activation."""
    args = [w, x] if u.w_side == 0 else [x, w]
    y = eval_op(u.op, args)[0]
    if bias is not None:
        shape = tuple(y.shape[i] if i in u.channel_axes else 1 for i in range(y.ndim))
        y = y + jnp.asarray(bias, y.dtype).reshape(shape)
    return _act_apply(y, u.act)


def _skip(a: Analysis, op) -> bool:
    return op.index in a.absorbed or bool(op.outputs and op.outputs[0] in a.param_derived)


def _read(env, atom):
    return atom.value if isinstance(atom, Lit) else env[atom]


def _state_key(vid: int) -> str:
    return f"v{vid}"


# --------------------------------------------------------------------------------------------- float


def _run_float(a: Analysis, plan: Plan, pre: dict, folded: dict, inputs_leaves, state: dict, *,
               fake_quant: bool, record: Optional[dict] = None):
    g = a.graph
    env = dict(pre)
    env.update(zip(g.input_ids, inputs_leaves))
    state = dict(state)

    def post(vid, value):
        if vid not in plan.observers:
            return value
        obs = plan.observers[vid][0]
        key = _state_key(vid)
        state[key] = obs.update(state[key], jax.lax.stop_gradient(value))
        if not fake_quant:
            return value
        scale, zp = obs.calculate_qparams(state[key])
        qmin, qmax = observer_quant_range(obs)
        return fake_quantize_per_tensor_affine(value, jax.lax.stop_gradient(scale), zp, qmin, qmax)

    for vid in g.input_ids:
        env[vid] = post(vid, env[vid])
    for op in g.ops:
        if _skip(a, op):
            continue
        if op.index in plan.unit_qconfigs and a.units[op.index].kind != "matmul":
            u = a.units[op.index]
            w, bias = folded[op.index] if op.index in folded else fold_unit(a, u, env, use_numpy=False)
            if fake_quant:
                w = _fake_quant_weight(a, u, w, plan.unit_qconfigs[op.index])
            env[u.out] = post(u.out, unit_float(a, u, env[u.x], w, bias))
            if record is not None:
                record[u.path] = env[u.out]
            continue
        if op.index in a.units and a.units[op.index].kind != "matmul":
            u = a.units[op.index]
            w, bias = fold_unit(a, u, env, use_numpy=False) if op.index not in folded else folded[op.index]
            env[u.out] = unit_float(a, u, env[u.x], w, bias)
            if record is not None:
                record[u.path] = env[u.out]
            continue
        outs = eval_op(op, [_read(env, i) for i in op.inputs])
        if record is not None and op.index in a.units:
            record[a.units[op.index].path] = outs[0]
        for o, v in zip(op.outputs, outs):
            env[o] = post(o, v)
    outs = [_read(env, o) for o in g.output_atoms]
    return jax.tree_util.tree_unflatten(g.out_treedef, outs), state


def _fake_quant_weight(a: Analysis, u: Unit, w, qconfig):
    """Per-channel (or per-tensor) fake quantization of a weight with the qconfig's weight observer, qparams
    from the current weight (stop-gradient): straight-through gradients to the float params."""
    obs = weight_observer(qconfig, u.path)
    axes = weight_channel_axes(a, u)
    w_pt = jnp.moveaxis(w, axes, tuple(range(len(axes)))).reshape((-1,) + tuple(
        s for i, s in enumerate(w.shape) if i not in axes))
    state = obs.update(obs.init(w_pt), jax.lax.stop_gradient(w_pt))
    scale, zp = jax.lax.stop_gradient(obs.calculate_qparams(state))
    qmin, qmax = observer_quant_range(obs)
    if obs.qscheme.is_per_channel:
        fq = fake_quantize_per_channel_affine(w_pt, scale, zp.astype(jnp.int32), 0, qmin, qmax)
    else:
        fq = fake_quantize_per_tensor_affine(w_pt, scale, zp, qmin, qmax)
    fq = fq.reshape(tuple(w.shape[i] for i in axes) + tuple(s for i, s in enumerate(w.shape) if i not in axes))
    return jnp.moveaxis(fq, tuple(range(len(axes))), axes)


@dataclasses.dataclass(eq=False)
class ObservedProgram:
    """What :func:`jaxquant.graph.prepare` returns.

    ``apply(params, observer_state, *inputs) -> (outputs, observer_state)`` is pure and jittable;
    ``init_state`` is the fresh observer-state pytree (``{"v<id>": observer state}``); ``params`` is the
    example params (the NNX state for ``prepare(model, x, ...)``); ``observers`` lists
    ``(value key, path, observer)``. ``make_params(model)`` gives an NNX model's params for ``apply``.
    """

    analysis: Analysis
    plan: Plan
    params: Any
    init_state: dict
    make_params: Optional[Callable] = None

    def apply(self, params, observer_state, *inputs):
        leaves = jax.tree_util.tree_leaves(params)
        ins = jax.tree_util.tree_leaves(inputs)
        a = self.analysis.for_inputs(ins)
        pre = prelude(a, leaves, use_numpy=False)
        return _run_float(a, self.plan, pre, {}, ins, observer_state, fake_quant=self.plan.mode == "qat")

    __call__ = apply

    @property
    def observers(self) -> list:
        return [(_state_key(v), path, obs) for v, (obs, _, path) in self.plan.observers.items()]

    @property
    def units(self) -> list:
        """``(path, kind, fused)`` of every quantized unit (fused: epilogue op kinds and activation)."""
        out = []
        for i in self.plan.unit_qconfigs:
            u = self.analysis.units[i]
            out.append((u.path, u.kind, tuple(k for k, _ in u.epilogue) + ((u.act if isinstance(u.act, str)
                                                                            else u.act[0]),) if u.act else
                        tuple(k for k, _ in u.epilogue)))
        return out

    def host_fold(self, params) -> tuple[dict, dict]:
        """``(param-derived values, folded (weight, bias) per unit)`` computed in numpy on concrete params."""
        leaves = [np.asarray(x) if hasattr(x, "dtype") and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.extended)
                  else x
                  for x in jax.tree_util.tree_leaves(params)]
        pre = prelude(self.analysis, leaves, use_numpy=True)
        folded = {i: fold_unit(self.analysis, self.analysis.units[i], pre, use_numpy=True)
                  for i, u in self.analysis.units.items() if u.kind != "matmul"}
        return pre, folded


@dataclasses.dataclass(eq=False)
class QATProgram(ObservedProgram):
    """What :func:`jaxquant.graph.prepare_qat` returns: ``apply(params, qat_state, *inputs) -> (outputs,
    qat_state)`` with fake quantization; ``jax.grad`` of a loss of ``outputs`` w.r.t. ``params`` works
    (straight-through estimator)."""


def calibrate(program: ObservedProgram, batches: Iterable[Any], params: Any = None, state: Optional[dict] = None,
              *, progress: bool = True, num_batches: Optional[int] = None) -> dict:
    """Run calibration batches through an observed program with one jit-compiled step; returns the new
    observer state. Folding is done once on the host (numpy, bit-exact with eager ``fuse_modules``).

    ``batches``: arrays (one input each) or tuples of inputs. ``params`` defaults to ``program.params``.
    """
    params = program.params if params is None else params
    state = dict(program.init_state if state is None else state)
    pre, folded = program.host_fold(params)
    pre = {k: v for k, v in pre.items() if k in _runtime_needed(program.analysis)}
    a, plan = program.analysis, program.plan

    # The folded weights are closed over as constants of the compiled step, as eager calibrate does with
    # the float params: XLA then picks the same dot algorithms, and the observers see the same floats.
    @jax.jit
    def step(state, inputs):
        leaves = jax.tree_util.tree_leaves(inputs)
        return _run_float(a.for_inputs(leaves), plan, pre, folded, leaves, state, fake_quant=False)[1]

    for _, batch in iterate_batches(batches, num_batches, progress, "graph calibrate"):
        inputs = batch if isinstance(batch, tuple) else (batch,)
        state = step(state, inputs)
    for vid, (obs, _, path) in plan.observers.items():
        check_observer_state(obs, state[_state_key(vid)], name=f"{path} (graph value v{vid})")
    return state


def _runtime_needed(a: Analysis) -> set:
    """Param-derived values read by ops that run at run time (not folded away)."""
    need = set()
    for op in a.graph.ops:
        if _skip(a, op):
            continue
        u = a.units.get(op.index)
        ins = op.inputs if u is None or u.kind == "matmul" else (u.x,)
        need.update(i for i in ins if not isinstance(i, Lit) and i in a.param_derived)
    need.update(o for o in a.graph.output_atoms if not isinstance(o, Lit) and o in a.param_derived)
    return need


# ---------------------------------------------------------------------------------------------- int8


def _dot_layout(a: Analysis, u: Unit):
    """Permutations taking the activation to ``(M..., K...)`` and the weight to ``(K..., N...)``."""
    (lc, rc), (lb, rb) = u.op.params["dimension_numbers"]
    if lb or rb:
        return None
    x_nd = len(a.graph.avals[u.x].shape)
    w_nd = len(np.shape(u.w.value)) if isinstance(u.w, Lit) else len(a.graph.avals[u.w].shape)
    xc, wc = (rc, lc) if u.w_side == 0 else (lc, rc)
    xfree = [d for d in range(x_nd) if d not in xc]
    wfree = [d for d in range(w_nd) if d not in wc]
    return list(xfree) + list(xc), list(wc) + list(wfree), len(xfree), len(wfree)


def _flax_weight(a: Analysis, u: Unit, w):
    if u.kind == "conv":
        rs = u.op.params["dimension_numbers"].rhs_spec
        return jnp.transpose(w, tuple(rs[2:]) + (rs[1], rs[0]))
    xperm, wperm, _, nwf = _dot_layout(a, u)
    wt = jnp.transpose(w, wperm)
    n = int(np.prod(wt.shape[len(wperm) - nwf:]))
    return wt.reshape(-1, n)


def _conv_perms(u: Unit):
    dn = u.op.params["dimension_numbers"]
    lhs, out = dn.lhs_spec, dn.out_spec
    to_nhwc = (lhs[0],) + tuple(lhs[2:]) + (lhs[1],)
    nd = len(out)
    from_nhwc = [0] * nd
    from_nhwc[out[0]] = 0
    from_nhwc[out[1]] = nd - 1
    for i, d in enumerate(out[2:]):
        from_nhwc[d] = 1 + i
    return to_nhwc, tuple(from_nhwc)


@dataclasses.dataclass(eq=False)
class QuantizedProgram:
    """The converted program. ``apply(qparams, *inputs)`` is a plain jittable function; ``params`` is
    its int8 params pytree (prepacked kernels, scales, zero points, the float values float ops need).
    ``program(*inputs)`` calls ``apply(self.params, *inputs)``. ``unit_paths`` lists what runs int8."""

    analysis: Analysis
    plan: Plan
    params: dict
    static: dict  # unit index -> static metadata
    mode: str
    # unit index (str) -> the int8 weight before packing (``w_q`` flax layout, ``w_scale``, ``w_zp``, ``bias``):
    # what ``jq.save`` writes; the packed layouts are rebuilt from it on load
    raw: dict = dataclasses.field(default_factory=dict)

    def apply(self, qparams, *inputs):
        return _run_int8(self, qparams, jax.tree_util.tree_leaves(inputs))


    def __call__(self, *inputs):
        # compiled once per input shape: interpreted op by op, every primitive would dispatch (and
        # compile) on its own
        if getattr(self, "_jitted", None) is None:
            self._jitted = jax.jit(self.apply)
        return self._jitted(self.params, *inputs)

    @property
    def unit_paths(self) -> list:
        return [self.analysis.units[i].path for i in self.static if i != "acts"]


def _run_int8(prog: QuantizedProgram, qp: dict, inputs_leaves, record: Optional[dict] = None):
    a, plan = prog.analysis.for_inputs(inputs_leaves), prog.plan
    g = a.graph
    env = {int(k[1:]): v for k, v in qp["floats"].items()}
    env.update(zip(g.input_ids, inputs_leaves))
    acts = qp.get("acts", {})

    def get_f(atom):
        v = _read(env, atom)
        return dequantize(v) if isinstance(v, QTensor) else v

    def get_q(vid):
        v = env[vid]
        if isinstance(v, QTensor):
            return v
        key = _state_key(vid)
        scale, zp = acts[key]
        q = quantize_per_tensor(v, scale, zp, prog.static["acts"][key])
        env[vid] = q  # every consumer of this value shares one quantize
        return q

    for op in g.ops:
        if _skip(a, op):
            continue
        i = op.index
        meta = prog.static.get(i)
        if meta is not None:
            u = a.units[i]
            p = qp["units"][str(i)]
            env[u.out] = _run_unit(a, u, meta, p, get_q, get_f)
            if record is not None:
                record[u.path] = get_f(u.out)
            continue
        if i in a.units and a.units[i].kind != "matmul":  # a unit left float
            u = a.units[i]
            w, bias = qp["float_units"][str(i)]
            env[u.out] = unit_float(a, u, get_f(u.x), w, bias)
            continue
        if i in plan.passthrough:
            q = env[op.inputs[0]]
            if isinstance(q, QTensor):
                out = eval_op(op, [q.int_data])[0]
                env[op.outputs[0]] = QTensor(out, q.scale, q.zero_point, q.dtype, q.qscheme, None)
                continue
        if i in plan.relu_passthrough:
            q = env[op.inputs[0]]
            if isinstance(q, QTensor):
                out = jnp.maximum(q.int_data, q.zero_point.astype(q.int_data.dtype))
                env[op.outputs[0]] = QTensor(out, q.scale, q.zero_point, q.dtype, q.qscheme, None)
                continue
        if i in plan.requant:
            y = eval_op(op, [get_f(x) for x in op.inputs])[0]
            key = _state_key(op.outputs[0])
            scale, zp = acts[key]
            env[op.outputs[0]] = quantize_per_tensor(y, scale, zp, prog.static["acts"][key])
            continue
        outs = eval_op(op, [get_f(x) for x in op.inputs])
        env.update(zip(op.outputs, outs))
    outs = [get_f(o) for o in g.output_atoms]
    return jax.tree_util.tree_unflatten(g.out_treedef, outs)


def _run_unit(a: Analysis, u: Unit, meta: dict, p: dict, get_q, get_f):
    out_aval = a.graph.avals[u.op.outputs[0]]
    if u.kind == "matmul":
        lhs, rhs = u.x
        dn = u.op.params["dimension_numbers"]
        if meta["mode"] == "dynamic":
            lf, rf = get_f(lhs), get_f(rhs)
            ls, lz = K.dynamic_qparams(lf)
            rs, rz = K.dynamic_qparams(rf)
            lq = quantize_per_tensor(lf, ls, lz).int_data
            rq = quantize_per_tensor(rf, rs, rz).int_data
        else:
            lqt, rqt = get_q(lhs), get_q(rhs)
            lq, lz, ls = lqt.int_data, lqt.q_zero_point(), lqt.q_scale()
            rq, rz, rs = rqt.int_data, rqt.q_zero_point(), rqt.q_scale()
        acc = K.int8_dot_general(lq, lz, rq, rz, dn)
        return (acc.astype(jnp.float32) * (jnp.float32(ls) * jnp.float32(rs))).astype(out_aval.dtype)
    if meta["mode"] == "weight_only":
        w = (p["w_q"].astype(jnp.float32) - p["w_zp"]) * p["w_scale"]
        return unit_float(a, u, get_f(u.x), w.astype(meta["w_dtype"]), p.get("bias"))
    if u.kind == "conv":
        q = get_q(u.x)
        to_nhwc, from_nhwc = meta["perms"]
        if to_nhwc != tuple(range(len(to_nhwc))):
            q = QTensor(jnp.transpose(q.int_data, to_nhwc), q.scale, q.zero_point, q.dtype)
        # the unit's clamp (codes inside the dtype's range) runs in the conv: the native backend
        # clips inside its call instead of in a separate XLA kernel; the codes are the same
        clamp = jnp.stack([jnp.asarray(c, jnp.int32) for c in p["clamp"]]) if "clamp" in p else None
        y = K.run_conv(q, p["packed"], p["out_scale"], p["out_zp"], out_dtype=meta["out_dtype"],
                       relu=meta["relu"], clamp=clamp).int_data
        if from_nhwc != tuple(range(len(from_nhwc))):
            y = jnp.transpose(y, from_nhwc)
        return QTensor(y, p["out_scale"], p["out_zp"], meta["out_dtype"])
    xperm, _, nxf, nwf = meta["layout"]
    if meta["mode"] == "dynamic":
        x = get_f(u.x)
        xt = x if xperm == list(range(len(xperm))) else jnp.transpose(x, xperm)
        lead = xt.shape[:nxf]
        x2 = xt.reshape(int(np.prod(lead)) if lead else 1, -1)
        y = K.run_dynamic_linear(x2, p["packed"], reduce_range=meta["reduce_range"], per_token=meta["per_token"],
                                 relu=u.act == "relu")
        if isinstance(u.act, tuple):
            y = jnp.clip(y, u.act[1], u.act[2])
        y = y.astype(out_aval.dtype)
    else:
        q = get_q(u.x)
        xt = q.int_data if xperm == list(range(len(xperm))) else jnp.transpose(q.int_data, xperm)
        lead = xt.shape[:nxf]
        x2 = QTensor(xt.reshape(int(np.prod(lead)) if lead else 1, -1), q.scale, q.zero_point, q.dtype)
        y = K.run_linear(x2, p["packed"], p["out_scale"], p["out_zp"], out_dtype=meta["out_dtype"],
                         relu=meta["relu"]).int_data
        y = _int_clamp(y, p)
    y = y.reshape(tuple(lead) + meta["wfree_shape"])
    if u.w_side == 0:  # dot_general puts the weight's free axes first
        y = jnp.transpose(y, tuple(range(nxf, nxf + nwf)) + tuple(range(nxf)))
    if meta["mode"] == "dynamic":
        return y
    return QTensor(y, p["out_scale"], p["out_zp"], meta["out_dtype"])


def _int_clamp(y, p):
    if "clamp" not in p:
        return y
    lo, hi = p["clamp"]
    return jnp.clip(y, lo.astype(y.dtype), hi.astype(y.dtype))


def _record_units(prog: QuantizedProgram, float_params, inputs) -> tuple[dict, dict, tuple]:
    """Every quantized unit's output (float) in the float program and in the int8 program, by path; and
    both programs' flattened outputs."""
    leaves = jax.tree_util.tree_leaves(inputs)
    a = prog.analysis.for_inputs(leaves)
    float_plan = dataclasses.replace(prog.plan, observers={}, mode="float")
    pre = prelude(a, jax.tree_util.tree_leaves(float_params), use_numpy=False)
    f_rec, q_rec = {}, {}
    y_float, _ = _run_float(a, float_plan, pre, {}, leaves, {}, fake_quant=False, record=f_rec)
    y_q = _run_int8(prog, prog.params, leaves, record=q_rec)
    flat = lambda t: jnp.concatenate([jnp.ravel(x) for x in jax.tree_util.tree_leaves(t)])
    return f_rec, q_rec, (flat(y_float), flat(y_q))
