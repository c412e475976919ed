"""Weight-only int8 ``Embedding`` with one float scale and offset per row
(``float_qparams_weight_only_qconfig``; PyTorch's ``torch.ao.nn.quantized.Embedding``).

Each row ``r`` of the table is quantized to uint8 with ``scale_r = (max_r - min_r) / 255`` and a
float zero point ``-min_r / scale_r``; fbgemm's packed layout (``embedding_bag_byte_prepack``)
keeps ``scale_r`` and ``bias_r = -zero_point_r * scale_r`` next to the row and a lookup returns
``fma(q, scale_r, bias_r)``. The fused multiply-add (one rounding) is reproduced here with an
error-free split of the product, so the output equals PyTorch's bit for bit in the usual case.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxquant.core.weights import quantize_float_weight, weight_observer
from jaxquant.dtypes import per_channel_affine_float_qparams, quint8
from jaxquant.nn.variables import QuantParams
from jaxquant.qtensor import QTensor
from jaxquant.torch_numerics import fma_u8


class Embedding(nnx.Module):
    """Quantized ``nnx.Embed``: integer indices ``(...)`` -> float32 ``(..., features)``.

    Holds the uint8 table ``(num_embeddings, features)``, per-row float32 ``scale`` and
    ``bias = -zero_point * scale`` (both ``(num_embeddings,)``).
    """

    def __init__(self, weight: QTensor, name: str = ""):
        if weight.dtype != quint8 or weight.qscheme != per_channel_affine_float_qparams or weight.axis != 0:
            raise TypeError(f"quantized Embedding '{name}': weight must be quint8 per_channel_affine_float_qparams "
                            f"along axis 0, got {weight!r}")
        self.num_embeddings, self.features = (int(d) for d in weight.shape)
        scale = jnp.asarray(weight.q_per_channel_scales(), jnp.float32)
        zero_point = jnp.asarray(weight.q_per_channel_zero_points(), jnp.float32)
        self.int_data = QuantParams(jnp.asarray(weight.int_data, jnp.uint8))
        self.scale = QuantParams(scale)
        self.zero_point = QuantParams(zero_point)
        self.bias = QuantParams(zero_point * scale * jnp.float32(-1.0))
        self.name = name

    @classmethod
    def from_float(cls, module: nnx.Module, qconfig: Any, path: str = "", **_: Any) -> "Embedding":
        """From an ``nnx.Embed`` with a ``float_qparams_weight_only_qconfig``-like qconfig."""
        if not isinstance(module, nnx.Embed):
            raise TypeError(f"'{path}': expected an nnx.Embed, got {type(module).__name__}")
        observer = weight_observer(qconfig, path)
        if observer.dtype != quint8 or getattr(observer, "qscheme", None) != per_channel_affine_float_qparams:
            raise ValueError(
                f"'{path}': embedding quantization needs a quint8 per_channel_affine_float_qparams weight "
                f"observer (float_qparams_weight_only_qconfig), got {observer!r}")
        table = jnp.asarray(module.embedding.get_value(), jnp.float32)  # (V, D): rows are channels
        # quantize_float_weight treats the last axis as the channel axis; rows are ours.
        q_t = quantize_float_weight(table.T, qconfig, path)
        weight = QTensor(q_t.int_data.T, q_t.q_per_channel_scales(), q_t.q_per_channel_zero_points(), q_t.dtype, q_t.qscheme, 0)
        return cls(weight, name=path)

    def weight(self) -> QTensor:
        """The uint8 table as a per-row float-qparams QTensor ``(num_embeddings, features)``."""
        return QTensor(self.int_data.get_value(), self.scale.get_value(), self.zero_point.get_value(),
                       quint8, per_channel_affine_float_qparams, 0)

    def __call__(self, inputs: jax.Array) -> jax.Array:
        """int ``(...)`` indices -> float32 ``(..., features)``."""
        inputs = jnp.asarray(inputs)
        if not jnp.issubdtype(inputs.dtype, jnp.integer):
            raise TypeError(f"quantized Embedding '{self.name}': indices must be integers, got {inputs.dtype}")
        q = jnp.take(self.int_data.get_value(), inputs, axis=0).astype(jnp.float32)
        scale = jnp.take(self.scale.get_value(), inputs, axis=0)[..., None]
        bias = jnp.take(self.bias.get_value(), inputs, axis=0)[..., None]
        return fma_u8(q, scale, bias)

    def attend(self, query: jax.Array) -> jax.Array:
        """``query (..., features) @ table.T`` with the dequantized table -> float32 ``(..., num_embeddings)``."""
        table = fma_u8(self.int_data.get_value().astype(jnp.float32), self.scale.get_value()[:, None],
                        self.bias.get_value()[:, None])
        return jnp.asarray(query, jnp.float32) @ table.T
