"""``convert``: swap observed modules for quantized ones; ``quantize``: prepare, calibrate, convert."""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

from flax import nnx

from jaxquant.module_paths import copy_model, named_modules, replace_contents, set_submodule
from jaxquant.nn.functional_modules import FloatFunctional
from jaxquant.nn.observed import Observed
from jaxquant.nn.quantized.dropout import Dropout as QDropout
from jaxquant.nn.quantized.functional import QFunctional
from jaxquant.quantization_mappings import get_default_static_quant_module_mappings


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
    from jaxquant.transforms.checks import check_nnx_model

    check_nnx_model(model, "convert")
    mapping = get_default_static_quant_module_mappings() if mapping is None else mapping
    result = copy_model(model)
    converted = 0
    for path, module in named_modules(result):
        try:
            if isinstance(module, Observed):
                float_type = type(module.module)
                quantized_type = mapping.get(float_type)
                if quantized_type is None:
                    raise ValueError(f"no quantized module is mapped for {float_type.__qualname__}")
                set_submodule(result, path, quantized_type.from_observed(module, path))
            elif isinstance(module, FloatFunctional) and module.activation_post_process is not None:
                set_submodule(result, path, QFunctional.from_float_functional(module, path))
            elif hasattr(module, "to_quantized"):
                # QAT modules know how to become their int8 version.
                set_submodule(result, path, module.to_quantized(path))
            elif type(module) is nnx.Dropout:
                # identity on QTensors in training mode too (nnq.Dropout); not a conversion by itself
                set_submodule(result, path, QDropout.from_float(module))
                continue
            else:
                continue
        except (ValueError, TypeError) as error:
            if f"'{path}'" in str(error):
                raise
            # Kernel-level errors don't know where they are: say which layer failed.
            raise type(error)(f"convert: '{path}': {error}") from error
        converted += 1
    if converted == 0:
        raise ValueError("convert: the model has no observed or QAT modules, so there is nothing to convert; "
                         "call prepare(model, qconfig) (or prepare_qat) and calibrate/train it first")
    if inplace:
        replace_contents(model, result)
        return model
    return result


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
    from jaxquant.transforms.prepare import prepare

    prepared = prepare(model, qconfig_or_mapping, inplace=False, mapping=mapping)
    run_fn(prepared, *run_args)
    converted = convert(prepared, mapping=mapping, inplace=False)
    if inplace:
        replace_contents(model, converted)
        return model
    return converted
