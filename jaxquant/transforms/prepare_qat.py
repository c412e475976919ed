"""``prepare_qat``: swap float layers for QAT layers with fake quantization; ``quantize_qat``; and the
model-level switches of a QAT run (observers, fake quant, BatchNorm statistics, LSQ learning).

Every switch flips int32 flags stored in ``QuantStats`` variables, so a jitted training step is not
retraced. Each takes either a model (edited in place and returned, as PyTorch's
``model.apply(torch.ao.quantization.disable_observer)``) or a ``QuantStats`` state pytree from
``nnx.split`` (a new state is returned) for pure ``jax.jit`` loops.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxquant import fake_quant as fq
from jaxquant.module_paths import copy_model, named_modules, replace_contents
from jaxquant.nn import intrinsic
from jaxquant.nn import qat as nnqat
from jaxquant.nn.observed import Observed
from jaxquant.nn.qat.fake_quant_module import FakeQuantModule
from jaxquant.nn.variables import QuantStats
from jaxquant.quantization_mappings import (
    get_default_qat_module_mappings,
    get_default_static_quant_module_mappings,
    get_quantized_passthrough_types,
)
from jaxquant.transforms.checks import checked_qconfigs
from jaxquant.transforms.convert import convert
from jaxquant.transforms.swap import finish, observe_stub_or_functional, refuse_unmapped_layer, swap_modules

__all__ = [
    "get_default_qat_module_mappings", "prepare_qat", "quantize_qat", "enable_observer", "disable_observer",
    "enable_fake_quant", "disable_fake_quant", "freeze_bn_stats", "update_bn_stats", "enable_param_learning",
    "enable_static_estimate", "check_qat_state",
]


_BN_TYPES = (intrinsic.ConvBn, intrinsic.ConvBnReLU, intrinsic.LinearBn)


def _activation_fake_quant(qconfig: Any, path: str) -> FakeQuantModule:
    if qconfig.activation is None:
        raise ValueError(f"'{path}': its qconfig has no activation fake quant; QAT needs one "
                         "(e.g. get_default_qat_qconfig('x86'))")
    module = FakeQuantModule(qconfig.activation())
    if module.fake_quant.is_per_channel:
        raise ValueError(f"'{path}': activation fake quants must be per tensor, got {module.fake_quant!r}")
    return module


def prepare_qat(
    model: nnx.Module,
    qconfig_or_mapping: Any = None,
    inplace: bool = False,
    mapping: Optional[Mapping[type, type]] = None,
) -> nnx.Module:
    """Prepare a float model for quantization-aware training (``torch.ao.quantization.prepare_qat``).

    Layers with a QAT counterpart (``mapping``, default :func:`get_default_qat_module_mappings`:
    Linear, Conv and their fused ReLU/BatchNorm forms from ``fuse_modules_qat``) become QAT modules
    holding the same float Params, a weight fake quant and an output fake quant. ``QuantStub`` and
    modules that only have a static counterpart (standalone BatchNorm, LayerNorm, Hardswish...)
    are wrapped in ``Observed(module, FakeQuantModule(...), qconfig)``; ``FloatFunctional`` gets a
    fake quant in ``activation_post_process``; ``DeQuantStub`` becomes ``Observed(stub, None, qconfig)``.
    The result converts with :func:`jaxquant.transforms.convert`.

    Args:
      model: a float NNX model in training mode (``model.train()``), fused with ``fuse_modules_qat``.
      qconfig_or_mapping: a QAT ``QConfig`` (fake-quant factories, e.g. ``get_default_qat_qconfig('x86')``,
        or ``LearnableFakeQuantize`` ones for LSQ), a ``QConfigMapping``, or ``None`` (only ``qconfig``
        attributes set on modules).
      inplace: edit ``model`` itself instead of returning a prepared copy.
      mapping: float type -> QAT type, to extend or override the default.
    Returns:
      The QAT model. On error the input model is left unchanged.
    Raises:
      ValueError naming the module path: a fused Conv/Linear-BatchNorm whose BatchNorm is in eval
      mode (call ``model.train()`` first), a layer with parameters but no QAT or static counterpart,
      a qconfig whose entries are observers rather than fake quants.
    """
    qconfigs = checked_qconfigs(model, qconfig_or_mapping, "prepare_qat", "trained with fake quantization",
                                "QAT QConfig (e.g. get_default_qat_qconfig('x86'))")
    mapping = get_default_qat_module_mappings() if mapping is None else mapping
    static = get_default_static_quant_module_mappings()
    passthrough = get_quantized_passthrough_types()

    def swap(path: str, module: nnx.Module):
        qconfig = qconfigs.get(path)
        if qconfig is None:
            return None
        module_type = type(module)
        if path == "" and (module_type in mapping or module_type in static):
            raise ValueError("prepare_qat: the model itself is a single quantizable layer; wrap it, e.g. "
                             "QuantWrapper(model), so it has a parent and input/output stubs")
        stub = observe_stub_or_functional(path, module, qconfig, _activation_fake_quant)
        if stub is not None:
            return stub
        if module_type in mapping:
            if module_type in _BN_TYPES and bool(module.bn.use_running_average):
                raise ValueError(f"prepare_qat: '{path}.bn' is in eval mode (use_running_average=True); QAT of a "
                                 "fused Conv/Linear-BatchNorm trains with batch statistics: call model.train() "
                                 "before prepare_qat (freeze_bn_stats(model) later switches to running statistics)")
            return mapping[module_type].from_float(module, qconfig, path)
        if module_type in passthrough:
            return None
        if module_type in static:
            return Observed(module, _activation_fake_quant(qconfig, path), qconfig)
        refuse_unmapped_layer(path, module, "QAT or static", "or pass mapping={...} with your own QAT module")
        return None

    return finish(model, swap_modules(model, swap)[0], inplace)


def quantize_qat(
    model: nnx.Module,
    run_fn: Callable[..., Any],
    run_args: Sequence[Any] = (),
    qconfig_or_mapping: Any = None,
    inplace: bool = False,
) -> nnx.Module:
    """``model.train()`` -> :func:`prepare_qat` -> ``run_fn(qat_model, *run_args)`` (your training loop,
    editing the model it is given) -> ``convert``; returns the int8 model (``torch.ao.quantization.quantize_qat``)."""
    prepared = copy_model(model)
    prepared.train()
    prepared = prepare_qat(prepared, qconfig_or_mapping, inplace=False)
    run_fn(prepared, *run_args)
    prepared.eval()
    converted = convert(prepared, inplace=False)
    if inplace:
        replace_contents(model, converted)
        return model
    return converted


# ---------------------------------------------------------------------------------------------
# switches


def _on_model_or_state(target: Any, state_fn: Callable[[Any], Any]) -> Any:
    """Apply a pure switch from :mod:`jaxquant.fake_quant` to a model (edited in place: its
    ``QuantStats`` are replaced) or to a state pytree (returned new)."""
    if isinstance(target, nnx.Module):
        nnx.update(target, state_fn(nnx.state(target, QuantStats)))
        return target
    return state_fn(target)


def enable_observer(model_or_state: Any) -> Any:
    """Turn statistics collection on in every fake quant (``torch.ao.quantization.enable_observer``)."""
    return _on_model_or_state(model_or_state, fq.enable_observer)


def disable_observer(model_or_state: Any) -> Any:
    """Freeze every fake quant's qparams (``torch.ao.quantization.disable_observer``)."""
    return _on_model_or_state(model_or_state, fq.disable_observer)


def enable_fake_quant(model_or_state: Any) -> Any:
    """Turn fake quantization on everywhere (``torch.ao.quantization.enable_fake_quant``)."""
    return _on_model_or_state(model_or_state, fq.enable_fake_quant)


def disable_fake_quant(model_or_state: Any) -> Any:
    """Make every fake quant the identity (``torch.ao.quantization.disable_fake_quant``)."""
    return _on_model_or_state(model_or_state, fq.disable_fake_quant)


def _bn_flag(model_or_state: Any, value: int) -> Any:
    if isinstance(model_or_state, nnx.Module):
        for _, module in named_modules(model_or_state):
            if isinstance(module, (nnqat.ConvBn, nnqat.LinearBn)):
                module.freeze_bn.set_value(jnp.asarray(value, jnp.int32).reshape(()))
        return model_or_state
    # a split QuantStats state: the freeze_bn leaves are the int32 scalars stored under a "freeze_bn" key
    def fn(path, leaf):
        last = path[-1] if path else None
        key = getattr(last, "key", getattr(last, "name", None))
        if key == "value" and len(path) >= 2:
            key = getattr(path[-2], "key", getattr(path[-2], "name", None))
        return jnp.asarray(value, jnp.int32).reshape(()) if key == "freeze_bn" else leaf
    return jax.tree_util.tree_map_with_path(fn, model_or_state)


def freeze_bn_stats(model_or_state: Any) -> Any:
    """Fused Conv/Linear-BatchNorm QAT modules use (and stop updating) the running statistics
    (``torch.ao.nn.intrinsic.qat.freeze_bn_stats``)."""
    return _bn_flag(model_or_state, 1)


def update_bn_stats(model_or_state: Any) -> Any:
    """Back to batch statistics with running-statistic updates in training mode (``update_bn_stats``)."""
    return _bn_flag(model_or_state, 0)


def _with_flags(state: Any, **flags: int) -> Any:
    return dataclasses.replace(state, **{k: jnp.asarray(v, jnp.int32).reshape(()) for k, v in flags.items()})


def enable_param_learning(model: nnx.Module) -> nnx.Module:
    """LSQ: start learning every ``LearnableFakeQuantize``'s scale/zero point from its current estimate
    (observer off, gradients on; PyTorch's ``enable_param_learning``). Edits ``model`` in place."""
    for _, module in named_modules(model):
        if isinstance(module, FakeQuantModule) and module.learnable:
            state = module.stats.get_value()
            module.scale.set_value(jnp.asarray(state.scale, jnp.float32))
            module.zero_point.set_value(jnp.asarray(state.zero_point, jnp.float32))
            module.stats.set_value(_with_flags(state, static_enabled=0, learning_enabled=1, fake_quant_enabled=1))
    return model


def enable_static_estimate(model: nnx.Module) -> nnx.Module:
    """LSQ: observers set the scales again, no learning (PyTorch's ``enable_static_estimate``)."""
    for _, module in named_modules(model):
        if isinstance(module, FakeQuantModule) and module.learnable:
            module.stats.set_value(_with_flags(module.stats.get_value(), static_enabled=1, learning_enabled=0,
                                               fake_quant_enabled=1))
    return model


_FLOAT32_EPS = float(np.finfo(np.float32).eps)


def check_qat_state(model: nnx.Module) -> None:
    """Raise ValueError naming the first module (dotted path) whose Params, BatchNorm statistics or
    fake-quant state hold NaN/Inf, or whose learnable (LSQ) scale collapsed to <= eps; return ``None``
    when everything is healthy. Host-side (not jittable).

    Call it when the loss goes NaN: a divergent fake-quant scale and a NaN weight look the same there.
    """
    for path, module in named_modules(model):
        where = path or "<root>"
        if isinstance(module, FakeQuantModule):
            bad = module.nonfinite_fields()
            if bad:
                raise ValueError(f"'{where}': fake-quant state is not finite ({', '.join(bad)}); lower the learning "
                                 "rate, clip gradients, or check the data for NaN/Inf")
            if module.learnable:
                # LSQ clamps the learned scale to eps in the forward, so a scale driven to <= 0 gives no NaN:
                # everything it quantizes silently rounds to the range limits.
                scale = np.asarray(module.scale.get_value())
                collapsed = int(np.sum(scale <= _FLOAT32_EPS))
                if collapsed:
                    raise ValueError(
                        f"'{where}': learnable fake-quant scale collapsed to <= eps ({collapsed} of {scale.size} "
                        f"values, min {float(scale.min()):.3g}); lower the learning rate of the scale Params, or "
                        "call enable_static_estimate(model) to re-estimate them from observers")
            continue
        for var_type, what in ((nnx.Param, "parameter"), (nnx.BatchStat, "BatchNorm statistic")):
            for key, leaf in nnx.state(module, var_type).flat_state():
                if len(key) != 1:
                    continue  # owned by a child module; it is checked at its own path
                arr = np.asarray(leaf.get_value() if hasattr(leaf, "get_value") else leaf)
                if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
                    raise ValueError(f"'{where}': {what} '{key[0]}' contains NaN/Inf "
                                     f"({int(np.sum(~np.isfinite(arr)))} of {arr.size} values)")
