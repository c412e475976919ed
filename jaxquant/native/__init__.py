"""Native int8 backend: oneDNN convolutions, an AVX512-VNNI decode GEMV (static, and dynamic with the
activation's quantization fused), oneDNN's int8 matmul for batched dense layers and an 8-bit max pool,
as XLA FFI custom calls.

The pure-XLA kernels in :mod:`jaxquant.kernels` stay the reference and the portable path; the kernel
ops switch to the native ones (a few lines in ``kernels/conv.py`` and ``kernels/linear.py``) when:

* the extension was built by ``pip install`` and loads (:func:`native_backend_available`, and
  :func:`native_backend_reason` says why not);
* it is allowed: ``JAXQUANT_NATIVE=0`` in the environment or ``with jq.use_native(False):`` turn it
  off (the setting is part of ``jax.jit``'s cache key, so a program traced with it on is never reused
  with it off); :func:`jaxquant.export` always traces with it off, so artifacts stay portable
  StableHLO;
* the program is not sharded (one local device), every shape is concrete (no ``jax.export``
  symbolic batch) and the op is one the native kernels do faster: 1-D/2-D convolutions with a
  symmetric weight packed at convert time, dense layers with at most
  :data:`GEMV_MAX_M` rows on a CPU with AVX512-VNNI (the GEMV) or more rows and a weight of at most
  :data:`MATMUL_MAX_WEIGHT` elements (oneDNN's matmul, on the same packed weight), and 2-D max
  pooling of uint8/int8 data.

Results are identical to the pure-XLA kernels (tests/native compares every op both ways; the dynamic
Linear against XLA at its default optimization level, and it chooses the activation's qparams in float64
as PyTorch does, see docs/cpu_performance.md).
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import jax
from jax._src import config as _jax_config  # the one private import: a flag in jit's cache key

from jaxquant.native._loader import load

__all__ = ["native_backend_available", "native_backend_reason", "use_native", "native_enabled",
           "GEMV_MAX_M", "MATMUL_MAX_WEIGHT"]

# Rows up to which the VNNI GEMV replaces XLA's u8 x s8 dot. Measured under heavy load only
# (benchmarks/bench_ops.py, xla/native columns): ahead at M = 1 on 768-wide layers, behind at M = 8;
# re-measure on a quiet machine. The kernel itself takes any M (tests run it up to 8). Not a
# function of the weight's size: at 4096x4096 the GEMV, XLA's dot and fbgemm all run at the
# memory-bandwidth limit of this 2-core Xeon (docs/cpu_performance.md), and the GEMV was ahead of
# XLA's dot there in this session's measurements.
GEMV_MAX_M = 4
# Above GEMV_MAX_M rows, oneDNN's int8 matmul (AMX/VNNI brgemm on the GEMV's packed weight) replaces
# XLA's dot for weights of at most this many elements. Measured under load (benchmarks/bench_ops.py,
# "Dense ... M=64" rows): 0.3-0.7x XLA's time for 768x768, 768x3072 and the Fashion CNN's 3136x128 at
# M = 64..512; at 4096x4096 it was not reliably ahead, so the 16 MB weights keep XLA's dot (the
# M=512 row must not get slower). Re-measure on a quiet machine.
MATMUL_MAX_WEIGHT = 1 << 22

_NATIVE = _jax_config.bool_state(
    "jaxquant_native", default=os.environ.get("JAXQUANT_NATIVE", "1") != "0",
    help="jaxquant: use the native int8 kernels (oneDNN conv, VNNI GEMV) where they are faster.",
    include_in_jit_key=True, include_in_trace_context=True)


def native_backend_available() -> bool:
    """True when the native extension is built, loads, and its FFI targets are registered."""
    return _registered()[0]


def native_backend_reason() -> str:
    """Why the native backend is unavailable (``""`` when it is available)."""
    return _registered()[1]


def native_enabled() -> bool:
    """True when kernel ops traced now may use the native backend (available and switched on)."""
    return bool(_NATIVE.value) and native_backend_available() and jax.local_device_count() == 1


@contextlib.contextmanager
def use_native(enabled: bool = True) -> Iterator[None]:
    """Context manager: trace with the native backend on or off (default on where available).

    ``with jq.use_native(False): y = jax.jit(f)(x)`` runs the pure-XLA kernels; jit retraces
    because the flag is part of its cache key.
    """
    with _NATIVE(bool(enabled)):
        yield


_STATE: list = []


def _registered() -> tuple[bool, str]:
    if not _STATE:
        lib, reason = load()
        if lib is not None:
            try:
                for name, symbol in (("jaxquant_conv_u8s8", lib.JqConvU8S8),
                                     ("jaxquant_conv_u8s8_clamp", lib.JqConvU8S8Clamp),
                                     ("jaxquant_gemv_u8s8", lib.JqGemvU8S8),
                                     ("jaxquant_gemv_dyn_f32", lib.JqGemvDynF32),
                                     ("jaxquant_matmul_u8s8", lib.JqMatmulU8S8),
                                     ("jaxquant_maxpool_u8", lib.JqMaxPoolU8)):
                    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(symbol), platform="cpu")
            except Exception as e:  # noqa: BLE001 - any failure means: use the XLA kernels
                lib, reason = None, f"registering the native FFI targets failed: {e}"
        _STATE.append((lib is not None, reason, lib))
        if lib is None and os.environ.get("JAXQUANT_NATIVE", "1") != "0":
            import warnings
            warnings.warn(f"jaxquant: native int8 backend unavailable, using the pure-XLA kernels: {reason}",
                          RuntimeWarning, stacklevel=3)
    ok, reason, _ = _STATE[0]
    return ok, reason


def _lib():
    _registered()
    return _STATE[0][2]
