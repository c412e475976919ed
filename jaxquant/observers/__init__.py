"""Observers: immutable configs with pure ``init``/``update``/``calculate_qparams`` over pytree state.

See ``docs/observers.md``. Names and defaults follow ``torch.ao.quantization.observer``.
"""
from jaxquant.observers.base import (
    FLOAT32_EPS,
    NotCalibratedError,
    ObserverBase,
    ObserverFactory,
    StatsState,
    UniformQuantizationObserverBase,
    as_observer,
    check_observer_state,
)
from jaxquant.observers.histogram import HistogramObserver, HistogramState
from jaxquant.observers.minmax import MinMaxObserver, MovingAverageMinMaxObserver
from jaxquant.observers.mse import MSEObserver, MSEState
from jaxquant.observers.percentile import PercentileObserver
from jaxquant.observers.per_channel import MovingAveragePerChannelMinMaxObserver, PerChannelMinMaxObserver
from jaxquant.observers.presets import *  # noqa: F401,F403
from jaxquant.observers.presets import __all__ as _presets_all
from jaxquant.observers.simple import (
    CountState,
    FixedQParamsObserver,
    NoopObserver,
    PlaceholderObserver,
    RecordingObserver,
    RecordingState,
    ReuseInputObserver,
)

__all__ = [
    "FLOAT32_EPS",
    "CountState",
    "FixedQParamsObserver",
    "HistogramObserver",
    "HistogramState",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "MovingAveragePerChannelMinMaxObserver",
    "NoopObserver",
    "NotCalibratedError",
    "ObserverBase",
    "ObserverFactory",
    "PerChannelMinMaxObserver",
    "PlaceholderObserver",
    "RecordingObserver",
    "RecordingState",
    "ReuseInputObserver",
    "StatsState",
    "UniformQuantizationObserverBase",
    "as_observer",
    "check_observer_state",
    *_presets_all,
]
