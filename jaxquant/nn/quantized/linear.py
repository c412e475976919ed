"""Static int8 ``Linear`` (and ``LinearReLU``): u8 x s8 -> s32 dot, requantized to the output's qparams.

The input's scale and zero point arrive with the input QTensor (as in PyTorch); what depends only on
the weight (its packed layouts, column sums) is computed once at convert time, and the O(out_features)
terms that depend on the input qparams are folded per call inside the fused epilogue.
"""
from __future__ import annotations

from typing import Optional

import jax

from jaxquant.dtypes import QDType
from jaxquant.kernels.linear import pack_linear, quantized_linear
from jaxquant.nn.intrinsic import LinearReLU
from jaxquant.nn.quantized.common import Int8WeightLayer, require_qtensor, weight_layer_source
from jaxquant.nn.variables import QuantCache, refresh_cache, seal_cache
from jaxquant.qtensor import QTensor


class Linear(Int8WeightLayer):
    """Quantized ``nnx.Linear``: ``(..., in_features)`` QTensor -> ``(..., out_features)`` QTensor.

    Holds the int8 weight packed for the dot kernels, float32 weight scales ``(out_features,)``, an
    optional float32 bias (added in the accumulator's scale, as fbgemm does) and the output's static
    scale/zero point.
    """

    def __init__(self, weight: QTensor, bias: Optional[jax.Array], out_scale: jax.Array,
                 out_zero_point: jax.Array, out_dtype: QDType, relu: bool = False, name: str = ""):
        k, n = weight.shape
        self.in_features, self.out_features = int(k), int(n)
        self._set_weight_and_output(weight, bias, out_scale, out_zero_point, out_dtype, relu, name)
        self.packed = QuantCache(pack_linear(weight.int_data, self.weight_scale.get_value(), weight.channel_qparams()[1],
                                             self.bias.get_value()))
        seal_cache(self)

    @classmethod
    def from_observed(cls, observed, path: str) -> "Linear":
        """From an ``Observed`` ``nnx.Linear`` / ``LinearReLU`` or a QAT ``Linear`` / ``LinearReLU`` / ``LinearBn``."""
        _, weight, bias, (out_scale, out_zp, out_dtype), relu = weight_layer_source(observed, path, "linear",
                                                                                    LinearReLU)
        return cls(weight, bias, out_scale, out_zp, out_dtype, relu=relu, name=path)

    def rebuild_cache(self) -> "Linear":
        """A new module built from this one's defining arrays (recomputes the packed weight)."""
        return Linear(self.weight(), self.bias.get_value(), self.out_scale.get_value(),
                      self.out_zero_point.get_value(), self.out_dtype, relu=self.relu, name=self.name)

    def __call__(self, x) -> QTensor:
        x = require_qtensor(x, self.name, "quantized Linear")
        refresh_cache(self, self.name)  # loaded QuantParams (nnx.update): repack, or say why not
        if x.shape[-1] != self.in_features:
            raise ValueError(f"quantized Linear '{self.name}': input has {x.shape[-1]} features, "
                             f"expected {self.in_features}")
        return quantized_linear(x, self.packed.get_value(), self.out_scale.get_value(),
                                self.out_zero_point.get_value(), out_dtype=self.out_dtype, relu=self.relu)
