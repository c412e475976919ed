"""Quantized dtypes, quantization schemes and quant ranges.

These are plain, hashable Python values: they live in pytree metadata and never become tracers.
Names follow PyTorch (``torch.qint8``, ``torch.per_tensor_affine``, ...).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import ml_dtypes
import numpy as np


@dataclasses.dataclass(frozen=True)
class QDType:
    """A quantized integer dtype: its name, the numpy storage dtype and its full integer range."""

    name: str
    storage: np.dtype
    min: int
    max: int

    def __repr__(self) -> str:
        return f"jaxquant.{self.name}"


qint8 = QDType("qint8", np.dtype(np.int8), -128, 127)
quint8 = QDType("quint8", np.dtype(np.uint8), 0, 255)
qint32 = QDType("qint32", np.dtype(np.int32), -(2**31), 2**31 - 1)
# 4-bit values stored one per int8/uint8 byte (packing is a storage detail, not a numerics one).
qint4 = QDType("qint4", np.dtype(np.int8), -8, 7)
quint4 = QDType("quint4", np.dtype(np.uint8), 0, 15)

QUANTIZED_DTYPES = (qint8, quint8, qint32, qint4, quint4)


@dataclasses.dataclass(frozen=True)
class FloatDType:
    """A float dtype used as a 'quantization' target (float16/bfloat16 dynamic and static qconfigs)."""

    name: str
    storage: np.dtype

    def __repr__(self) -> str:
        return f"jaxquant.{self.name}"


float16 = FloatDType("float16", np.dtype(np.float16))
# numpy has no bfloat16; ml_dtypes (a jax dependency) provides it.
bfloat16 = FloatDType("bfloat16", np.dtype(ml_dtypes.bfloat16))
float32 = FloatDType("float32", np.dtype(np.float32))

FLOAT_DTYPES = (float16, bfloat16, float32)


@dataclasses.dataclass(frozen=True)
class QScheme:
    """How scale and zero point are shared: per tensor or per channel, affine or symmetric."""

    name: str

    @property
    def is_per_channel(self) -> bool:
        return self.name.startswith("per_channel")

    @property
    def is_symmetric(self) -> bool:
        return self.name.endswith("symmetric")

    def __repr__(self) -> str:
        return f"jaxquant.{self.name}"


per_tensor_affine = QScheme("per_tensor_affine")
per_tensor_symmetric = QScheme("per_tensor_symmetric")
per_channel_affine = QScheme("per_channel_affine")
per_channel_symmetric = QScheme("per_channel_symmetric")
per_channel_affine_float_qparams = QScheme("per_channel_affine_float_qparams")

QSCHEMES = (
    per_tensor_affine,
    per_tensor_symmetric,
    per_channel_affine,
    per_channel_symmetric,
    per_channel_affine_float_qparams,
)


def calculate_qmin_qmax(
    quant_min: Optional[int],
    quant_max: Optional[int],
    has_customized_qrange: bool,
    dtype: QDType,
    reduce_range: bool,
) -> tuple[int, int]:
    """The effective ``(quant_min, quant_max)`` an observer uses; PyTorch's ``calculate_qmin_qmax``.

    With a customized range, ``reduce_range`` halves it with floor division (``-128 // 2 == -64``,
    ``255 // 2 == 127``); otherwise the dtype's 8-bit default range, halved by ``reduce_range``.
    """
    if has_customized_qrange:
        if quant_min is None or quant_max is None:
            initial_min, initial_max = (0, 2**32 - 1) if dtype == qint32 else (0, 255)
        else:
            initial_min, initial_max = quant_min, quant_max
        qrange_len = initial_max - initial_min + 1
        if dtype == qint8 and not 0 < qrange_len <= 256:
            raise ValueError(
                "quantization range should be positive and not exceed the maximum bit range (=256); "
                f"got quant_min={quant_min}, quant_max={quant_max}"
            )
        if dtype == qint32 and not 0 < qrange_len <= 2**32:
            raise ValueError(
                "quantization range should be positive and not exceed the maximum bit range "
                f"(=4294967296); got quant_min={quant_min}, quant_max={quant_max}"
            )
        if reduce_range:
            return quant_min // 2, quant_max // 2  # type: ignore[operator]
        return quant_min, quant_max  # type: ignore[return-value]
    if dtype == qint8:
        return (-64, 63) if reduce_range else (-128, 127)
    if dtype == quint8:
        return (0, 127) if reduce_range else (0, 255)
    if dtype == qint32:
        return -(2**31), 2**31 - 1
    if dtype == qint4:
        return -8, 7
    return 0, 15


def validate_qrange(quant_min: int, quant_max: int, dtype: QDType, where: str = "") -> None:
    """Raise if ``[quant_min, quant_max]`` is empty or does not fit ``dtype``."""
    prefix = f"{where}: " if where else ""
    if not quant_min <= 0 <= quant_max:
        raise ValueError(
            f"{prefix}user-specified quantization range must include 0; got [{quant_min}, {quant_max}]"
        )
    if not quant_min < quant_max:
        raise ValueError(
            f"{prefix}qmin must be strictly less than qmax for a user-specified quantization range; "
            f"got [{quant_min}, {quant_max}]"
        )
    if quant_min < dtype.min or quant_max > dtype.max:
        raise ValueError(
            f"{prefix}quantization range [{quant_min}, {quant_max}] does not fit {dtype!r} "
            f"([{dtype.min}, {dtype.max}])"
        )
