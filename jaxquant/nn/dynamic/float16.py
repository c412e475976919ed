"""Float16 / bfloat16 weight variants of the dynamic modules (``float16_dynamic_qconfig``).

``Float16Linear`` is PyTorch's fp16 dynamic linear (fbgemm ``linear_dynamic_fp16``): the weight is
stored as float16 (saturated to +-65504, as ``linear_prepack_fp16`` does), the activation stays
float32, the product is computed in float32 with the float32 bias. It halves weight memory and
gives PyTorch's numbers; it does not speed up the dot on CPU.

``BFloat16Linear`` stores the weight as bfloat16 and runs the dot in bfloat16 with float32
accumulation (``preferred_element_type``), which YNNPACK executes natively: the activation is
rounded to bfloat16 (8 bits of mantissa), so this is faster than float32 on large layers but less
accurate than Float16Linear.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxquant.core.weights import check_finite, float_weight_dtype
from jaxquant.dtypes import FloatDType, bfloat16, float16
from jaxquant.nn.intrinsic import float_linear_arrays, unwrap_linear_relu
from jaxquant.nn.variables import QuantParams

FP16_MAX = float(np.finfo(np.float16).max)


def to_float16_weight(kernel: jax.Array) -> jax.Array:
    """float32 -> float16 with saturation to the largest finite float16 (never Inf)."""
    return jnp.clip(jnp.asarray(kernel, jnp.float32), -FP16_MAX, FP16_MAX).astype(jnp.float16)


class _HalfLinear(nnx.Module):
    storage: FloatDType

    def __init__(self, kernel: jax.Array, bias: Optional[jax.Array], *, relu: bool = False, name: str = ""):
        kernel = jnp.asarray(kernel)
        if kernel.ndim != 2:
            raise ValueError(f"{type(self).__name__} '{name}': kernel must be (in_features, out_features), "
                             f"got shape {kernel.shape}")
        self.in_features, self.out_features = int(kernel.shape[0]), int(kernel.shape[1])
        self.kernel = QuantParams(self._store(kernel))
        self.bias = QuantParams(None if bias is None else jnp.asarray(bias, jnp.float32))
        self.relu = bool(relu)
        self.name = name

    def _store(self, kernel: jax.Array) -> jax.Array:
        raise NotImplementedError

    @classmethod
    def from_float(cls, module: nnx.Module, qconfig: Any = None, path: str = "", **_: Any):
        """From an ``nnx.Linear`` or ``LinearReLU``; the qconfig (if given) must target this dtype."""
        linear, relu = unwrap_linear_relu(module)
        if qconfig is not None:
            dtype = float_weight_dtype(qconfig, path)
            if dtype != cls.storage:
                raise ValueError(f"'{path}': {cls.__name__} stores {cls.storage!r}, the qconfig asks for {dtype!r}")
        kernel, bias = float_linear_arrays(linear, path)
        check_finite(kernel, path)
        return cls(kernel, bias, relu=relu, name=path)

    def _dot(self, x2: jax.Array, w: jax.Array) -> jax.Array:
        raise NotImplementedError

    def __call__(self, x: jax.Array) -> jax.Array:
        """float ``(..., in_features)`` -> float32 ``(..., out_features)``."""
        x = jnp.asarray(x)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__} '{self.name}': input has {x.shape[-1]} features, "
                             f"expected {self.in_features}")
        y = self._dot(x.astype(jnp.float32), self.kernel.get_value())
        bias = self.bias.get_value()
        if bias is not None:
            y = y + bias
        return jnp.maximum(y, 0.0) if self.relu else y


class Float16Linear(_HalfLinear):
    """Linear with a float16 weight, float32 math: float ``(..., K)`` -> float32 ``(..., N)``."""

    storage = float16

    def _store(self, kernel):
        return to_float16_weight(kernel)

    def _dot(self, x, w):
        return jnp.matmul(x, w.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)


class BFloat16Linear(_HalfLinear):
    """Linear with a bfloat16 weight and a bf16 x bf16 -> f32 dot: float ``(..., K)`` -> float32 ``(..., N)``."""

    storage = bfloat16

    def _store(self, kernel):
        return jnp.asarray(kernel, jnp.float32).astype(jnp.bfloat16)

    def _dot(self, x, w):
        return jax.lax.dot_general(x.astype(jnp.bfloat16), w, (((x.ndim - 1,), (0,)), ((), ())),
                                   preferred_element_type=jnp.float32)
