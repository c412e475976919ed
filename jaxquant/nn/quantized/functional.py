"""``QFunctional``: what a ``FloatFunctional`` becomes after convert (quantized add, mul, cat, ...).

Each op dequantizes its inputs, computes in float32 and quantizes with the output qparams the
observer calibrated; that is fbgemm's float formulation of quantized add/mul, so results match
PyTorch's within one quantization step.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from jaxquant.nn.quantized.common import StaticOutputQParams, require_qtensor
from jaxquant.qtensor import QTensor, dequantize, quantize_per_tensor


class QFunctional(StaticOutputQParams):
    """Quantized element-wise ops over per-tensor QTensors; outputs carry ``(scale, zero_point)``.
    Built by ``from_observed`` from a prepared ``FloatFunctional``."""

    def _in(self, x) -> jax.Array:
        return dequantize(require_qtensor(x, self.name, "QFunctional"))

    def _out(self, y: jax.Array) -> QTensor:
        return quantize_per_tensor(y, self.scale.get_value(), self.zero_point.get_value(), self.dtype)

    def __call__(self, x):
        raise RuntimeError("QFunctional is not meant to be called directly: use add, mul, add_relu, cat, "
                           "add_scalar or mul_scalar")

    def add(self, x, y) -> QTensor:
        return self._out(self._in(x) + self._in(y))

    def add_relu(self, x, y) -> QTensor:
        return self._out(jax.nn.relu(self._in(x) + self._in(y)))

    def mul(self, x, y) -> QTensor:
        return self._out(self._in(x) * self._in(y))

    def cat(self, xs: Sequence, axis: int = 0) -> QTensor:
        return self._out(jnp.concatenate([self._in(x) for x in xs], axis=axis))

    def matmul(self, x, y) -> QTensor:
        return self._out(jnp.matmul(self._in(x), self._in(y)))

    def add_scalar(self, x, y: float) -> QTensor:
        """``x + y`` for a Python float ``y``, as PyTorch's ``quantized::add_scalar``: not observed; the
        output qparams are derived from ``x``'s (see :func:`add_scalar`)."""
        return add_scalar(require_qtensor(x, self.name, "QFunctional"), y)

    def mul_scalar(self, x, y: float) -> QTensor:
        """``x * y`` for a Python float ``y``, as PyTorch's ``quantized::mul_scalar`` (see :func:`mul_scalar`)."""
        return mul_scalar(require_qtensor(x, self.name, "QFunctional"), y)


def add_scalar(x: QTensor, c: float) -> QTensor:
    """PyTorch's ``quantized::add_scalar`` on a per-tensor QTensor; same shape and dtype as ``x``.

    The scalar moves the zero point, ``z' = z - round(c / s)``, leaving the integers as they are. Only
    if ``z'`` falls outside the dtype's range is the scale widened so the shifted range still fits
    (``z'`` pinned to qmin or qmax) and the integers requantized with ``s / s'``.
    """
    qmin, qmax = x.dtype.min, x.dtype.max
    s = x.q_scale().astype(jnp.float32)
    z = x.q_zero_point().astype(jnp.int32)
    c_q = jnp.round(jnp.float32(c) / s).astype(jnp.int32)
    zc = z - c_q
    span = jnp.float32(qmax - qmin)
    new_scale = jnp.where(zc < qmin, (qmax - zc).astype(jnp.float32) / span * s,
                          jnp.where(zc > qmax, (zc - qmin).astype(jnp.float32) / span * s, s))
    new_zp = jnp.clip(zc, qmin, qmax)
    # In range the multiplier is s * (1/s) (within an ulp of 1), which rounds back to the same integers.
    multiplier = s * (jnp.float32(1.0) / new_scale)
    shifted = (x.int_data.astype(jnp.int32) - z + c_q).astype(jnp.float32)
    q = jnp.clip(jnp.round(shifted * multiplier).astype(jnp.int32) + new_zp, qmin, qmax)
    return QTensor(q.astype(x.int_data.dtype), new_scale, new_zp, x.dtype)


def mul_scalar(x: QTensor, c: float) -> QTensor:
    """PyTorch's ``quantized::mul_scalar`` on a per-tensor QTensor; same shape and dtype as ``x``.

    ``c > 0``: integers kept, scale ``c * s``. ``c == 0``: all integers 0 with qparams ``(1.0, 0)``.
    ``c < 0``: integers mirrored ``qmax + qmin - q``, scale ``|c| * s``, zero point ``qmax + qmin - z``.
    """
    qmin, qmax = x.dtype.min, x.dtype.max
    c = float(c)
    s = x.q_scale().astype(jnp.float32)
    z = x.q_zero_point().astype(jnp.int32)
    if c > 0:
        return QTensor(x.int_data, jnp.float32(c) * s, z, x.dtype)
    if c == 0:
        return QTensor(jnp.zeros_like(x.int_data), jnp.float32(1.0), jnp.int32(0), x.dtype)
    q = (qmax + qmin - x.int_data.astype(jnp.int32)).astype(x.int_data.dtype)
    return QTensor(q, jnp.float32(-c) * s, qmax + qmin - z, x.dtype)
