"""Weight-only and weight-focused quantization for language models.

* :mod:`~jaxquant.weight_only.blockwise`: per-group int8/int4 weights (:class:`BlockQuantizedWeight`).
* :mod:`~jaxquant.weight_only.matmul`: the float x block-quantized matmul (integer decode path).
* :mod:`~jaxquant.weight_only.modules`: ``WeightOnlyLinear``, ``WeightOnlyEmbedding``.
* :mod:`~jaxquant.weight_only.api`: ``quantize_weight_only`` with ``int8_weight_only()`` /
  ``int4_weight_only(group_size=128)`` configs.
* :mod:`~jaxquant.weight_only.calibration`: per-layer input statistics (Hessian, channel means/maxes).
* :mod:`~jaxquant.weight_only.gptq`, :mod:`~jaxquant.weight_only.awq`,
  :mod:`~jaxquant.weight_only.smoothquant`: the calibration algorithms.
"""
from jaxquant.weight_only.api import (
    WeightOnlyConfig,
    int4_weight_only,
    int8_weight_only,
    quantize_weight_only,
)
from jaxquant.weight_only.blockwise import BlockQuantizedWeight, dequantize_blockwise, quantize_blockwise
from jaxquant.weight_only.modules import WeightOnlyEmbedding, WeightOnlyLinear

__all__ = ["WeightOnlyConfig", "int4_weight_only", "int8_weight_only", "quantize_weight_only",
           "BlockQuantizedWeight", "dequantize_blockwise", "quantize_blockwise", "WeightOnlyEmbedding",
           "WeightOnlyLinear"]
