"""``nn.Embed`` with a uint8 table and one float scale/offset per row (weight-only,
``float_qparams_weight_only_qconfig``; PyTorch's quantized ``Embedding``), the lookup arithmetic of
:class:`jaxquant.nn.dynamic.Embedding` (fbgemm's fused multiply-add, reproduced bit for bit)."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxquant.dtypes import per_channel_affine_float_qparams, quint8
from jaxquant.linen.quant_state import quantize_kernel
from jaxquant.torch_numerics import fma_u8


def is_embedding_qconfig(qconfig: Any) -> bool:
    """Whether ``qconfig``'s weight observer is quint8 with per-row float qparams."""
    if qconfig is None or qconfig.weight is None:
        return False
    observer = qconfig.weight()
    observer = getattr(observer, "observer", observer)
    return observer.dtype == quint8 and getattr(observer, "qscheme", None) == per_channel_affine_float_qparams


def embedding_quant_params(table: jax.Array, qconfig: Any) -> dict:
    """``{"weight_int": uint8 (V, D), "weight_scale": float32 (V,), "weight_zero_point": float32 (V,)}``."""
    observer = qconfig.weight()
    observer = getattr(observer, "observer", observer)
    # quantize_kernel takes channels last; rows of the table are the channels.
    qp = quantize_kernel(jnp.asarray(table, jnp.float32).T, observer)
    return {**qp, "weight_int": qp["weight_int"].T}


def _row_bias(qp: dict) -> jax.Array:
    return qp["weight_zero_point"] * qp["weight_scale"] * jnp.float32(-1.0)


def embed_lookup(qp: dict, inputs: jax.Array, path: str) -> jax.Array:
    """int indices ``(...)`` -> float32 ``(..., D)``."""
    inputs = jnp.asarray(inputs)
    if not jnp.issubdtype(inputs.dtype, jnp.integer):
        raise TypeError(f"quantized nn.Embed '{path}': indices must be integers, got {inputs.dtype}")
    q = jnp.take(qp["weight_int"], inputs, axis=0).astype(jnp.float32)
    scale = jnp.take(qp["weight_scale"], inputs, axis=0)[..., None]
    bias = jnp.take(_row_bias(qp), inputs, axis=0)[..., None]
    return fma_u8(q, scale, bias)


def embed_attend(qp: dict, query: jax.Array) -> jax.Array:
    """``query (..., D) @ table.T`` with the dequantized table -> float32 ``(..., V)``."""
    table = fma_u8(qp["weight_int"].astype(jnp.float32), qp["weight_scale"][:, None], _row_bias(qp)[:, None])
    return jnp.asarray(query, jnp.float32) @ table.T
