"""``quantize_dynamic``: swap Linear / LSTM / GRU cells / Embed for modules with quantized weights
whose activations are quantized on every call (``torch.ao.quantization.quantize_dynamic``).

No calibration: weights are quantized once here with the qconfig's weight observer; each call
picks the activation's scale and zero point from its own min/max. The result takes and returns
float32 everywhere, so it drops into any float model, including ``nnx.RNN`` loops.
"""
from __future__ import annotations

import warnings
from collections import Counter
from typing import Any, Mapping, Optional, Union

from flax import nnx

from jaxquant.core.weights import weight_dtype
from jaxquant.dtypes import FloatDType, QDType, qint8
from jaxquant.fake_quant.fake_quantize import Identity
from jaxquant.module_paths import named_modules
from jaxquant.nn.dynamic.rnn import whole_sequence_rnns
from jaxquant.qconfig_mapping import dynamic_qconfig_mapping
from jaxquant.quantization_mappings import (
    DYNAMIC_DEFAULT_TYPES,
    get_default_dynamic_quant_module_mappings,
    get_dynamic_weight_dtypes,
)
from jaxquant.transforms.checks import check_nnx_model
from jaxquant.transforms.propagate import propagate_qconfig
from jaxquant.transforms.swap import finish, swap_modules
from jaxquant.weight_only.api import WeightOnlyConfig, quantize_weight_only

QConfigSpec = Union[None, set, frozenset, Mapping[Any, Any]]

__all__ = ["quantize_dynamic", "get_default_dynamic_quant_module_mappings", "DYNAMIC_DEFAULT_TYPES"]


def _normalise_spec(model: nnx.Module, qconfig_spec: QConfigSpec, dtype: Any):
    """``qconfig_spec`` as a QConfigMapping (global None), validating every entry."""
    paths = {p for p, _ in named_modules(model)}

    def check_path(key: str) -> None:
        if key not in paths:
            near = sorted(p for p in paths if p and (p.startswith(key) or key.startswith(p)))[:8]
            raise KeyError(f"quantize_dynamic: qconfig_spec names module path '{key}', which is not in the "
                           f"model; nearby paths: {near or sorted(paths)[:8]}")

    return dynamic_qconfig_mapping(qconfig_spec, dtype, lambda: DYNAMIC_DEFAULT_TYPES(dtype), nnx.Module,
                                   "an nnx.Module", check_path=check_path)


def _refuse_weight_only_qconfig(qconfig: Any, path: str) -> None:
    """A qconfig whose activation is ``Identity`` asks for float activations; quantize_dynamic would
    quantize them per call (w8a8), so say where weight-only quantization lives instead."""
    act = qconfig.activation
    if act is Identity or isinstance(act, Identity):
        raise ValueError(f"quantize_dynamic: '{path or '<root>'}' has a weight-only qconfig (activation=Identity), "
                         "but quantize_dynamic quantizes activations on every call (w8a8). For weight-only "
                         "quantization use jq.quantize_weight_only(model, jq.int8_weight_only()) (or "
                         "int4_weight_only(group_size=128)), or pass that config as qconfig_spec here")


def quantize_dynamic(
    model: nnx.Module,
    qconfig_spec: QConfigSpec = None,
    dtype: Union[QDType, FloatDType] = qint8,
    mapping: Optional[Mapping[type, type]] = None,
    inplace: bool = False,
    *,
    per_token: Optional[bool] = None,
    reduce_range: bool = True,
) -> nnx.Module:
    """Replace float modules with dynamically quantized ones (PyTorch's ``quantize_dynamic``).

    Args:
      model: a float NNX model.
      qconfig_spec: ``None`` -> the default module types for ``dtype`` (qint8/float16/bfloat16:
        ``nnx.Linear``, ``LinearReLU``, ``nnx.LinearGeneral``, ``nnx.Einsum``, ``nnx.LSTMCell``,
        ``nnx.OptimizedLSTMCell``, ``nnx.GRUCell``; quint8: ``nnx.Embed``) with the default qconfig for ``dtype``; a set of module types (default
        qconfig for ``dtype``); or a dict from module type or dotted module path to a QConfig (or
        ``None`` to keep that subtree float). Children inherit their parent's qconfig; a path entry
        beats a type entry.
      dtype: ``qint8`` (int8 weights, ``default_dynamic_qconfig``), ``float16``, ``bfloat16``
        (half-precision weights) or ``quint8`` (weight-only embeddings, per-row float qparams).
        A ``WeightOnlyConfig`` (``int8_weight_only()``, ``int4_weight_only(group_size=128)``) as
        ``qconfig_spec`` or ``dtype`` hands over to ``quantize_weight_only`` (float activations); a
        QConfig with ``activation=Identity`` raises instead of silently producing w8a8.
      mapping: float type -> dynamic type (default ``get_default_dynamic_quant_module_mappings()``).
      inplace: change ``model`` itself (built on a copy first, so a failure leaves it untouched).
      per_token: one activation scale per row instead of per tensor (None: from the qconfig's
        activation placeholder; per tensor by default, as PyTorch).
      reduce_range: 7-bit activations as PyTorch's x86 engine (default) or full 8 bits.

    Returns:
      The model with float32 inputs and outputs and quantized weights. Warns (listing the module
      types found) if nothing matched. Raises with the module path when a module cannot take the
      requested dtype.
    """
    check_nnx_model(model, "quantize_dynamic")
    if isinstance(qconfig_spec, WeightOnlyConfig) or isinstance(dtype, WeightOnlyConfig):
        # int8/int4 weight-only: activations stay float (never a silent w8a8).
        spec = qconfig_spec if isinstance(qconfig_spec, WeightOnlyConfig) else dtype
        return quantize_weight_only(model, spec, inplace=inplace)
    mapping = get_default_dynamic_quant_module_mappings() if mapping is None else mapping
    qconfigs = propagate_qconfig(model, _normalise_spec(model, qconfig_spec, dtype))
    supported = get_dynamic_weight_dtypes()

    def swap(path: str, module: nnx.Module):
        qconfig = qconfigs.get(path)
        target = mapping.get(type(module))
        if qconfig is None or target is None:
            return None
        _refuse_weight_only_qconfig(qconfig, path)
        wdtype = weight_dtype(qconfig, path)
        allowed = supported.get(target)
        if allowed is not None and wdtype not in allowed:
            raise ValueError(f"quantize_dynamic: '{path or '<root>'}' ({type(module).__qualname__}) cannot be "
                             f"dynamically quantized with {wdtype!r} weights; supported: "
                             f"{', '.join(repr(d) for d in allowed)}")
        return target.from_float(module, qconfig, path, per_token=per_token, reduce_range=reduce_range)

    result, swapped = swap_modules(model, swap)
    if swapped:
        result = whole_sequence_rnns(result)  # as PyTorch's dynamic LSTM/GRU: whole-sequence input projection
    if not swapped:
        found = Counter(type(m).__qualname__ for _, m in named_modules(result))
        want = sorted(t.__qualname__ for t in mapping)
        warnings.warn(f"quantize_dynamic: no module was quantized (dtype {dtype!r}); the model has "
                      f"{dict(found)}, quantizable types are {want}. Returning an unchanged copy.",
                      UserWarning, stacklevel=2)
    if inplace and type(result) is not type(model):
        raise TypeError("quantize_dynamic(inplace=True) cannot replace the root module itself; use the returned model")
    return finish(model, result, inplace)
