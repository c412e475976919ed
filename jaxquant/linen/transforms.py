"""The workflows for Linen models: ``prepare`` / ``calibrate`` / ``convert`` (static PTQ),
``prepare_qat`` (QAT, then ``convert``), ``quantize_dynamic``; fusion is in :mod:`jaxquant.linen.fusion`.

Each function takes a Linen module (or a :class:`QuantizedModel`) and explicit variables and returns a
new ``QuantizedModel`` and/or new variables; nothing is edited in place. ``convert`` and
``quantize_dynamic`` run the model once on example inputs (as ``Module.init`` does), because a Linen
layer's shapes and attributes are only known inside a call.
"""
from __future__ import annotations

import warnings
from typing import Any, Iterable, Mapping, Optional, Union

import flax.linen as nn
import jax
import numpy as np
from flax.core import unfreeze

from jaxquant.core.qparams import calculate_qparams
from jaxquant.dtypes import qint8, quint8
from jaxquant.fake_quant.fake_quantize import FixedQParamsFakeQuantize
from jaxquant.linen.interceptor import Record
from jaxquant.linen.model import QuantizedModel
from jaxquant.linen.names import QUANT_CACHE, QUANT_PARAMS, QUANT_STATS, display_path
from jaxquant.linen.qconfig_mappings import get_default_qat_qconfig_mapping, get_default_qconfig_mapping
from jaxquant.linen.quant_state import activation_qparams, finish_qparams, quantize_gate_group
from jaxquant.observers.base import check_observer_state
from jaxquant.qconfig import QConfig, default_dynamic_qconfig_for
from jaxquant.qconfig_mapping import QConfigMapping, as_qconfig_mapping

__all__ = ["prepare", "prepare_qat", "calibrate", "convert", "quantize_dynamic", "as_quantized_model"]


def as_quantized_model(model: Union[nn.Module, QuantizedModel]) -> QuantizedModel:
    if isinstance(model, QuantizedModel):
        return model
    if not isinstance(model, nn.Module):
        raise TypeError(f"jaxquant.linen expects a flax.linen Module (or a QuantizedModel), got {type(model).__name__}; "
                        "for NNX models use jaxquant.prepare / convert")
    return QuantizedModel(model)


def prepare(model: Union[nn.Module, QuantizedModel], qconfig_or_mapping: Any = None) -> QuantizedModel:
    """Static PTQ, step 1: a model whose supported layers observe their input and output.

    ``qconfig_or_mapping``: a QConfig (global) or QConfigMapping keyed by dotted Linen paths / Linen
    types (None: :func:`jaxquant.linen.get_default_qconfig_mapping`). Observer state is created in
    ``quant_stats`` on the first ``apply(..., mutable=['quant_stats'])`` (see :func:`calibrate`).
    """
    qm = as_quantized_model(model)
    mapping = get_default_qconfig_mapping() if qconfig_or_mapping is None else as_qconfig_mapping(qconfig_or_mapping)
    return qm.replace(mode="observe", qconfig_mapping=mapping)


def prepare_qat(model: Union[nn.Module, QuantizedModel], qconfig_or_mapping: Any = None) -> QuantizedModel:
    """QAT: a model whose supported layers fake-quantize input, weight and output (state in
    ``quant_stats``; the float ``params`` are what the optimizer trains). Default mapping:
    :func:`jaxquant.linen.get_default_qat_qconfig_mapping`."""
    qm = as_quantized_model(model)
    mapping = get_default_qat_qconfig_mapping() if qconfig_or_mapping is None else as_qconfig_mapping(qconfig_or_mapping)
    return qm.replace(mode="qat", qconfig_mapping=mapping)


def _args(batch: Any) -> tuple:
    return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


def calibrate(model: QuantizedModel, variables: Any, batches: Iterable[Any], *, jit: bool = True,
              **apply_kwargs: Any) -> dict:
    """Run ``model`` (from :func:`prepare`) over ``batches`` and return ``variables`` with updated
    ``quant_stats``. A batch is one input array or a tuple of positional inputs; ``apply_kwargs`` go to
    every ``apply`` (e.g. ``train=False``). The step is one ``jax.jit``-compiled function."""
    if not isinstance(model, QuantizedModel) or model.mode not in ("observe", "qat"):
        raise TypeError("calibrate expects the QuantizedModel returned by jaxquant.linen.prepare (or prepare_qat)")

    def step(v, *args):
        _, updates = model.apply(v, *args, mutable=[QUANT_STATS], **apply_kwargs)
        return {**v, QUANT_STATS: updates[QUANT_STATS]}

    step = jax.jit(step) if jit else step
    variables = dict(unfreeze(variables))
    n = 0
    for batch in batches:
        variables = step(variables, *_args(batch))
        n += 1
    if n == 0:
        raise ValueError("calibrate: got no batches; pass an iterable of input arrays")
    return variables


def _subtree(tree: Mapping, scope: tuple) -> Any:
    for key in scope:
        tree = tree[key]
    return tree


def _dotted(scope: tuple) -> str:
    return display_path(".".join(str(s) for s in scope))


def _check_records(record: Record, variables: Mapping) -> None:
    stats = variables.get(QUANT_STATS, {})
    for kind, scope, name, config in record.checks:
        where = f"'{_dotted(scope)}' ({name})"
        if kind == "weight":
            arr = np.asarray(_subtree(variables["params"], scope)[name])
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"{where}: the weight contains NaN or Inf; fix the float model before quantizing")
            continue
        state = _subtree(stats, scope)[name]
        if kind == "observer":
            check_observer_state(config, state, name=where)
        elif kind == "fake_quant" and not isinstance(config, FixedQParamsFakeQuantize) and hasattr(state, "observer"):
            check_observer_state(config.activation_post_process, state.observer, name=where)


def _check_scales(quant_params: Mapping, prefix: tuple = ()) -> None:
    for key, value in quant_params.items():
        if isinstance(value, Mapping):
            _check_scales(value, prefix + (key,))
        elif key.endswith("scale"):
            arr = np.asarray(value)
            if not np.all(np.isfinite(arr)) or not np.all(arr > 0):
                raise ValueError(f"'{_dotted(prefix)}': {key} is not finite and positive ({arr}); the calibration "
                                 "(or QAT run) produced unusable statistics for this layer")


def _check_mapping_paths(mapping: Any, seen: Mapping[str, type], what: str) -> None:
    if mapping is None:
        return
    names = list(getattr(mapping, "module_name_qconfigs", {}))
    names += [name for (name, _, _) in getattr(mapping, "module_name_object_type_order_qconfigs", {})]
    for name in names:
        if name not in seen and not any(p.startswith(name + ".") for p in seen):
            near = sorted(p for p in seen if p and (p.startswith(name.split(".")[0]) or name.startswith(p)))[:8]
            raise KeyError(f"{what}: the qconfig mapping names module path '{name}', which this Linen model never "
                           f"called; paths it has: {near or sorted(p for p in seen if p)[:12]}")


def _drop_converted(params: Mapping, converted: Mapping[tuple, tuple]) -> dict:
    params = jax.tree_util.tree_map(lambda x: x, dict(unfreeze(params)))  # fresh nested dicts

    def drop(tree: dict, scope: tuple, names: tuple) -> None:
        if not scope:
            for n in names:
                tree.pop(n, None)
            return
        child = tree.get(scope[0])
        if isinstance(child, Mapping):
            child = dict(child)
            tree[scope[0]] = child
            drop(child, scope[1:], names)
            if not child:
                del tree[scope[0]]

    for scope, names in converted.items():
        drop(params, scope, names)
    return params


def _run_convert(model: QuantizedModel, mode: str, variables: Any, args: tuple, kwargs: dict) -> tuple[dict, Record]:
    record = Record()
    conv_model = model.replace(mode=mode)
    rngs = kwargs.pop("rngs", None)
    variables = dict(unfreeze(variables))
    inputs = {k: v for k, v in variables.items() if k != QUANT_PARAMS}

    def run(inputs, rngs, *args):
        with nn.intercept_methods(conv_model.interceptor(record)):
            return model.module.apply(inputs, *args, rngs=rngs, mutable=[QUANT_PARAMS], **kwargs)[1]

    # One compiled pass (a fresh function, so it is always traced and ``record`` filled): the pass is
    # traceable, and checks that need values run afterwards on the variable trees.
    updates = jax.jit(run)(inputs, rngs, *args)
    return dict(unfreeze(updates)).get(QUANT_PARAMS, {}), record


def _recompute_qparams(record: Record, variables: Mapping, quant_params: dict) -> dict:
    """The quant_params again, computed outside the traced pass the way NNX's ``convert`` computes
    them (observer qparams by the same standalone compiled ``calculate_qparams``, fake-quant qparams and
    weights op by op): fused into one big program XLA may round the float32 arithmetic of
    ``calculate_qparams`` differently and move a scale by an ulp. Layers stacked by ``nn.scan`` /
    ``nn.vmap`` are recomputed with ``jax.vmap`` over their leading axes."""
    quant_params = jax.tree_util.tree_map(lambda x: x, quant_params)  # fresh dicts
    stats, params = variables.get(QUANT_STATS, {}), variables.get("params", {})
    for entry in record.qparams:
        kind, scope = entry[0], entry[1]
        target = _subtree(quant_params, scope)
        if kind == "act":
            _, _, stats_name, config, prefix = entry
            n_lead = np.ndim(target[f"{prefix}_scale"])
            if stats_name.endswith("_observer"):
                fn = lambda state, config=config: finish_qparams(*calculate_qparams(config, state))  # noqa: E731
            else:
                fn = lambda state, config=config: activation_qparams(config, state)  # noqa: E731
            for _ in range(n_lead):
                fn = jax.vmap(fn)
            target[f"{prefix}_scale"], target[f"{prefix}_zero_point"] = fn(_subtree(stats, scope)[stats_name])
        elif kind == "weight_group":  # one gate of a recurrent cell, quantized with its whole group
            _, _, cell_scope, group, observer = entry
            index = group.index(scope[-1])
            cell_params = _subtree(params, cell_scope)
            fn = lambda *kernels, observer=observer, index=index: quantize_gate_group(list(kernels), observer)[index]  # noqa: E731,E501
            for _ in range(np.ndim(target["weight_scale"]) - 1):
                fn = jax.vmap(fn)
            target.update(fn(*[cell_params[n]["kernel"] for n in group]))
        else:
            _, _, kernel_name, quantize = entry
            n_lead = np.ndim(target["weight_scale"]) - 1
            scope_stats = _subtree(stats, scope) if stats and scope_in(stats, scope) else {}
            fq_state = scope_stats.get("weight_fake_quant") if isinstance(scope_stats, Mapping) else None
            fn = quantize
            for _ in range(n_lead):
                fn = jax.vmap(fn)
            target.update(fn(_subtree(params, scope)[kernel_name], fq_state))
    return quant_params


def scope_in(tree: Mapping, scope: tuple) -> bool:
    for key in scope:
        if not isinstance(tree, Mapping) or key not in tree:
            return False
        tree = tree[key]
    return True


def _native_cache(record: Record, quant_params: Mapping) -> dict:
    """``quant_cache``: each converted layer's weight in the native backend's layouts, packed once from
    the concrete int8 weight (Linen's ``apply`` packs inside the trace, where the native kernels cannot);
    empty when the backend is off or unavailable."""
    cache: dict = {}
    for scope, pack in record.native:
        blobs = pack(_subtree(quant_params, scope))
        if blobs:
            node = cache
            for key in scope:
                node = node.setdefault(key, {})
            node.update(blobs)
    return cache


def _converted_variables(variables: Any, quant_params: dict, record: Record) -> dict:
    variables = dict(unfreeze(variables))
    out = {k: v for k, v in variables.items() if k not in (QUANT_STATS, QUANT_PARAMS, QUANT_CACHE, "params")}
    params = _drop_converted(variables.get("params", {}), record.converted)
    if params:
        out["params"] = params
    out[QUANT_PARAMS] = quant_params
    cache = _native_cache(record, quant_params)
    if cache:
        out[QUANT_CACHE] = cache
    return out


def convert(model: QuantizedModel, variables: Any, *example_args: Any, **example_kwargs: Any
            ) -> tuple[QuantizedModel, dict]:
    """Static PTQ / QAT, last step: int8 weights and static activation qparams.

    Args:
      model: from :func:`prepare` (calibrated) or :func:`prepare_qat` (trained).
      variables: its variables, with ``params`` and ``quant_stats``.
      example_args, example_kwargs: inputs for one forward pass (any batch; only shapes matter) so that
        each layer can be reached with its attributes; ``rngs=`` is passed on to ``apply``.
    Returns:
      ``(converted_model, converted_variables)``: the variables hold ``quant_params`` (int8 weights,
      float32 scales, int32 zero points, float32 biases) and no float weights of converted layers
      (``params`` keeps only unconverted layers, e.g. LayerNorm); ``quant_stats`` is dropped. Apply
      with ``jax.jit(converted_model.apply)(converted_variables, x)``.
    Raises:
      ValueError naming the layer's path when an observer never saw data or saw NaN/Inf, a weight is
      not finite, or a layer cannot run in int8 (with the fix); KeyError for a mapping path the model
      does not have.
    """
    if not isinstance(model, QuantizedModel) or model.mode not in ("observe", "qat"):
        raise TypeError("convert expects the QuantizedModel returned by jaxquant.linen.prepare or prepare_qat "
                        f"(got {type(model).__name__}{'' if not isinstance(model, QuantizedModel) else ' in mode ' + repr(model.mode)})")
    if QUANT_STATS not in variables:
        raise ValueError("convert: the variables have no 'quant_stats'; calibrate the prepared model first "
                         "(jaxquant.linen.calibrate) or run it with apply(..., mutable=['quant_stats'])")
    quant_params, record = _run_convert(model, "convert_static", variables, example_args, dict(example_kwargs))
    _check_mapping_paths(model.qconfig_mapping, record.modules, "convert")
    _check_records(record, variables)
    quant_params = _recompute_qparams(record, variables, quant_params)
    _check_scales(quant_params)
    return model.replace(mode="static"), _converted_variables(variables, quant_params, record)


def pack_native(model: QuantizedModel, variables: Any, *example_args: Any, **example_kwargs: Any) -> dict:
    """The converted variables with ``quant_cache`` rebuilt: each static ``nn.Conv`` (symmetric weights)
    and ``nn.Dense`` weight packed once for the native backend, as :func:`convert` does. The cache is
    derived data; save the variables without it and call this after loading them.

    Args:
      model: the static model :func:`convert` returned; variables: its variables (any ``quant_cache``
        in them is replaced).
      example_args, example_kwargs: inputs for one abstract forward pass (``jax.eval_shape``: nothing is
        compiled or run), to read each layer's geometry.
    Returns:
      the variables with ``quant_cache`` (without it when the native backend is off or unavailable).
    """
    if not isinstance(model, QuantizedModel) or model.mode != "static":
        got = type(model).__name__ + (f" in mode {model.mode!r}" if isinstance(model, QuantizedModel) else "")
        raise TypeError(f"pack_native expects the static QuantizedModel returned by jaxquant.linen.convert (got {got})")
    variables = {k: v for k, v in dict(unfreeze(variables)).items() if k != QUANT_CACHE}
    if QUANT_PARAMS not in variables:
        raise ValueError(f"pack_native: the variables have no '{QUANT_PARAMS}'; pass the variables convert returned")
    record = Record()

    def run(v, *args):
        with nn.intercept_methods(model.interceptor(record)):
            return model.module.apply(v, *args, **example_kwargs)

    jax.eval_shape(run, variables, *example_args)
    cache = _native_cache(record, variables[QUANT_PARAMS])
    return {**variables, QUANT_CACHE: cache} if cache else variables


def _dynamic_mapping(qconfig_spec: Any, dtype: Any):
    if qconfig_spec is None:
        qconfig = default_dynamic_qconfig_for(dtype)
        if dtype == qint8:
            types = (nn.Dense, nn.DenseGeneral, nn.LSTMCell, nn.GRUCell)
        elif dtype == quint8:
            types = (nn.Embed,)
        else:
            raise ValueError(f"quantize_dynamic: jaxquant.linen supports dtype qint8 (Dense, DenseGeneral, LSTMCell, "
                             f"GRUCell) or quint8 (Embed), got {dtype!r}")
        qconfig_spec = {t: qconfig for t in types}
    elif isinstance(qconfig_spec, (set, frozenset, list, tuple)):
        qconfig = default_dynamic_qconfig_for(dtype)
        qconfig_spec = {k: qconfig for k in qconfig_spec}
    elif not isinstance(qconfig_spec, Mapping):
        raise TypeError(f"quantize_dynamic: qconfig_spec must be None, a set of Linen module types, or a dict from "
                        f"type / dotted path to QConfig; got {type(qconfig_spec).__name__}")
    mapping = QConfigMapping()
    for key, value in qconfig_spec.items():
        if value is not None and not isinstance(value, QConfig):
            raise TypeError(f"quantize_dynamic: qconfig_spec[{key!r}] must be a QConfig or None, got "
                            f"{type(value).__name__}")
        if isinstance(key, type):
            if not issubclass(key, nn.Module):
                raise TypeError(f"quantize_dynamic: qconfig_spec key {key.__qualname__} is not a flax.linen Module "
                                "type (NNX types belong to jaxquant.quantize_dynamic)")
            mapping.set_object_type(key, value)
        elif isinstance(key, str):
            mapping.set_module_name(key, value)
        else:
            raise TypeError(f"quantize_dynamic: qconfig_spec key {key!r} is neither a Linen module type nor a "
                            "dotted module path")
    return mapping


def quantize_dynamic(model: Union[nn.Module, QuantizedModel], variables: Any, *example_args: Any,
                     qconfig_spec: Any = None, dtype: Any = qint8, per_token: Optional[bool] = None,
                     reduce_range: bool = True, **example_kwargs: Any) -> tuple[QuantizedModel, dict]:
    """Dynamic quantization (PyTorch's ``quantize_dynamic``): int8 weights fixed now, activations
    quantized per call from their own min/max; float32 in and out.

    Args:
      model: a Linen module (float variables in ``variables['params']``).
      example_args, example_kwargs: inputs for one forward pass (shapes only matter).
      qconfig_spec: None (qint8: ``nn.Dense``, ``nn.DenseGeneral``, ``nn.LSTMCell``, ``nn.GRUCell``;
        quint8: ``nn.Embed``), a set of Linen types, or a dict from type / dotted path to QConfig or None.
      dtype: ``qint8`` or ``quint8`` (weight-only embeddings).
      per_token: one activation scale per row (None: from the qconfig; per tensor as PyTorch).
      reduce_range: 7-bit activations as PyTorch's x86 engine (default).
    Returns:
      ``(dynamic_model, variables)`` with ``quant_params`` and without the converted float weights.
    """
    qm = as_quantized_model(model).replace(mode="dynamic", qconfig_mapping=_dynamic_mapping(qconfig_spec, dtype),
                                          per_token=per_token, reduce_range=reduce_range)
    quant_params, record = _run_convert(qm, "convert_dynamic", variables, example_args, dict(example_kwargs))
    _check_mapping_paths(qm.qconfig_mapping, record.modules, "quantize_dynamic")
    _check_records(record, variables)
    quant_params = _recompute_qparams(record, variables, quant_params)
    if not record.converted:
        found = sorted({t.__name__ for t in record.modules.values()})
        warnings.warn(f"quantize_dynamic: no layer was quantized (dtype {dtype!r}); the model called {found}",
                      UserWarning, stacklevel=2)
    return qm, _converted_variables(variables, quant_params, record)
