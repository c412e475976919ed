"""PyTorch's ready-made fake-quantize factories (``torch.ao.quantization.fake_quantize.default_*``).

Each is a hashable ``with_args`` factory with exactly PyTorch 2.13's arguments; ``quint4x2`` maps to
jaxquant's ``quint4``. ``default_histogram_fake_quant`` is built on first access, so this module
imports before the histogram observer does.
"""
from __future__ import annotations

from typing import Any

from jaxquant.dtypes import (
    per_channel_affine_float_qparams,
    per_channel_symmetric,
    per_tensor_affine,
    per_tensor_symmetric,
    qint8,
    quint4,
    quint8,
)
from jaxquant.fake_quant.fake_quantize import FakeQuantize, FixedQParamsFakeQuantize, FusedMovingAvgObsFakeQuantize
import jaxquant.observers as observers
from jaxquant.observers.histogram import HistogramObserver
from jaxquant.observers.minmax import MovingAverageMinMaxObserver
from jaxquant.observers.per_channel import MovingAveragePerChannelMinMaxObserver
from jaxquant.observers.simple import FixedQParamsObserver

# PyTorch's default_fixed_qparams_range_{0to1,neg1to1}_observer (sigmoid/hardsigmoid/softmax, tanh)
fixed_qparams_range_0to1_observer = FixedQParamsObserver.with_args(
    scale=1.0 / 256.0, zero_point=0, dtype=quint8, quant_min=0, quant_max=255
)
fixed_qparams_range_neg1to1_observer = FixedQParamsObserver.with_args(
    scale=2.0 / 256.0, zero_point=128, dtype=quint8, quant_min=0, quant_max=255
)

default_fake_quant = FakeQuantize.with_args(
    observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255, dtype=quint8,
    qscheme=per_tensor_affine, reduce_range=True,
)
"""Activations: moving-average min/max, quint8, 7-bit range."""

default_weight_fake_quant = FakeQuantize.with_args(
    observer=MovingAverageMinMaxObserver, quant_min=-128, quant_max=127, dtype=qint8,
    qscheme=per_tensor_symmetric, reduce_range=False,
)
"""Weights, per tensor symmetric qint8."""

default_dynamic_fake_quant = FakeQuantize.with_args(
    observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255, is_dynamic=True, dtype=quint8,
    averaging_constant=1,
)

default_fixed_qparams_range_neg1to1_fake_quant = FixedQParamsFakeQuantize.with_args(
    observer=fixed_qparams_range_neg1to1_observer
)
default_fixed_qparams_range_0to1_fake_quant = FixedQParamsFakeQuantize.with_args(
    observer=fixed_qparams_range_0to1_observer
)
default_symmetric_fixed_qparams_fake_quant = default_fixed_qparams_range_neg1to1_fake_quant
default_affine_fixed_qparams_fake_quant = default_fixed_qparams_range_0to1_fake_quant

default_per_channel_weight_fake_quant = FakeQuantize.with_args(
    observer=MovingAveragePerChannelMinMaxObserver, quant_min=-128, quant_max=127, dtype=qint8,
    qscheme=per_channel_symmetric, reduce_range=False, ch_axis=0,
)
"""Weights, per output channel (axis 0 of the PyTorch-layout weight the module layer observes)."""

default_embedding_fake_quant = FakeQuantize.with_args(
    observer=MovingAveragePerChannelMinMaxObserver, qscheme=per_channel_affine_float_qparams, dtype=quint8,
    quant_min=0, quant_max=255, ch_axis=0, averaging_constant=1,
)

default_embedding_fake_quant_4bit = FakeQuantize.with_args(
    observer=MovingAveragePerChannelMinMaxObserver, qscheme=per_channel_affine_float_qparams, ch_axis=0,
    dtype=quint4, averaging_constant=1,
)

default_fused_act_fake_quant = FusedMovingAvgObsFakeQuantize.with_args(
    observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255, dtype=quint8,
)
default_fused_wt_fake_quant = FusedMovingAvgObsFakeQuantize.with_args(
    observer=MovingAverageMinMaxObserver, quant_min=-128, quant_max=127, dtype=qint8,
    qscheme=per_tensor_symmetric,
)
default_fused_per_channel_wt_fake_quant = FusedMovingAvgObsFakeQuantize.with_args(
    observer=MovingAveragePerChannelMinMaxObserver, quant_min=-128, quant_max=127, dtype=qint8,
    qscheme=per_channel_symmetric,
)
fused_wt_fake_quant_range_neg_127_to_127 = FusedMovingAvgObsFakeQuantize.with_args(
    observer=MovingAverageMinMaxObserver, quant_min=-127, quant_max=127, dtype=qint8,
    qscheme=per_tensor_symmetric, eps=2**-12,
)
fused_per_channel_wt_fake_quant_range_neg_127_to_127 = FusedMovingAvgObsFakeQuantize.with_args(
    observer=MovingAveragePerChannelMinMaxObserver, quant_min=-127, quant_max=127, dtype=qint8,
    qscheme=per_channel_symmetric, eps=2**-12,
)


def histogram_observer() -> Any:
    """``jaxquant.observers.HistogramObserver``, imported when first needed."""
    try:
        return observers.HistogramObserver
    except AttributeError:
        return HistogramObserver


def __getattr__(name: str) -> Any:
    if name == "default_histogram_fake_quant":
        return FakeQuantize.with_args(
            observer=histogram_observer(), quant_min=0, quant_max=255, dtype=quint8,
            qscheme=per_tensor_affine, reduce_range=True,
        )
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
