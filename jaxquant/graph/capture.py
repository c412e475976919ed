"""Capture: trace ``fn(params, *inputs)`` to a closed jaxpr and flatten it into a list of ops.

``pjit``/``jit``, ``custom_jvp_call``, ``custom_vjp_call``, ``checkpoint`` (remat) and ``closed_call`` are
inlined, so ``jax.nn.relu``, ``gelu``, ``softmax`` and jitted helpers become the primitives they are made
of and the patterns of :mod:`jaxquant.graph.analysis` see through them. Control flow (``scan``, ``cond``,
``while``) stays one opaque op that runs in float; :func:`capture` warns, naming each one.

Values are numbered: every op reads ``inputs`` (value ids, or :class:`Lit` for literals and closed-over
constants) and writes ``outputs`` (fresh ids). The program is re-run by binding each op's primitive
(:func:`eval_op`), so it stays an ordinary traceable JAX function.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable, Optional, Sequence, Union

import jax
import numpy as np
from jax.extend import core as jcore

__all__ = ["Lit", "Op", "Graph", "capture", "eval_op", "CONTROL_FLOW", "param_path_strings"]

# Primitives whose body is spliced into the flat program.
_INLINE_CLOSED = {"pjit": "jaxpr", "jit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
                  "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr",
                  "custom_vjp_call_jaxpr": "fun_jaxpr"}
_INLINE_OPEN = {"checkpoint": "jaxpr", "remat": "jaxpr", "remat2": "jaxpr"}
CONTROL_FLOW = ("scan", "cond", "while")


@dataclasses.dataclass(frozen=True, eq=False)
class Lit:
    """A literal or a closed-over constant (numpy/JAX array or Python scalar)."""

    value: Any


Atom = Union[int, Lit]


@dataclasses.dataclass(eq=False)
class Op:
    """One primitive application: ``outputs = prim.bind(*inputs, **params)``; ``name`` is the name stack."""

    index: int
    prim: Any
    inputs: tuple
    outputs: tuple
    params: dict
    name: str

    @property
    def kind(self) -> str:
        return self.prim.name


@dataclasses.dataclass(eq=False)
class Graph:
    """A flat program. ``avals[id]`` is each value's ``ShapedArray``; ``param_ids``/``input_ids`` are the
    flattened leaves of the params argument and the other inputs; ``param_paths`` name the param leaves
    (``"block1.conv.kernel"``)."""

    ops: list
    avals: dict
    param_ids: list
    param_paths: list
    input_ids: list
    output_atoms: list
    params_treedef: Any
    inputs_treedef: Any
    out_treedef: Any
    control_flow: list  # (op index, kind, name) left float


def _key_str(k: Any) -> Optional[str]:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def param_path_strings(tree: Any) -> list[str]:
    """Dotted path of every leaf of a params pytree, without flax's wrappers: NNX ``Variable.value`` and
    Linen's top-level ``params``/``batch_stats`` collections are dropped (``"Conv_0.kernel"``)."""
    out = []
    for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
        parts = [_key_str(k) for k in path]
        if parts and parts[-1] in ("value", "raw_value"):
            parts = parts[:-1]
        if len(parts) > 1 and parts[0] in ("params", "batch_stats"):
            parts = parts[1:]
        out.append(".".join(parts))
    return out


class _Builder:
    def __init__(self) -> None:
        self.ops: list[Op] = []
        self.avals: dict[int, Any] = {}
        self.next_id = 0
        self.control_flow: list = []

    def fresh(self, aval) -> int:
        i = self.next_id
        self.next_id += 1
        self.avals[i] = aval
        return i

    def emit(self, jaxpr, consts: Sequence[Any], args: Sequence[Atom], prefix: str) -> list[Atom]:
        env: dict[Any, Atom] = {}
        for v, c in zip(jaxpr.constvars, consts):
            env[v] = Lit(c)
        for v, a in zip(jaxpr.invars, args):
            env[v] = a

        def read(atom) -> Atom:
            if isinstance(atom, jcore.Literal):
                return Lit(atom.val)
            return env[atom]

        for eqn in jaxpr.eqns:
            name_stack = str(eqn.source_info.name_stack)
            name = "/".join(p for p in (prefix, name_stack) if p)
            ins = [read(a) for a in eqn.invars]
            pname = eqn.primitive.name
            sub = None
            if pname in _INLINE_CLOSED and _INLINE_CLOSED[pname] in eqn.params:
                closed = eqn.params[_INLINE_CLOSED[pname]]
                sub = (closed.jaxpr, closed.consts)
                if pname in ("custom_jvp_call", "custom_vjp_call") and eqn.params.get("num_consts", 0):
                    pass  # consts are ordinary leading invars of call_jaxpr
            elif pname in _INLINE_OPEN and _INLINE_OPEN[pname] in eqn.params:
                sub = (eqn.params[_INLINE_OPEN[pname]], ())
            if sub is not None:
                outs = self.emit(sub[0], sub[1], ins, name)
                for v, o in zip(eqn.outvars, outs):
                    env[v] = o
                continue
            outs = tuple(self.fresh(v.aval) for v in eqn.outvars)
            op = Op(len(self.ops), eqn.primitive, tuple(ins), outs, dict(eqn.params), name)
            self.ops.append(op)
            if pname in CONTROL_FLOW:
                self.control_flow.append((op.index, pname, name))
            for v, o in zip(eqn.outvars, outs):
                env[v] = o
        return [read(a) for a in jaxpr.outvars]


def capture(fn: Callable, example_args: Sequence[Any], *, params_argnums: int = 0) -> Graph:
    """Trace ``fn(*example_args)`` and flatten it; ``example_args[params_argnums]`` is the params pytree.

    Warns (``UserWarning``) once per control-flow op, naming its kind and path: those run in float.
    """
    example_args = tuple(example_args)
    if not 0 <= params_argnums < len(example_args):
        raise ValueError(f"graph.prepare: params_argnums={params_argnums} but fn takes {len(example_args)} "
                         "example arguments")
    params = example_args[params_argnums]
    inputs = example_args[:params_argnums] + example_args[params_argnums + 1:]

    def flat_fn(params, inputs):
        args = list(inputs)
        args.insert(params_argnums, params)
        return fn(*args)

    closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(params, inputs)
    params_leaves, params_treedef = jax.tree_util.tree_flatten(params)
    inputs_leaves, inputs_treedef = jax.tree_util.tree_flatten(inputs)
    b = _Builder()
    in_vars = closed.jaxpr.invars
    if len(in_vars) != len(params_leaves) + len(inputs_leaves):
        raise ValueError("graph.prepare: the traced function's arguments do not match its example pytrees")
    param_ids = [b.fresh(v.aval) for v in in_vars[:len(params_leaves)]]
    input_ids = [b.fresh(v.aval) for v in in_vars[len(params_leaves):]]
    outs = b.emit(closed.jaxpr, closed.consts, param_ids + input_ids, "")
    for index, kind, name in b.control_flow:
        warnings.warn(f"graph.prepare: '{kind}' at op {index} ({name or 'no name'}) is control flow; it and "
                      "everything inside its body run in float", UserWarning, stacklevel=3)
    return Graph(b.ops, b.avals, param_ids, param_path_strings(params), input_ids, outs, params_treedef,
                 inputs_treedef, jax.tree_util.tree_structure(out_shape), b.control_flow)


def eval_op(op: Op, values: Sequence[Any]) -> list:
    """Run one op on concrete or traced ``values``; returns its outputs as a list."""
    out = op.prim.bind(*values, **op.params)
    return list(out) if op.prim.multiple_results else [out]


def literal_value(atom: Lit) -> Any:
    return atom.value
