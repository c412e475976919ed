"""Analysis: which operands are weights, which ops fuse, and what each op is called.

* A value is *param-derived* when it depends only on the params argument and constants. The operand of a
  ``dot_general`` / ``conv_general_dilated`` that is param-derived is the op's weight; its output channels
  are the weight's free (non-contracting, non-batch) axes of a dot, or the ``O`` axis of a conv's
  dimension numbers.
* After such an op, a chain of ``add``/``sub``/``mul``/``div`` by param-derived per-channel vectors (a bias,
  an inference-mode BatchNorm, any folded norm) is absorbed into the unit, then a ReLU (``max(y, 0)``),
  ReLU6 (``min(max(y, 0), 6)``) or ``clamp`` with literal bounds.
* Paths: the weight's param path without its last component (NNX ``fc1.kernel`` -> ``fc1``, Linen
  ``params/Dense_0/kernel`` -> ``Dense_0``); else the name stack (dots for slashes); else ``<kind>_<index>``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np

from jaxquant.graph.capture import Graph, Lit, Op

__all__ = ["Unit", "Analysis", "analyze", "GraphQuantizationError"]

# Ops through which a weight keeps its identity (and int8 activations keep their qparams).
WEIGHT_CHAIN = ("transpose", "reshape", "convert_element_type", "broadcast_in_dim", "squeeze",
                "expand_dims", "copy", "copy_p")
EPILOGUE = ("add", "sub", "mul", "div")
# Ops an int8 activation passes through unchanged (same scale and zero point).
PASSTHROUGH = ("transpose", "reshape", "squeeze", "expand_dims", "copy", "copy_p", "slice",
               "reduce_window_max", "reduce_max", "broadcast_in_dim", "rev")
# Ops between quantized activations that requantize to an observed output scale (quantized::add).
REQUANT = ("add", "concatenate")


class GraphQuantizationError(ValueError):
    """Bad input to graph-mode quantization; the message names the op path and what to do."""


@dataclasses.dataclass(eq=False)
class Unit:
    """One quantizable op with what was fused into it.

    kind: ``"linear"`` (dot with a weight), ``"conv"``, ``"matmul"`` (dot of two activations).
    x: activation value id; w: weight value id (None for matmul); w_side: operand position of the weight.
    epilogue: ``[(op kind, atom)]`` applied in order to the output (bias, BatchNorm, ...).
    act: None, ``"relu"`` or ``("clamp", lo, hi)``. out: the unit's final value id.
    channel_axes: the output's channel axes (where the epilogue vectors vary).
    """

    kind: str
    path: str
    op: Op
    x: Any
    w: Optional[int]
    w_side: int
    epilogue: list
    absorbed: list
    act: Any
    out: int
    channel_axes: tuple


@dataclasses.dataclass(eq=False)
class Analysis:
    graph: Graph
    param_derived: set
    units: dict  # op index of the main op -> Unit
    absorbed: dict  # op index -> owning unit
    consumers: dict
    outputs: set
    notes: list  # (path, reason) left float
    retrace: Any = None  # input leaves -> Analysis of the same program at those shapes
    _cache: dict = dataclasses.field(default_factory=dict)

    def for_inputs(self, leaves) -> "Analysis":
        """This analysis, or the program re-captured for inputs of other shapes (a jaxpr is shape
        specialized): same ops and value ids, checked."""
        key = tuple((tuple(np.shape(x)), str(getattr(x, "dtype", type(x).__name__))) for x in leaves)
        mine = tuple((tuple(self.graph.avals[i].shape), str(self.graph.avals[i].dtype)) for i in self.graph.input_ids)
        if key == mine or self.retrace is None:
            return self
        if key not in self._cache:
            other = self.retrace(leaves)
            check_same_program(self, other)
            other.retrace = self.retrace
            self._cache[key] = other
        return self._cache[key]


def _is_zero(atom) -> bool:
    return isinstance(atom, Lit) and np.ndim(atom.value) == 0 and float(np.asarray(atom.value)) == 0.0


def _scalar_lit(atom) -> Optional[float]:
    if isinstance(atom, Lit) and np.ndim(atom.value) == 0:
        return float(np.asarray(atom.value))
    return None


def _shape(g: Graph, atom) -> tuple:
    if isinstance(atom, Lit):
        return tuple(np.shape(atom.value))
    return tuple(g.avals[atom].shape)


def _per_channel(g: Graph, atom, out_shape: tuple, channel_axes: tuple) -> bool:
    shape = _shape(g, atom)
    if len(shape) > len(out_shape):
        return False
    shape = (1,) * (len(out_shape) - len(shape)) + shape
    return all(s == 1 or (i in channel_axes and s == out_shape[i]) for i, s in enumerate(shape))


def weight_param_path(a: "Analysis", vid: int) -> Optional[str]:
    """The dotted path of the param leaf a weight value comes from (through layout-only ops)."""
    g = a.graph
    producer = {o: op for op in g.ops for o in op.outputs}
    seen = 0
    while vid not in g.param_ids and seen < 64:
        op = producer.get(vid)
        if op is None or op.kind not in WEIGHT_CHAIN:
            return None
        vid = op.inputs[0] if not isinstance(op.inputs[0], Lit) else None
        if vid is None:
            return None
        seen += 1
    if vid in g.param_ids:
        return g.param_paths[g.param_ids.index(vid)]
    return None


def _module_of(param_path: str) -> str:
    return param_path.rsplit(".", 1)[0] if "." in param_path else param_path


def analyze(g: Graph) -> Analysis:
    """Find weights, units and fusions of a captured graph (no qconfig needed)."""
    derived = set(g.param_ids)
    consumers: dict[int, list[int]] = {}
    for op in g.ops:
        vars_in = [i for i in op.inputs if not isinstance(i, Lit)]
        for i in vars_in:
            consumers.setdefault(i, []).append(op.index)
        if op.kind not in ("rng_uniform", "random_bits", "random_seed", "random_wrap") and all(
                i in derived for i in vars_in) and op.kind not in ("scan", "cond", "while"):
            derived.update(op.outputs)
    outputs = {o for o in g.output_atoms if not isinstance(o, Lit)}
    a = Analysis(g, derived, {}, {}, consumers, outputs, [])
    producer_path: dict[int, str] = {}
    used_names: dict[str, int] = {}

    def unique(name: str) -> str:
        n = used_names.get(name, 0)
        used_names[name] = n + 1
        return name if n == 0 else f"{name}_{n}"

    for op in g.ops:
        if op.index in a.absorbed or any(o in derived for o in op.outputs):
            continue
        if op.kind not in ("dot_general", "conv_general_dilated"):
            continue
        lhs, rhs = op.inputs[0], op.inputs[1]
        is_w = [isinstance(v, Lit) or v in derived for v in (lhs, rhs)]
        stack_name = op.name.split("/", 1)[1] if "/" in op.name else op.name
        stack_name = stack_name.replace("/", ".")
        if is_w[0] and is_w[1]:
            continue
        if not is_w[0] and not is_w[1]:
            if op.kind == "conv_general_dilated":
                a.notes.append((f"conv_general_dilated_{op.index}", "both operands are activations"))
                continue
            path = unique(stack_name + ".matmul" if stack_name else f"matmul_{op.index}")
            out = op.outputs[0]
            a.units[op.index] = Unit("matmul", path, op, (lhs, rhs), None, -1, [], [], None, out, ())
            continue
        w_side = 0 if is_w[0] else 1
        w, x = (lhs, rhs) if w_side == 0 else (rhs, lhs)
        y = op.outputs[0]
        out_shape = tuple(g.avals[y].shape)
        if op.kind == "dot_general":
            (lc, rc), (lb, rb) = op.params["dimension_numbers"]
            wc, wb = (lc, lb) if w_side == 0 else (rc, rb)
            w_nd = len(_shape(g, w))
            x_nd = len(_shape(g, x))
            xc, xb = (rc, rb) if w_side == 0 else (lc, lb)
            n_wfree = w_nd - len(wc) - len(wb)
            n_xfree = x_nd - len(xc) - len(xb)
            if w_side == 1:
                channel_axes = tuple(range(len(wb) + n_xfree, len(wb) + n_xfree + n_wfree))
            else:
                channel_axes = tuple(range(len(wb), len(wb) + n_wfree))
            kind = "linear"
        else:
            if w_side != 1:
                a.notes.append((f"conv_general_dilated_{op.index}", "the weight is the lhs operand"))
                continue
            channel_axes = (op.params["dimension_numbers"].out_spec[1],)
            kind = "conv"
        wpath = None if isinstance(w, Lit) else weight_param_path(a, w)
        path = unique(_module_of(wpath) if wpath else (stack_name or f"{op.kind}_{op.index}"))
        # epilogue: per-channel affine steps by param-derived vectors, then an activation
        epilogue, absorbed, cur, act = [], [], y, None
        while cur not in outputs and len(consumers.get(cur, ())) == 1:
            nxt = g.ops[consumers[cur][0]]
            if nxt.kind in EPILOGUE and len(nxt.inputs) == 2:
                first = nxt.inputs[0] is cur or nxt.inputs[0] == cur and not isinstance(nxt.inputs[0], Lit)
                other = nxt.inputs[1] if first else nxt.inputs[0]
                if not first and nxt.kind in ("sub", "div"):
                    break
                if (isinstance(other, Lit) or other in derived) and _per_channel(g, other, out_shape, channel_axes) \
                        and tuple(g.avals[nxt.outputs[0]].shape) == out_shape:
                    epilogue.append((nxt.kind, other))
                    absorbed.append(nxt.index)
                    cur = nxt.outputs[0]
                    continue
            break
        if cur not in outputs and len(consumers.get(cur, ())) == 1:
            nxt = g.ops[consumers[cur][0]]
            if nxt.kind == "max" and len(nxt.inputs) == 2 and _is_zero(nxt.inputs[1]) and nxt.inputs[0] == cur:
                act, cur = "relu", nxt.outputs[0]
                absorbed.append(nxt.index)
                if cur not in outputs and len(consumers.get(cur, ())) == 1:
                    nn = g.ops[consumers[cur][0]]
                    hi = _scalar_lit(nn.inputs[1]) if nn.kind == "min" and len(nn.inputs) == 2 else None
                    if hi is not None and nn.inputs[0] == cur:
                        act, cur = ("clamp", 0.0, hi), nn.outputs[0]
                        absorbed.append(nn.index)
            elif nxt.kind == "clamp" and nxt.inputs[1] == cur:
                lo, hi = _scalar_lit(nxt.inputs[0]), _scalar_lit(nxt.inputs[2])
                if lo is not None and hi is not None:
                    act, cur = ("clamp", lo, hi), nxt.outputs[0]
                    absorbed.append(nxt.index)
        unit = Unit(kind, path, op, x, w, w_side, epilogue, absorbed, act, cur, channel_axes)
        a.units[op.index] = unit
        for i in absorbed:
            a.absorbed[i] = unit
        producer_path[cur] = path
    return a


def check_same_program(a: Analysis, b: Analysis) -> None:
    """Raise when a re-capture (other input shapes) gives a different program: op count, kinds or units."""
    ka = [op.kind for op in a.graph.ops]
    kb = [op.kind for op in b.graph.ops]
    if ka != kb or list(a.units) != list(b.units) or len(a.graph.avals) != len(b.graph.avals):
        first = next((i for i, (x, y) in enumerate(zip(ka, kb)) if x != y), min(len(ka), len(kb)))
        where = a.graph.ops[first].name if first < len(a.graph.ops) else "end of program"
        raise GraphQuantizationError(
            f"graph: the program traced for these input shapes has {len(kb)} ops, the one prepared has {len(ka)}; "
            f"they differ from op {first} ({ka[first] if first < len(ka) else '-'} vs "
            f"{kb[first] if first < len(kb) else '-'}, at '{where or 'no name'}'). The function's structure "
            "depends on its input shapes; prepare, calibrate and convert with inputs of the shapes it will run on")


def op_path(a: Analysis, op: Op) -> str:
    """The path of a non-unit op: its name stack, else ``<kind>_<index>``."""
    name = op.name.split("/", 1)[1] if "/" in op.name else op.name
    return (name.replace("/", ".") + "." if name else "") + f"{op.kind}_{op.index}"
