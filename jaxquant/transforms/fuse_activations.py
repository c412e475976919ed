"""Fold the clip that follows a converted int8 conv (ReLU6, ReLU) into the conv: same codes, one op.

PyTorch has no Conv+BN+ReLU6 fusion, so an eager-mode model quantized like PyTorch's keeps each
ReLU6 as its own module after ``convert``: an integer clip of the conv's output codes to
``[zp, zp + round(6 / scale)]``, with the conv's output qparams. That clip is a pass over the whole
activation on its own (33 of them in EfficientNet-Lite0). After ``convert`` nothing about the
quantization is left to decide, so the clip can move into the conv: the conv saturates its codes
and then clips them to the same bounds, which gives the same codes bit for bit. The conv kernel
(``jaxquant.kernels.conv.quantized_conv``'s ``clamp``) does it in its epilogue, the native backend
inside its oneDNN call.
"""
from __future__ import annotations

from typing import Sequence

from flax import nnx

from jaxquant.module_paths import copy_model, get_submodule, set_submodule
from jaxquant.nn.activations import Identity, ReLU, ReLU6
from jaxquant.nn.quantized.conv import Conv as QuantizedConv
from jaxquant.transforms.checks import check_nnx_model
from jaxquant.transforms.swap import finish

__all__ = ["fuse_quantized_activations"]

# The real-valued clip each activation module applies to its quantized input.
_CLAMPS = {ReLU6: (0.0, 6.0), ReLU: (0.0, float("inf"))}


def fuse_quantized_activations(model: nnx.Module, pairs: Sequence[Sequence[str]], *,
                               inplace: bool = False) -> nnx.Module:
    """A converted model with each ``[conv_path, activation_path]`` pair's activation folded into the conv.

    The conv must be a converted static int8 conv (``jaxquant.nn.quantized.Conv``) whose output feeds
    only the activation, and the activation a ``ReLU6`` or ``ReLU`` module; the activation becomes an
    ``Identity`` and the conv clips its output codes as the activation did (its own output qparams
    are unchanged). The outputs are the same bit for bit, with the native backend and without.

    Args:
      model: an NNX model after ``jq.convert``.
      pairs: ``[[conv_path, activation_path], ...]`` (dotted paths, as ``jq.fuse_modules`` takes).
      inplace: edit ``model`` itself instead of a copy.

    Returns:
      The model with the activations folded. On bad input (a path that is missing, a conv not yet
      converted, an activation that is not a clip, a conv that already has one) nothing is changed
      and a ``ValueError`` names the pair.
    """
    check_nnx_model(model, "fuse_quantized_activations")
    result = copy_model(model)
    seen: set[str] = set()
    for pair in pairs:
        if isinstance(pair, str) or len(pair) != 2:
            raise ValueError(f"fuse_quantized_activations: each pair is [conv_path, activation_path], got {pair!r}")
        conv_path, act_path = pair
        try:
            conv, act = get_submodule(result, conv_path), get_submodule(result, act_path)
        except KeyError as e:
            raise ValueError(f"fuse_quantized_activations: pair {list(pair)}: {e.args[0]}") from None
        if not isinstance(conv, QuantizedConv):
            raise ValueError(f"fuse_quantized_activations: '{conv_path}' is a {type(conv).__name__}, not a "
                             "converted int8 Conv; call jq.convert first (and fuse only static int8 convs)")
        bounds = _CLAMPS.get(type(act))
        if bounds is None:
            raise ValueError(f"fuse_quantized_activations: '{act_path}' is a {type(act).__name__}; only "
                             f"{', '.join(t.__name__ for t in _CLAMPS)} fold into a conv")
        if conv.clamp is not None or conv_path in seen:
            raise ValueError(f"fuse_quantized_activations: '{conv_path}' already has a clip folded in; "
                             "list each conv once")
        seen.add(conv_path)
        conv.clamp = bounds
        set_submodule(result, act_path, Identity())
    return finish(model, result, inplace)
