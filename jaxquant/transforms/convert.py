"""``convert``: swap observed modules for quantized ones; ``quantize``: prepare, calibrate, convert."""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

from flax import nnx

from jaxquant.nn.functional_modules import FloatFunctional
from jaxquant.nn.observed import Observed
from jaxquant.nn.qat.base import QATWeightLayer
from jaxquant.quantization_mappings import get_default_static_quant_module_mappings
from jaxquant.transforms.checks import check_nnx_model
from jaxquant.transforms.prepare import prepare
from jaxquant.transforms.swap import finish, swap_modules


def convert(
    model: nnx.Module,
    mapping: Optional[Mapping[type, type]] = None,
    inplace: bool = False,
) -> nnx.Module:
    """Replace every observed module with its quantized version (``torch.ao.quantization.convert``).

    Weights are quantized with the qconfig's weight observer (int8, per tensor or per channel) and
    stored as int8 with their scales; activation scales and zero points come from the calibrated
    observers and are static from then on. Activations flow between quantized modules as uint8/int8
    ``QTensor``s.

    Args:
      model: an observed model (from ``prepare`` and ``calibrate``, or a trained QAT model).
      mapping: float type -> quantized type (defaults to ``get_default_static_quant_module_mappings()``).
      inplace: change ``model`` itself instead of returning a converted copy.
    Returns:
      The int8 model. If any module fails (an observer that saw no data or saw NaN/Inf, an unsupported
      configuration), a ValueError names its path and the input model is left unchanged.
    """
    check_nnx_model(model, "convert")
    mapping = get_default_static_quant_module_mappings() if mapping is None else mapping
    converted = 0

    def swap(path: str, module: nnx.Module):
        nonlocal converted
        source = _source_type(module)
        if source is None:
            return None
        target = mapping.get(source)
        if target is None:
            if source is nnx.Dropout:
                return None
            raise ValueError(f"convert: '{path}': no quantized module is mapped for {source.__qualname__}")
        try:
            new = target.from_observed(module, path)
        except (ValueError, TypeError) as error:
            if f"'{path}'" in str(error):
                raise
            # Kernel-level errors don't know where they are: say which layer failed.
            raise type(error)(f"convert: '{path}': {error}") from error
        # Dropout is swapped wherever it is (nnq.Dropout), but is not a conversion by itself
        converted += source is not nnx.Dropout
        return new

    result, _ = swap_modules(model, swap)
    if converted == 0:
        raise ValueError("convert: the model has no observed or QAT modules, so there is nothing to convert; "
                         "call prepare(model, qconfig) (or prepare_qat) and calibrate/train it first")
    return finish(model, result, inplace)


def _source_type(module: nnx.Module) -> Optional[type]:
    """The mapping key convert swaps ``module`` by, or None to leave it as it is: an ``Observed`` by the
    float module it wraps; a module that carries its own output observer or fake quant (QAT layers, a
    prepared ``FloatFunctional``) or a Dropout by its own type; plain float modules are left."""
    if isinstance(module, Observed):
        return type(module.module)
    if type(module) is nnx.Dropout:
        return nnx.Dropout
    if isinstance(module, FloatFunctional):
        return FloatFunctional if module.activation_post_process is not None else None
    return type(module) if isinstance(module, QATWeightLayer) else None


def quantize(
    model: nnx.Module,
    run_fn: Callable[..., Any],
    run_args: Sequence[Any] = (),
    qconfig_or_mapping: Any = None,
    mapping: Optional[Mapping[type, type]] = None,
    inplace: bool = False,
) -> nnx.Module:
    """``prepare`` -> ``run_fn(prepared, *run_args)`` (calibration) -> ``convert``, as PyTorch's
    ``torch.ao.quantization.quantize``. Returns the int8 model."""
    prepared = prepare(model, qconfig_or_mapping, inplace=False, mapping=mapping)
    run_fn(prepared, *run_args)
    return finish(model, convert(prepared, mapping=mapping, inplace=False), inplace)
