"""``Quantize`` and ``DeQuantize``: what ``QuantStub`` and ``DeQuantStub`` become after convert."""
from __future__ import annotations

import jax
from flax import nnx

from jaxquant.nn.quantized.common import StaticOutputQParams
from jaxquant.core.grad_guard import refuse_gradient
from jaxquant.qtensor import QTensor, dequantize, quantize_per_tensor


class Quantize(StaticOutputQParams):
    """float array (any shape) -> per-tensor QTensor with the calibrated scale and zero point.

    Called eagerly with a concrete input holding NaN/Inf it raises ``ValueError`` naming this module
    (PyTorch quantizes them silently); under ``jit`` there is no check and no cost.
    """

    def __call__(self, x) -> QTensor:
        if isinstance(x, QTensor):
            return x  # already quantized upstream, as PyTorch's Quantize of a quantized tensor
        try:
            x = refuse_gradient(x, f"Quantize '{self.name}'")
            return quantize_per_tensor(x, self.scale.get_value(), self.zero_point.get_value(), self.dtype)
        except ValueError as e:  # eager-only value checks (NaN/Inf input, bad loaded qparams)
            raise ValueError(f"Quantize '{self.name}': {e}") from None


class DeQuantize(nnx.Module):
    """QTensor -> float32 array; a float input passes through unchanged."""

    def __init__(self, name: str = ""):
        self.name = name

    @classmethod
    def from_observed(cls, observed, path: str) -> "DeQuantize":
        return cls(path)

    def __call__(self, x) -> jax.Array:
        return dequantize(x) if isinstance(x, QTensor) else x
