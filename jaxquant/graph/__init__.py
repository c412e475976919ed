"""Graph mode: quantize any JAX function or unmodified Flax model through its jaxpr (PT2E for JAX).

    observed = jq.graph.prepare(fn, (params, x), qconfig_or_mapping)   # or prepare(nnx_model, x, ...)
    state = jq.graph.calibrate(observed, batches)
    qprog = jq.graph.convert(observed, state)
    y = jax.jit(qprog.apply)(qprog.params, x)

Also :func:`quantize_dynamic`, :func:`quantize_weight_only`, :func:`prepare_qat` (then :func:`convert`) and
:func:`compare` (per-op SQNR, float vs int8). See ``docs/graph_mode.md``.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.graph.analysis import GraphQuantizationError, analyze
from jaxquant.graph.capture import capture
from jaxquant.graph.convert import convert_static, convert_without_calibration
from jaxquant.graph.plan import make_plan, requant_candidates, resolve_qconfigs
from jaxquant.graph.program import ObservedProgram, QATProgram, QuantizedProgram, _record_units, _state_key
from jaxquant.graph.program import calibrate as _calibrate
from jaxquant.graph.record import from_record, to_record
from jaxquant.module_paths import named_modules
from jaxquant.qconfig import default_dynamic_qconfig, default_per_channel_qconfig

__all__ = ["prepare", "prepare_qat", "calibrate", "convert", "quantize_dynamic", "quantize_weight_only",
           "compare", "ObservedProgram", "QATProgram", "QuantizedProgram", "GraphQuantizationError"]


def _as_function(fn_or_model: Any, example_args: Any, params_argnums: int):
    """``(fn, example_args tuple, params_argnums, module_types, make_params)``; an NNX module becomes
    ``fn(state, *inputs)`` over ``nnx.split``."""
    from flax import nnx

    if isinstance(fn_or_model, nnx.Module):
        graphdef, state = nnx.split(fn_or_model)
        inputs = example_args if isinstance(example_args, tuple) else (example_args,)

        def fn(state, *xs):
            return nnx.merge(graphdef, state)(*xs)

        types = {p: type(m) for p, m in named_modules(fn_or_model)}
        return fn, (state,) + tuple(inputs), 0, types, lambda model: nnx.split(model)[1]
    if not callable(fn_or_model):
        raise TypeError(f"graph.prepare: expected a function or an nnx.Module, got {type(fn_or_model).__name__}")
    if not isinstance(example_args, (tuple, list)):
        raise TypeError("graph.prepare: example_args must be a tuple of fn's arguments, e.g. (params, x)")
    return fn_or_model, tuple(example_args), params_argnums, {}, None


def _retracer(fn, args, argnums, graph):
    params_spec = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype)
                                         if hasattr(x, "dtype") else x, args[argnums])

    def retrace(leaves):
        import warnings

        specs = [jax.ShapeDtypeStruct(np.shape(x), x.dtype) for x in leaves]
        inputs = jax.tree_util.tree_unflatten(graph.inputs_treedef, specs)
        new_args = list(inputs)
        new_args.insert(argnums, params_spec)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return analyze(capture(fn, tuple(new_args), params_argnums=argnums))

    return retrace


def _prepare(fn_or_model, example_args, spec, params_argnums, mode):
    fn, args, argnums, types, make_params = _as_function(fn_or_model, example_args, params_argnums)
    graph = capture(fn, args, params_argnums=argnums)
    a = analyze(graph)
    a.retrace = _retracer(fn, args, argnums, graph)
    extra = requant_candidates(a) if mode in ("static", "qat") else {}
    qconfigs = resolve_qconfigs(a, spec, types, extra=extra)
    if not any(q is not None for i, q in qconfigs.items() if i in a.units):
        raise GraphQuantizationError("graph.prepare: no dot_general/conv_general_dilated op got a qconfig, so "
                                     "nothing would be quantized; op paths: "
                                     + ", ".join(u.path for u in a.units.values()))
    plan = make_plan(a, qconfigs, mode)
    params = args[argnums]
    return a, plan, params, make_params


def prepare(fn_or_model: Any, example_args: Any, qconfig_or_mapping: Any, *,
            params_argnums: int = 0) -> ObservedProgram:
    """Capture ``fn(params, *inputs)`` (or an NNX model) and insert observers for static PTQ.

    Args:
      fn_or_model: a function whose ``params_argnums`` argument is a params pytree (Linen:
        ``module.apply`` with ``variables``), or an ``nnx.Module`` (then ``example_args`` is its input).
      example_args: a tuple of example arguments (concrete params; inputs only need shape and dtype).
      qconfig_or_mapping: a ``QConfig`` for every op, or a ``QConfigMapping`` whose ``set_global``,
        ``set_object_type`` (``"dot_general"``, ``"conv_general_dilated"``, ``"matmul"``, ``"add"``, an NNX
        module class) and ``set_module_name[_regex]`` rules match op paths (``fc1``, ``Conv_0``, ...).
    Returns:
      An :class:`ObservedProgram`: ``apply(params, observer_state, *inputs) -> (outputs, observer_state)``
      and ``init_state``.
    Raises:
      GraphQuantizationError naming the rule or op path: a mapping rule matching no op, nothing quantized.
    """
    a, plan, params, make_params = _prepare(fn_or_model, example_args, qconfig_or_mapping, params_argnums, "static")
    return ObservedProgram(a, plan, params, _init_state(a, plan), make_params)


def prepare_qat(fn_or_model: Any, example_args: Any, qconfig_or_mapping: Any, *,
                params_argnums: int = 0) -> QATProgram:
    """Like :func:`prepare`, for quantization-aware training: ``apply(params, qat_state, *inputs) ->
    (outputs, qat_state)`` fake-quantizes every quantized unit's (folded) weight per channel and every
    observed activation; gradients reach the float params (straight-through). Train with any optimizer,
    then ``convert(program, qat_state, params=trained_params)``."""
    a, plan, params, make_params = _prepare(fn_or_model, example_args, qconfig_or_mapping, params_argnums, "qat")
    return QATProgram(a, plan, params, _init_state(a, plan), make_params)


def _init_state(a, plan) -> dict:
    return {_state_key(v): obs.init(jax.ShapeDtypeStruct(a.graph.avals[v].shape, a.graph.avals[v].dtype))
            for v, (obs, _, _) in plan.observers.items()}


def calibrate(program: ObservedProgram, batches: Iterable[Any], params: Any = None, state: Optional[dict] = None,
              *, progress: bool = True, num_batches: Optional[int] = None) -> dict:
    """Feed ``batches`` (arrays, or tuples of inputs) through ``program`` with one jit-compiled step (and a
    tqdm bar); returns the observer state. ``params`` defaults to the example params given to prepare.
    Raises ValueError naming the op path of an observer that saw no data or NaN/Inf."""
    return _calibrate(program, batches, params, state, progress=progress, num_batches=num_batches)


def convert(program: ObservedProgram, state: dict, params: Any = None) -> QuantizedProgram:
    """The int8 program of a calibrated (or QAT-trained) program: ``QuantizedProgram.apply(qparams, *inputs)``
    with ``qparams = program.params``. ``params``: the float params (default: the example params; pass the
    trained ones after QAT). Raises GraphQuantizationError when ``state`` does not belong to ``program``."""
    return convert_static(program, state, params)


def quantize_dynamic(fn_or_model: Any, example_args: Any, qconfig_or_mapping: Any = None, *,
                     params_argnums: int = 0, reduce_range: bool = True,
                     per_token: Optional[bool] = None) -> QuantizedProgram:
    """Dynamic quantization: int8 weights of every ``dot_general`` with a weight (u8 x s8 dots, activation
    qparams chosen per call, per tensor or per token), and both sides of activation x activation dots.
    Convolutions stay float. ``qconfig_or_mapping`` defaults to ``jq.default_dynamic_qconfig``."""
    spec = default_dynamic_qconfig if qconfig_or_mapping is None else qconfig_or_mapping
    a, plan, params, _ = _prepare(fn_or_model, example_args, spec, params_argnums, "dynamic")
    return convert_without_calibration(a, plan, params, "dynamic", reduce_range=reduce_range, per_token=per_token)


def quantize_weight_only(fn_or_model: Any, example_args: Any, qconfig_or_mapping: Any = None, *,
                         params_argnums: int = 0) -> QuantizedProgram:
    """Weight-only int8: every weighted dot/conv stores an int8 weight (per channel by default) and computes
    in float on the dequantized weight. Defaults to ``jq.default_per_channel_qconfig``'s weight observer."""
    spec = default_per_channel_qconfig if qconfig_or_mapping is None else qconfig_or_mapping
    a, plan, params, _ = _prepare(fn_or_model, example_args, spec, params_argnums, "weight_only")
    return convert_without_calibration(a, plan, params, "weight_only")


def program_record(program: QuantizedProgram) -> tuple[dict, dict]:
    """``(header, arrays)`` defining an int8 program, for ``jq.save`` (JSON-able dict, numpy arrays)."""
    return to_record(program)


def program_from_record(header: dict, arrays: dict, fn_or_model: Any, example_args: Any, *,
                        params_argnums: int = 0) -> QuantizedProgram:
    """The int8 program saved as ``(header, arrays)``, rebuilt by re-capturing ``fn_or_model`` on
    ``example_args`` (the same function or model class, any param values of the right shapes, inputs of
    the shapes it was converted with); for ``jq.load``. Raises GraphQuantizationError naming the first op
    that differs from the saved program, or the array that does not fit."""
    fn, args, argnums, _, _ = _as_function(fn_or_model, example_args, params_argnums)
    graph = capture(fn, args, params_argnums=argnums)
    a = analyze(graph)
    a.retrace = _retracer(fn, args, argnums, graph)
    return from_record(a, header, arrays)


def compare(program: QuantizedProgram, float_params: Any, *inputs) -> list:
    """Per-op SQNR (dB) of the int8 program against the float program on the same inputs: one
    ``(path, sqnr)`` per quantized unit, in program order, plus ``("output", sqnr)``.

    ``float_params``: the float params the program was converted from."""
    def compute_sqnr(x, y):  # PyTorch's compute_sqnr (jaxquant.tools sits above the front ends)
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        signal, noise = np.linalg.norm(x), np.linalg.norm(x - y)
        return np.inf if noise == 0 else (-np.inf if signal == 0 else 20.0 * np.log10(signal / noise))

    float_vals, q_vals, outs = _record_units(program, float_params, inputs)
    rows = [(path, float(compute_sqnr(float_vals[path], q_vals[path]))) for path in q_vals]
    rows.append(("output", float(compute_sqnr(outs[0], outs[1]))))
    return rows
