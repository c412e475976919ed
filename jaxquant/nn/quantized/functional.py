"""``QFunctional``: what a ``FloatFunctional`` becomes after convert (quantized add, mul, cat, ...).

Each op dequantizes its inputs, computes in float32 and quantizes with the output qparams the
observer calibrated; that is fbgemm's float formulation of quantized add/mul, so results match
PyTorch's within one quantization step.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxquant.dtypes import QDType
from jaxquant.nn.quantized.common import observed_qparams, require_qtensor
from jaxquant.nn.variables import QuantParams
from jaxquant.qtensor import QTensor, dequantize, quantize_per_tensor


class QFunctional(nnx.Module):
    """Quantized element-wise ops over per-tensor QTensors; outputs carry ``(scale, zero_point)``."""

    def __init__(self, scale: jax.Array, zero_point: jax.Array, dtype: QDType, name: str = ""):
        self.scale = QuantParams(jnp.asarray(scale, jnp.float32))
        self.zero_point = QuantParams(jnp.asarray(zero_point, jnp.int32))
        self.dtype = dtype
        self.name = name

    @classmethod
    def from_float_functional(cls, module, path: str) -> "QFunctional":
        scale, zero_point, dtype = observed_qparams(module.activation_post_process, path)
        return cls(scale, zero_point, dtype, path)

    def _in(self, x) -> jax.Array:
        return dequantize(require_qtensor(x, self.name, "QFunctional"))

    def _out(self, y: jax.Array) -> QTensor:
        return quantize_per_tensor(y, self.scale.get_value(), self.zero_point.get_value(), self.dtype)

    def __call__(self, x):
        raise RuntimeError("QFunctional is not meant to be called directly: use add, mul, add_relu, cat, "
                           "add_scalar or mul_scalar")

    def add(self, x, y) -> QTensor:
        return self._out(self._in(x) + self._in(y))

    def add_relu(self, x, y) -> QTensor:
        return self._out(jax.nn.relu(self._in(x) + self._in(y)))

    def mul(self, x, y) -> QTensor:
        return self._out(self._in(x) * self._in(y))

    def cat(self, xs: Sequence, axis: int = 0) -> QTensor:
        return self._out(jnp.concatenate([self._in(x) for x in xs], axis=axis))

    def matmul(self, x, y) -> QTensor:
        return self._out(jnp.matmul(self._in(x), self._in(y)))

    def add_scalar(self, x, y: float) -> QTensor:
        # Not observed (as in PyTorch): re-quantized with the input's own qparams.
        x = require_qtensor(x, self.name, "QFunctional")
        return quantize_per_tensor(dequantize(x) + y, x.scale, x.zero_point, x.dtype)

    def mul_scalar(self, x, y: float) -> QTensor:
        x = require_qtensor(x, self.name, "QFunctional")
        return quantize_per_tensor(dequantize(x) * y, x.scale, x.zero_point, x.dtype)
