"""Dynamic int8 ``Linear`` (and ``LinearReLU``): int8 weights fixed at conversion, activations
quantized on every call from their own min/max (PyTorch's ``torch.ao.nn.quantized.dynamic.Linear``).

Input and output are float32; only the dot runs in integers (u8 x s8 -> s32 through
``jaxquant.kernels.linear.quantized_linear_dynamic``). As PyTorch's x86/fbgemm engine does, activations are
quantized to 7 bits (``reduce_range=True``) by default, because fbgemm's ``vpmaddubsw`` path could
saturate 16-bit pair sums with full 8-bit activations; our VNNI path accumulates straight to int32
and cannot overflow, so ``reduce_range=False`` is safe here and a bit more accurate, but
``True`` is what gives PyTorch's numbers.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from jaxquant.core.grad_guard import refuse_gradient
from jaxquant.core.weights import activation_per_token, quantize_float_weight, weight_dtype
from jaxquant.dtypes import bfloat16, float16, qint8
from jaxquant.kernels.linear import pack_linear, quantized_linear_dynamic
from jaxquant.nn.dynamic import float16 as half
from jaxquant.nn.intrinsic import float_linear_arrays, unwrap_linear_relu
from jaxquant.nn.variables import QuantCache, QuantParams, refresh_cache, seal_cache
from jaxquant.qtensor import QTensor


class Linear(nnx.Module):
    """Dynamically quantized linear: float32 ``(..., in_features)`` -> float32 ``(..., out_features)``.

    Holds the int8 weight prepacked for the dot kernels (per tensor or per output channel),
    float32 weight scales ``(out_features,)`` and the float32 bias. Per call the input gets one
    scale/zero point (``per_token=False``, PyTorch's behaviour) or one per row of the flattened
    ``(M, in_features)`` input (``per_token=True``: more accurate when rows differ in range, as
    tokens of a transformer do).
    """

    def __init__(self, weight: QTensor, bias: Optional[jax.Array], *, reduce_range: bool = True,
                 per_token: bool = False, relu: bool = False, name: str = ""):
        if weight.dtype != qint8 or weight.ndim != 2:
            raise TypeError(f"dynamic Linear '{name}': weight must be a qint8 QTensor (in_features, "
                            f"out_features), got {weight!r}")
        k, n = weight.shape
        self.in_features, self.out_features = int(k), int(n)
        self.weight_int8 = QuantParams(weight.int_data)
        w_scale, w_zero_point = weight.channel_qparams()
        self.weight_scale = QuantParams(jnp.broadcast_to(w_scale, (n,)).astype(jnp.float32))
        self.weight_zero_point = QuantParams(jnp.broadcast_to(w_zero_point, (n,)).astype(jnp.int32))
        self.bias_float = QuantParams(None if bias is None else jnp.asarray(bias, jnp.float32))
        # Both packed layouts, derived from the int8 weight (not part of the model's definition).
        self.params = QuantCache(pack_linear(weight.int_data, w_scale, w_zero_point, bias))
        self.weight_qscheme = weight.qscheme
        self.reduce_range = bool(reduce_range)
        self.per_token = bool(per_token)
        self.relu = bool(relu)
        self.name = name
        seal_cache(self)

    @classmethod
    def from_float(cls, module: nnx.Module, qconfig: Any, path: str = "", *,
                   reduce_range: bool = True, per_token: Optional[bool] = None) -> nnx.Module:
        """Quantize an ``nnx.Linear`` or ``LinearReLU`` with ``qconfig.weight()``: qint8 (per tensor
        or per channel) gives this class; a float16 / bfloat16 weight observer gives
        ``Float16Linear`` / ``BFloat16Linear`` (as PyTorch's one class serves qint8 and float16).
        ``per_token=None`` takes it from the qconfig's activation placeholder."""
        wdtype = weight_dtype(qconfig, path)
        if wdtype == float16:
            return half.Float16Linear.from_float(module, qconfig, path)
        if wdtype == bfloat16:
            return half.BFloat16Linear.from_float(module, qconfig, path)
        linear, relu = unwrap_linear_relu(module)
        kernel, bias = float_linear_arrays(linear, path)
        weight = quantize_float_weight(kernel, qconfig, path)
        if weight.dtype != qint8:
            raise ValueError(f"'{path}': dynamic int8 Linear needs a qint8 weight observer, got {weight.dtype!r}")
        if per_token is None:
            per_token = activation_per_token(qconfig)
        return cls(weight, bias, reduce_range=reduce_range, per_token=per_token, relu=relu, name=path)

    def rebuild_cache(self) -> "Linear":
        """A new module built from this one's defining arrays (recomputes both packed layouts)."""
        return Linear(self.weight(), self.bias(), reduce_range=self.reduce_range, per_token=self.per_token,
                      relu=self.relu, name=self.name)

    def weight(self) -> QTensor:
        """The int8 weight as a QTensor in flax layout ``(in_features, out_features)``."""
        w, scale = self.weight_int8.get_value(), self.weight_scale.get_value()
        zero_point = self.weight_zero_point.get_value()
        if self.weight_qscheme.is_per_channel:
            return QTensor(w, scale, zero_point, qint8, self.weight_qscheme, 1)
        return QTensor(w, scale[0], zero_point[0], qint8, self.weight_qscheme, None)

    def bias(self) -> Optional[jax.Array]:
        return self.bias_float.get_value()

    def __call__(self, x: jax.Array) -> jax.Array:
        """float ``(..., in_features)`` -> float32 ``(..., out_features)``."""
        x = jnp.asarray(x)
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"dynamic Linear '{self.name}': expected a float input, got {x.dtype}")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"dynamic Linear '{self.name}': input has {x.shape[-1]} features, expected "
                             f"{self.in_features}")
        refresh_cache(self, self.name)  # loaded QuantParams (nnx.update): repack, or say why not
        x = refuse_gradient(x, f"dynamic Linear '{self.name}'")
        return quantized_linear_dynamic(x, self.params.get_value(), reduce_range=self.reduce_range,
                                        per_token=self.per_token, relu=self.relu)

    def __repr__(self) -> str:
        return (f"DynamicLinear(in_features={self.in_features}, out_features={self.out_features}, "
                f"qscheme={self.weight_qscheme!r}, per_token={self.per_token}, relu={self.relu})")
