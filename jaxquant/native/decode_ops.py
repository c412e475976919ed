"""Native fused ops of a Llama decode step (``csrc/decode_ops.cc``): residual add + RMSNorm, and
single-token grouped-query attention with rotary positions and the KV-cache write, one custom call each.

XLA CPU makes 4 kernels of an RMSNorm and about 13 of one decode-step attention (rotary, two cache
writes, scores, mask, a split max and sum, exp, divide, p . V); each costs microseconds of dispatch
whatever its size, and 30 layers of them were most of a SmolLM2 token's non-matmul time. These ops
are float32 and model-independent: ``jaxquant.models.llama`` uses them for the float model and the
quantized ones alike. Each has a pure-JAX definition in that module (used when the native backend is
off or unavailable) that it equals within float rounding (tests/llm/test_decode_ops.py).

Targets are registered here, apart from the int8 kernels', so an extension built before these ops
existed leaves the rest of the native backend working (:func:`decode_ops_supported` is then False).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.native import _lib, native_enabled

__all__ = ["decode_ops_supported", "add_rms_norm", "decode_attention"]


@functools.lru_cache(maxsize=None)
def _targets_ready() -> bool:
    lib = _lib()
    if lib is None or not hasattr(lib, "JqAddRmsNorm") or not hasattr(lib, "JqDecodeAttention"):
        return False
    try:
        for name, symbol in (("jaxquant_add_rms_norm", lib.JqAddRmsNorm),
                             ("jaxquant_decode_attention", lib.JqDecodeAttention)):
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(symbol), platform="cpu")
    except Exception:  # noqa: BLE001 - a target that does not register means: stay on XLA
        return False
    return True


def decode_ops_supported() -> bool:
    """Trace-time switch: the native backend is enabled (``jq.use_native``, one device) and built
    with these ops."""
    return native_enabled() and _targets_ready()


def _require():
    if not _targets_ready():
        raise RuntimeError("jaxquant decode ops: the native extension is missing or was built before decode_ops.cc; "
                           "check decode_ops_supported() first or use the pure-JAX ops in jaxquant.models.llama")


def add_rms_norm(x: jax.Array, h, weight: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
    """``r = x + h`` (or ``x`` when ``h`` is None) and ``r * rsqrt(mean(r**2, -1) + eps) * weight``.

    Args:
      x, h: float32 ``(..., D)`` (h may be None).
      weight: float32 ``(D,)``.
      eps: added to the mean square.

    Returns:
      ``(r, y)``, both float32 of ``x``'s shape.
    """
    d = int(weight.shape[-1])
    if x.shape[-1] != d or x.dtype != jnp.float32 or (h is not None and (h.shape != x.shape or h.dtype != x.dtype)):
        raise ValueError(f"add_rms_norm: x {x.dtype}{tuple(x.shape)} and h must be float32 (..., {d}) of one shape "
                         f"to match the RMSNorm weight of {d} features")
    _require()
    operands = [x, jnp.asarray(weight, jnp.float32)] + ([] if h is None else [h])
    shape = jax.ShapeDtypeStruct(x.shape, jnp.float32)
    r, y = jax.ffi.ffi_call("jaxquant_add_rms_norm", (shape, shape), vmap_method="sequential")(
        *operands, eps=np.float32(eps))
    return r, y


def decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, cos: jax.Array, sin: jax.Array,
                     cache_k: jax.Array, cache_v: jax.Array, pos) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One new token's attention over the KV cache, rotary and cache write included.

    Args:
      q: float32 ``(B, H * D)``; k, v: float32 ``(B, KVH * D)`` (before rotary), H a multiple of KVH.
      cos, sin: float32 ``(D // 2,)`` rotary angles of position ``pos`` (GGML adjacent pairs).
      cache_k, cache_v: float32 ``(B, S, KVH, D)``; donate them to update in place.
      pos: int32 scalar, the new token's position (its cache slot, clamped into ``[0, S)`` as
        ``lax.dynamic_update_slice`` does; keys at slots ``<= pos`` are attended).

    Returns:
      ``(out, cache_k, cache_v)``: float32 ``(B, H * D)`` and the updated caches.
    """
    if cache_k.ndim != 4:
        raise ValueError(f"decode_attention: the key cache must be (B, S, KVH, D), got {tuple(cache_k.shape)}")
    b, s, kvh, d = cache_k.shape
    if (cache_k.dtype != jnp.float32 or cache_v.shape != cache_k.shape or cache_v.dtype != jnp.float32
            or k.shape != (b, kvh * d) or v.shape != (b, kvh * d) or q.ndim != 2 or q.shape[0] != b
            or q.shape[1] % (kvh * d) != 0 or cos.shape != (d // 2,) or sin.shape != (d // 2,)):
        raise ValueError(f"decode_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, cos "
                         f"{tuple(cos.shape)} do not fit float32 caches {cache_k.dtype}{tuple(cache_k.shape)} "
                         "(B, S, KVH, D): q must be (B, H*D), k/v (B, KVH*D), cos/sin (D/2,)")
    _require()
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    out_shapes = (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct(cache_k.shape, jnp.float32),
                  jax.ShapeDtypeStruct(cache_v.shape, jnp.float32))
    return tuple(jax.ffi.ffi_call("jaxquant_decode_attention", out_shapes, vmap_method="sequential",
                                  input_output_aliases={5: 1, 6: 2})(
        f32(q), f32(k), f32(v), f32(cos), f32(sin), cache_k, cache_v, jnp.asarray(pos, jnp.int32)))
