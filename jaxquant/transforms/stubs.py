"""``add_quant_dequant``: put a QuantStub/DeQuantStub pair around every leaf layer that will be quantized."""
from __future__ import annotations

from typing import Any

from flax import nnx

from jaxquant.module_paths import copy_model, named_modules, replace_contents, set_submodule
from jaxquant.nn.stubs import QuantWrapper
from jaxquant.transforms.propagate import propagate_qconfig
from jaxquant.transforms.swap import is_leaf


def add_quant_dequant(model: nnx.Module, qconfig_or_mapping: Any = None, inplace: bool = False) -> nnx.Module:
    """Wrap every leaf module that has a qconfig in a :class:`~jaxquant.nn.stubs.QuantWrapper`
    (``torch.ao.quantization.add_quant_dequant``).

    Each such module then quantizes its own float input and dequantizes its own output, so a float
    model with no stubs at all can be prepared and converted layer by layer (at the cost of a
    quantize/dequantize pair around every layer). Which modules have a qconfig is decided by
    :func:`~jaxquant.transforms.propagate.propagate_qconfig` (PyTorch's rules; ``qconfig``
    attributes set on modules count even when ``qconfig_or_mapping`` is ``None``). The qconfig found
    for a module is set on its wrapper, so the later ``prepare`` gives the module, its ``QuantStub``
    and its ``DeQuantStub`` that same qconfig whatever its new path ``"<path>.module"`` would match.

    Args:
      model: a float NNX model.
      qconfig_or_mapping: a ``QConfig`` (global), a ``QConfigMapping``, or ``None`` (only ``qconfig``
        attributes on modules).
      inplace: change ``model`` itself instead of returning a changed copy.
    Returns:
      The model with wrapped leaves; if ``model`` itself is a leaf with a qconfig, a new
      ``QuantWrapper`` around (a copy of) it, as PyTorch returns.
    """
    result = copy_model(model)
    qconfigs = propagate_qconfig(result, qconfig_or_mapping)
    targets = [(path, module) for path, module in named_modules(result)
               if qconfigs.get(path) is not None and is_leaf(module)]
    for path, module in targets:
        wrapper = QuantWrapper(module)
        # An attribute on the wrapper is the most specific qconfig: it covers the wrapper, both stubs
        # and the wrapped module (now at "<path>.module").
        wrapper.qconfig = qconfigs[path]
        wrapper.quant.qconfig = qconfigs[path]
        wrapper.dequant.qconfig = qconfigs[path]
        if path == "":
            if inplace:
                raise ValueError("add_quant_dequant(inplace=True): the model itself is a leaf module and "
                                 "cannot be wrapped in place; use the returned QuantWrapper (inplace=False)")
            return wrapper
        set_submodule(result, path, wrapper)
    if inplace:
        replace_contents(model, result)
        return model
    return result
