"""NNX modules with block-quantized weights and float activations (weight-only quantization).

``WeightOnlyLinear`` replaces ``nnx.Linear`` and ``nnx.LinearGeneral`` (contracting the trailing
input axes); ``WeightOnlyEmbedding`` replaces ``nnx.Embed`` (groups run along the feature axis of
each table row). Codes, scales and zero points are ``QuantParams``; ``input_scale`` (AWQ /
SmoothQuant's per-input-channel factor, the input is divided by it) is optional.
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxquant.nn.variables import QuantParams
from jaxquant.weight_only.blockwise import BlockQuantizedWeight, dequantize_blockwise
from jaxquant.weight_only.matmul import weight_only_matmul, weight_only_matmul_multi

__all__ = ["WeightOnlyLinear", "WeightOnlyEmbedding", "project_all"]


def _store(w: BlockQuantizedWeight) -> dict:
    return dict(data=QuantParams(w.data), scale=QuantParams(w.scale), zero_point=QuantParams(w.zero_point))


class WeightOnlyLinear(nnx.Module):
    """``y = (x / input_scale) @ W + b`` with ``W`` a :class:`BlockQuantizedWeight`; float in, float out.

    Args:
      weight: the quantized ``(K, N)`` weight.
      bias: float32 ``(N,)`` or None.
      in_shape, out_shape: the feature shapes (``(K,)`` / ``(N,)`` for Linear; LinearGeneral's
        multi-axis shapes are flattened around the dot).
      input_scale: float32 ``(K,)`` per-input-channel divisor (AWQ), or None.
      decode_rows: at most this many rows take the integer u8 x s8 path.
    """

    def __init__(self, weight: BlockQuantizedWeight, bias: Optional[jax.Array] = None, *,
                 in_shape: Optional[tuple] = None, out_shape: Optional[tuple] = None,
                 input_scale: Optional[jax.Array] = None, decode_rows: int = 8, name: str = ""):
        vars(self).update(_store(weight))
        self.bias = QuantParams(None if bias is None else jnp.asarray(bias, jnp.float32).reshape(-1))
        self.input_scale = QuantParams(None if input_scale is None else jnp.asarray(input_scale, jnp.float32))
        self.bits, self.group_size, self.symmetric = weight.bits, weight.group_size, weight.symmetric
        self.in_features, self.out_features = weight.in_features, weight.out_features
        self.in_shape = tuple(in_shape) if in_shape is not None else (weight.in_features,)
        self.out_shape = tuple(out_shape) if out_shape is not None else (weight.out_features,)
        self.decode_rows = int(decode_rows)
        self.name = name

    def weight(self) -> BlockQuantizedWeight:
        """The quantized weight as one pytree (codes, scales, zero points, static layout)."""
        return BlockQuantizedWeight(self.data.get_value(), self.scale.get_value(), self.zero_point.get_value(),
                                    bits=self.bits, group_size=self.group_size, in_features=self.in_features,
                                    out_features=self.out_features, symmetric=self.symmetric)

    def __call__(self, x: jax.Array) -> jax.Array:
        """float ``(..., *in_shape)`` -> same float dtype ``(..., *out_shape)``."""
        x = jnp.asarray(x)
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"WeightOnlyLinear '{self.name}': expected a float input, got {x.dtype}")
        nin = len(self.in_shape)
        if tuple(x.shape[x.ndim - nin:]) != self.in_shape:
            raise ValueError(f"WeightOnlyLinear '{self.name}': input trailing shape {x.shape[x.ndim - nin:]} != "
                             f"{self.in_shape}")
        lead = x.shape[:x.ndim - nin]
        x2 = x.reshape(lead + (self.in_features,))
        s = self.input_scale.get_value()
        if s is not None:
            x2 = (x2 / s).astype(x.dtype)
        y = weight_only_matmul(x2, self.weight(), decode_rows=self.decode_rows)
        b = self.bias.get_value()
        if b is not None:
            y = y + b.astype(y.dtype)
        return y.reshape(lead + self.out_shape)

    def __repr__(self) -> str:
        return (f"WeightOnlyLinear('{self.name}', int{self.bits}, group {self.group_size}, "
                f"{self.in_shape} -> {self.out_shape})")


def project_all(x: jax.Array, modules: Sequence[nnx.Module]) -> list:
    """``[m(x) for m in modules]``; weight-only projections of the same input (a Llama block's Q/K/V or
    gate/up) run as one native call when they share the format, take plain 1-D features and have no
    ``input_scale`` (AWQ divides each layer's input by its own scale, so those run one by one).

    Args:
      x: float ``(..., K)``.
      modules: callables on ``x`` (float ``nnx.Linear`` or :class:`WeightOnlyLinear`).

    Returns:
      One output per module, each as ``module(x)`` returns it.
    """
    wo = [m for m in modules if isinstance(m, WeightOnlyLinear)]
    fusable = (len(wo) == len(modules) > 1 and jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)
               and all(len(m.in_shape) == 1 and len(m.out_shape) == 1 and m.input_scale.get_value() is None
                       and m.decode_rows == wo[0].decode_rows and x.shape[-1:] == m.in_shape for m in wo))
    if not fusable:
        return [m(x) for m in modules]
    ys = weight_only_matmul_multi(x, [m.weight() for m in wo], decode_rows=wo[0].decode_rows)
    out = []
    for y, m in zip(ys, wo):
        b = m.bias.get_value()
        out.append(y if b is None else y + b.astype(y.dtype))
    return out


class WeightOnlyEmbedding(nnx.Module):
    """Embedding lookup from a block-quantized ``(num_embeddings, features)`` table; float32 rows out.

    The table is stored as a :class:`BlockQuantizedWeight` of shape ``(features, num_embeddings)``
    (rows = embeddings, groups along features), so a lookup gathers one row of codes and its scales.
    """

    def __init__(self, table: BlockQuantizedWeight, *, name: str = ""):
        vars(self).update(_store(table))
        self.bits, self.group_size, self.symmetric = table.bits, table.group_size, table.symmetric
        self.features, self.num_embeddings = table.in_features, table.out_features
        self.name = name

    def table(self) -> BlockQuantizedWeight:
        return BlockQuantizedWeight(self.data.get_value(), self.scale.get_value(), self.zero_point.get_value(),
                                    bits=self.bits, group_size=self.group_size, in_features=self.features,
                                    out_features=self.num_embeddings, symmetric=self.symmetric)

    def __call__(self, inputs: jax.Array) -> jax.Array:
        """int ``(...)`` ids -> float32 ``(..., features)``."""
        inputs = jnp.asarray(inputs)
        if not jnp.issubdtype(inputs.dtype, jnp.integer):
            raise TypeError(f"WeightOnlyEmbedding '{self.name}': ids must be integers, got {inputs.dtype}")
        data = self.data.get_value()
        if self.bits == 4:
            half = data.shape[0]
            row = data[inputs % half]
            codes = jnp.where((inputs >= half)[..., None], row >> 4, row & 15)
        else:
            codes = data[inputs]
        g, gs = self.scale.get_value().shape[-1], self.group_size
        codes = codes.astype(jnp.int32).reshape(inputs.shape + (g, gs))
        w = (codes - self.zero_point.get_value()[inputs][..., None]).astype(jnp.float32)
        w = w * self.scale.get_value()[inputs][..., None]
        return w.reshape(inputs.shape + (g * gs,))[..., :self.features]

    def attend(self, query: jax.Array) -> jax.Array:
        """``query @ table.T`` (tied output heads): float ``(..., features)`` -> ``(..., num_embeddings)``."""
        return query @ dequantize_blockwise(self.table())

    def __repr__(self) -> str:
        return f"WeightOnlyEmbedding('{self.name}', int{self.bits}, {self.num_embeddings} x {self.features})"
