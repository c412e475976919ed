"""``prepare``: attach observers where the qconfig says, returning a new (observed) model."""
from __future__ import annotations

from typing import Any, Mapping, Optional

from flax import nnx

from jaxquant.nn.observed import Observed
from jaxquant.nn.observer_module import ObserverModule
from jaxquant.quantization_mappings import (
    get_default_static_quant_module_mappings,
    get_quantized_passthrough_types,
)
from jaxquant.transforms.checks import checked_qconfigs
from jaxquant.transforms.swap import finish, observe_stub_or_functional, refuse_unmapped_layer, swap_modules


def _activation_observer(qconfig: Any, path: str) -> ObserverModule:
    if qconfig.activation is None:
        raise ValueError(f"'{path}': its qconfig has no activation observer; static quantization needs one")
    observer = qconfig.activation()
    if getattr(observer, "qscheme", None) is not None and observer.qscheme.is_per_channel:
        raise ValueError(f"'{path}': activation observers must be per tensor, got {observer!r}")
    return ObserverModule(observer)


def prepare(
    model: nnx.Module,
    qconfig_or_mapping: Any = None,
    inplace: bool = False,
    mapping: Optional[Mapping[type, type]] = None,
) -> nnx.Module:
    """Insert observers for static post-training quantization (``torch.ao.quantization.prepare``).

    Every module whose type has a static quantized counterpart (``mapping``; by default
    ``get_default_static_quant_module_mappings()``) and a qconfig is wrapped in an
    :class:`~jaxquant.nn.observed.Observed` whose observer watches its output; each
    ``FloatFunctional`` gets an output observer. Observer state lives in ``QuantStats`` variables,
    so ``nnx.split(model, nnx.Param, QuantStats, ...)`` separates it for a ``jax.jit`` loop.

    Args:
      model: a float NNX model, usually fused (``fuse_modules``) and in eval mode.
      qconfig_or_mapping: a ``QConfig`` applied globally, a ``QConfigMapping``, or ``None`` to use
        only ``qconfig`` attributes set on modules. ``qconfig=None`` on a subtree keeps it float.
      inplace: change ``model`` itself instead of returning a changed copy.
      mapping: float type -> quantized type, to extend or override the default.
    Returns:
      The observed model. On error the input model is left unchanged.
    Raises:
      ValueError naming the module path: a layer with parameters and a qconfig but no quantized
      counterpart, a qconfig without an activation observer, a model that was prepared already.
      TypeError for a Flax Linen module (use ``jaxquant.linen.prepare``). KeyError for a
      ``set_module_name`` path that is not in the model.
    """
    qconfigs = checked_qconfigs(model, qconfig_or_mapping, "prepare", "quantized",
                                "QConfig (e.g. get_default_qconfig('x86'))")
    mapping = get_default_static_quant_module_mappings() if mapping is None else mapping
    passthrough = get_quantized_passthrough_types()

    def swap(path: str, module: nnx.Module):
        qconfig = qconfigs.get(path)
        if qconfig is None:
            return None
        module_type = type(module)
        stub = observe_stub_or_functional(path, module, qconfig, _activation_observer)
        if stub is not None:
            return stub
        if module_type in passthrough:
            return None
        if module_type in mapping:
            observed = Observed(module, _activation_observer(qconfig, path), qconfig)
            if path == "":
                raise ValueError("prepare: the model itself is a single quantizable layer; wrap it, e.g. "
                                 "QuantWrapper(model), so it has a parent and input/output stubs")
            return observed
        refuse_unmapped_layer(path, module, "static", "use quantize_dynamic for it, or pass mapping={...} with "
                              "your own quantized module")
        return None

    return finish(model, swap_modules(model, swap)[0], inplace)
