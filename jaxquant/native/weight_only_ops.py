"""The native weight-only GEMV (``csrc/weight_only_gemv.cc``): float32 ``x (M, K)`` times int8 / int4
block-quantized codes, read in the layout :class:`jaxquant.weight_only.BlockQuantizedWeight` stores.

The wrapper takes raw arrays (codes, scales, zero points, ``bits``, ``group_size``) so only the call
site in ``jaxquant.weight_only.matmul`` knows the container. Its FFI target is registered here, apart
from the int8 kernels' targets, so an extension built before this kernel existed leaves the rest of
the native backend working (this path then reports itself unsupported).
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.native import _lib, native_enabled

__all__ = ["WO_GEMV_MAX_M", "weight_only_gemv_supported", "weight_only_gemv", "weight_only_gemv_multi"]

# Rows up to which decode calls take the native kernel: it reads the weight once per call whatever
# M is (rows beyond 4 re-read L1-resident codes), so it wins over the dequantize-then-dot float path
# through the decode range (benchmarks/bench_decode.py).
WO_GEMV_MAX_M = 8


@functools.lru_cache(maxsize=None)
def _target_ready() -> bool:
    lib = _lib()
    if lib is None or not hasattr(lib, "JqWeightOnlyGemv") or not lib.jq_wo_gemv_supported():
        return False
    try:
        jax.ffi.register_ffi_target("jaxquant_weight_only_gemv", jax.ffi.pycapsule(lib.JqWeightOnlyGemv),
                                    platform="cpu")
    except Exception:  # noqa: BLE001 - a target that does not register means: stay on XLA
        return False
    return True


def weight_only_gemv_supported(m) -> bool:
    """Trace-time switch: ``m`` concrete rows, ``1 <= m <= WO_GEMV_MAX_M``, the native backend enabled
    (``jq.use_native``, unsharded) and the CPU has AVX-512 F/BW/VL."""
    return isinstance(m, (int, np.integer)) and 1 <= m <= WO_GEMV_MAX_M and native_enabled() and _target_ready()


def weight_only_gemv(x: jax.Array, data: jax.Array, scale: jax.Array, zero_point: jax.Array, *, bits: int,
                     group_size: int, out_features: int) -> jax.Array:
    """``x @ W`` in float32 for a block-quantized ``W`` without dequantizing it.

    Args:
      x: float ``(M, K)`` (cast to float32).
      data: uint8 codes ``(N, Kp)`` for 8 bits, ``(ceil(N/2), Kp)`` for 4 bits (row ``r``'s low
        nibble is output ``r``, its high nibble output ``r + ceil(N/2)``).
      scale: float32 ``(N, G)``; zero_point: int32 ``(N, G)`` (unsigned code domain).
      bits: 4 or 8; group_size: inputs per group, ``Kp = G * group_size``, ``K <= Kp``.
      out_features: ``N``.

    Returns:
      float32 ``(M, N)``: ``y[m, n] = sum_g scale[n, g] * sum_{k in g} (code[n, k] - zero_point[n, g]) x[m, k]``.
    """
    return weight_only_gemv_multi(x, [(data, scale, zero_point, out_features)], bits=bits, group_size=group_size)[0]


def weight_only_gemv_multi(x: jax.Array, weights: Sequence[tuple], *, bits: int, group_size: int) -> list:
    """Several weights that read the same ``x`` in one call (e.g. Q, K, V): one custom call and one
    split of the rows over the threads instead of one each.

    Args:
      x: float ``(M, K)``.
      weights: ``(data, scale, zero_point, out_features)`` per weight, laid out as in
        :func:`weight_only_gemv`, all with the same ``bits`` and ``group_size``.

    Returns:
      A list of float32 ``(M, N_i)``, one per weight.
    """
    if bits not in (4, 8) or int(group_size) < 1:
        raise ValueError(f"weight_only_gemv: bits must be 4 or 8 and group_size >= 1, got {bits}, {group_size}")
    m, k = x.shape
    for data, scale, zero_point, n in weights:
        rows, g = (int(n) if bits == 8 else -(-int(n) // 2)), int(scale.shape[-1])
        kp = g * int(group_size)
        if (tuple(data.shape) != (rows, kp) or tuple(scale.shape) != (int(n), g)
                or tuple(zero_point.shape) != (int(n), g) or not kp - int(group_size) < k <= kp):
            raise ValueError(f"weight_only_gemv: codes {tuple(data.shape)}, scale {tuple(scale.shape)} and zero point "
                             f"{tuple(zero_point.shape)} are not one int{bits} weight of {n} outputs in groups of "
                             f"{group_size} for x of shape {tuple(x.shape)} (codes must be ({rows}, G * group_size) "
                             "covering K); pass the BlockQuantizedWeight's own bits, group_size and out_features")
    if not _target_ready():
        raise RuntimeError("weight_only_gemv: the native weight-only kernel is unavailable (extension not built, "
                           "built before this kernel, or no AVX-512 on this CPU); check weight_only_gemv_supported() "
                           "first or use jaxquant.weight_only.weight_only_matmul, which falls back to XLA")
    operands = [x.astype(jnp.float32)]
    for data, scale, zero_point, _ in weights:
        operands += [jnp.asarray(data, jnp.uint8), jnp.asarray(scale, jnp.float32), jnp.asarray(zero_point, jnp.int32)]
    shapes = [jax.ShapeDtypeStruct((m, int(n)), jnp.float32) for *_, n in weights]
    out = jax.ffi.ffi_call("jaxquant_weight_only_gemv", shapes, vmap_method="sequential")(
        *operands, bits=np.int64(bits), group_size=np.int64(group_size))
    return list(out)
