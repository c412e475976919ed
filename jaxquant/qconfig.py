"""``QConfig``: which observer / fake-quantize factories to use for a layer's activation and weight.

Same names, presets and backend choices as ``torch.ao.quantization.qconfig`` (PyTorch 2.13). A
QConfig holds *factories* (classes or ``.with_args(...)`` results), never built observers, because
``prepare`` builds one observer per layer. Factories are hashable and compare by value, so QConfigs
can be dict keys and jit static arguments, and ``qconfig_equals`` is plain ``==``.

``torch.nn.Identity`` in the weight-only / activation-only presets is
:class:`jaxquant.fake_quant.Identity`; ``torch.float16`` is ``jaxquant.dtypes.float16``.
The HistogramObserver-based presets are built on first use (``get_default_qconfig``).
"""
from __future__ import annotations

import warnings
from collections import namedtuple
from typing import Any, Optional

from jaxquant.dtypes import (
    bfloat16,
    float16,
    float32,
    per_channel_affine,
    qint8,
    quint4,
    quint8,
)
from jaxquant.fake_quant.fake_quantize import FakeQuantize, FakeQuantizeBase, FusedMovingAvgObsFakeQuantize, Identity
from jaxquant.fake_quant.presets import (
    default_dynamic_fake_quant,
    default_embedding_fake_quant,
    default_embedding_fake_quant_4bit,
    default_fake_quant,
    default_fused_act_fake_quant,
    default_fused_per_channel_wt_fake_quant,
    default_fused_wt_fake_quant,
    default_per_channel_weight_fake_quant,
    default_weight_fake_quant,
    fused_per_channel_wt_fake_quant_range_neg_127_to_127,
    fused_wt_fake_quant_range_neg_127_to_127,
    histogram_observer,
)
from jaxquant.observers.base import ObserverBase
from jaxquant.observers.presets import (  # PyTorch's observer presets, under private names here
    default_observer as _default_observer,
    default_weight_observer as _default_weight_observer,
    default_per_channel_weight_observer as _default_per_channel_weight_observer,
    weight_observer_range_neg_127_to_127 as _weight_observer_range_neg_127_to_127,
    per_channel_weight_observer_range_neg_127_to_127 as _per_channel_weight_observer_range_neg_127_to_127,
    default_dynamic_quant_observer as _default_dynamic_quant_observer,
    default_placeholder_observer as _default_placeholder_observer,
    default_debug_observer as _default_debug_observer,
    default_float_qparams_observer as _default_float_qparams_observer,
    default_float_qparams_observer_4bit as _default_float_qparams_observer_4bit,
    default_reuse_input_observer as _default_reuse_input_observer,
)
from jaxquant.observers.minmax import MinMaxObserver, MovingAverageMinMaxObserver
from jaxquant.observers.simple import NoopObserver, PlaceholderObserver

SUPPORTED_BACKENDS = ("fbgemm", "x86", "qnnpack", "onednn")



def _is_built(spec: Any) -> bool:
    return isinstance(spec, (ObserverBase, FakeQuantizeBase, Identity))


class QConfig(namedtuple("QConfig", ["activation", "weight"])):
    """``QConfig(activation, weight)``: factories (classes or ``.with_args(...)``) for a layer's output
    activation and its weight. ``None`` means "leave in float"."""

    __slots__ = ()

    def __new__(cls, activation: Any, weight: Any) -> "QConfig":
        # catch the common mistake of passing built observers: prepare builds one per layer
        if _is_built(activation) or _is_built(weight):
            raise ValueError(
                "QConfig received observer instance, please pass observer class instead. "
                "Use MyObserver.with_args(x=1) to override arguments to constructor if needed"
            )
        return super().__new__(cls, activation, weight)


def QConfigDynamic(activation: Any = Identity, weight: Any = Identity) -> QConfig:  # noqa: N802
    """Deprecated PyTorch alias: a :class:`QConfig` (both default to :class:`Identity`)."""
    warnings.warn("QConfigDynamic is deprecated (as in PyTorch 1.12+); use QConfig", FutureWarning, stacklevel=2)
    return QConfig(activation, weight)


QConfigAny = Optional[QConfig]

default_qconfig = QConfig(activation=_default_observer, weight=_default_weight_observer)
default_debug_qconfig = QConfig(weight=_default_weight_observer, activation=_default_debug_observer)
default_per_channel_qconfig = QConfig(activation=_default_observer, weight=_default_per_channel_weight_observer)
default_dynamic_qconfig = QConfig(activation=_default_dynamic_quant_observer, weight=_default_weight_observer)
float16_dynamic_qconfig = QConfig(
    activation=PlaceholderObserver.with_args(dtype=float16, is_dynamic=True),
    weight=PlaceholderObserver.with_args(dtype=float16),
)
float16_static_qconfig = QConfig(
    activation=PlaceholderObserver.with_args(dtype=float16),
    weight=PlaceholderObserver.with_args(dtype=float16),
)
bfloat16_dynamic_qconfig = QConfig(
    activation=PlaceholderObserver.with_args(dtype=bfloat16, is_dynamic=True),
    weight=PlaceholderObserver.with_args(dtype=bfloat16),
)
"""Not in PyTorch: weights stored as bfloat16, activations cast per call (XLA:CPU runs bf16 dots)."""
per_channel_dynamic_qconfig = QConfig(activation=_default_dynamic_quant_observer,
                                      weight=_default_per_channel_weight_observer)
per_token_dynamic_qconfig = QConfig(
    activation=PlaceholderObserver.with_args(dtype=quint8, quant_min=0, quant_max=255, qscheme=per_channel_affine,
                                             is_dynamic=True),
    weight=_default_per_channel_weight_observer)
"""Not in PyTorch: one activation scale/zero point per row (token) of the flattened input, chosen per
call, with per-channel int8 weights. The per-channel activation qscheme is what turns per-token on
(``jaxquant.core.weights.activation_per_token``)."""
float_qparams_weight_only_qconfig = QConfig(activation=_default_placeholder_observer,
                                            weight=_default_float_qparams_observer)
float_qparams_weight_only_qconfig_4bit = QConfig(activation=_default_placeholder_observer,
                                                 weight=_default_float_qparams_observer_4bit)
default_qat_qconfig = QConfig(activation=default_fake_quant, weight=default_weight_fake_quant)
default_dynamic_qat_qconfig = QConfig(activation=default_dynamic_fake_quant, weight=default_weight_fake_quant)
default_weight_only_qconfig = QConfig(activation=Identity, weight=default_weight_fake_quant)
default_activation_only_qconfig = QConfig(activation=default_fake_quant, weight=Identity)
default_qat_qconfig_v2 = QConfig(activation=default_fused_act_fake_quant, weight=default_fused_wt_fake_quant)
default_reuse_input_qconfig = QConfig(activation=_default_reuse_input_observer, weight=NoopObserver)
default_embedding_qat_qconfig = QConfig(activation=NoopObserver.with_args(dtype=float32),
                                        weight=default_embedding_fake_quant)
default_embedding_qat_qconfig_4bit = QConfig(activation=NoopObserver.with_args(dtype=float32),
                                             weight=default_embedding_fake_quant_4bit)

_symmetric_qnnpack_act = FusedMovingAvgObsFakeQuantize.with_args(
    observer=MovingAverageMinMaxObserver, quant_min=-128, quant_max=127, dtype=qint8, reduce_range=False,
    eps=2**-12)
default_symmetric_qnnpack_qat_qconfig = QConfig(activation=_symmetric_qnnpack_act,
                                                weight=fused_wt_fake_quant_range_neg_127_to_127)
default_per_channel_symmetric_qnnpack_qat_qconfig = QConfig(
    activation=_symmetric_qnnpack_act, weight=fused_per_channel_wt_fake_quant_range_neg_127_to_127)


def default_dynamic_qconfig_for(dtype: Any) -> QConfig:
    """The QConfig ``quantize_dynamic`` uses for ``dtype`` when the spec gives none (NNX and Linen alike):
    ``qint8`` -> ``default_dynamic_qconfig``, ``float16``/``bfloat16`` -> the half-precision weight qconfigs,
    ``quint8`` (``quint4``) -> ``float_qparams_weight_only_qconfig`` (``_4bit``)."""
    if dtype == quint4:
        return float_qparams_weight_only_qconfig_4bit
    table = {qint8: default_dynamic_qconfig, float16: float16_dynamic_qconfig,
             bfloat16: bfloat16_dynamic_qconfig, quint8: float_qparams_weight_only_qconfig}
    if dtype not in table:
        raise ValueError(f"quantize_dynamic: unknown dtype {dtype!r}; use qint8, float16, bfloat16 or quint8")
    return table[dtype]


def _check_backend(backend: str) -> None:
    if backend not in SUPPORTED_BACKENDS:
        raise ValueError(f"backend: {backend!r} not supported. backend must be one of {list(SUPPORTED_BACKENDS)}")


def get_default_qconfig(backend: str = "x86", version: int = 0) -> QConfig:
    """The default post-training (static) QConfig for ``backend``, PyTorch 2.13's choices.

    x86/fbgemm: HistogramObserver(reduce_range=True) activations, per-channel symmetric qint8 weights;
    qnnpack: HistogramObserver(reduce_range=False), per-tensor symmetric weights; onednn:
    reduce_range=False, per-channel weights.
    """
    _check_backend(backend)
    if version != 0:
        raise ValueError(f"Version number: {version} in get_default_qconfig is not supported. Version number must be 0")
    hist = histogram_observer()
    if backend in ("fbgemm", "x86"):
        return QConfig(activation=hist.with_args(reduce_range=True), weight=_default_per_channel_weight_observer)
    if backend == "qnnpack":
        return QConfig(activation=hist.with_args(reduce_range=False), weight=_default_weight_observer)
    return QConfig(activation=hist.with_args(reduce_range=False), weight=_default_per_channel_weight_observer)


def get_default_qat_qconfig(backend: str = "x86", version: int = 1) -> QConfig:
    """The default QAT QConfig for ``backend``: version 0 uses FakeQuantize, version 1 (default) the
    fused moving-average fake quantize, as in PyTorch 2.13."""
    _check_backend(backend)
    if version not in (0, 1):
        raise ValueError(f"Version number: {version} in get_default_qat_qconfig is not supported. "
                         "Version number must be 0 or 1")
    fq = FakeQuantize if version == 0 else FusedMovingAvgObsFakeQuantize
    per_channel_wt = default_per_channel_weight_fake_quant if version == 0 else default_fused_per_channel_wt_fake_quant
    per_tensor_wt = default_weight_fake_quant if version == 0 else default_fused_wt_fake_quant
    if backend in ("fbgemm", "x86"):
        act = fq.with_args(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255, reduce_range=True)
        return QConfig(activation=act, weight=per_channel_wt)
    if backend == "qnnpack":
        act = fq.with_args(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255, reduce_range=False)
        return QConfig(activation=act, weight=per_tensor_wt)
    act = fq.with_args(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255)
    return QConfig(activation=act, weight=per_channel_wt)


def _symmetric_qnnpack_activation() -> Any:
    return histogram_observer().with_args(dtype=qint8, reduce_range=False, eps=2**-12)


def __getattr__(name: str) -> Any:
    # HistogramObserver-based presets resolve on first access (the observer may load after this module).
    if name == "default_symmetric_qnnpack_qconfig":
        return QConfig(activation=_symmetric_qnnpack_activation(), weight=_weight_observer_range_neg_127_to_127)
    if name == "default_per_channel_symmetric_qnnpack_qconfig":
        return QConfig(activation=_symmetric_qnnpack_activation(),
                       weight=_per_channel_weight_observer_range_neg_127_to_127)
    if name == "default_quint8_weight_qconfig":
        return QConfig(activation=histogram_observer(), weight=MinMaxObserver)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def qconfig_equals(q1: QConfigAny, q2: QConfigAny) -> bool:
    """Whether two QConfigs (or ``None``) build the same observers: factories compare by class and
    arguments, so this is ``==``."""
    return q1 == q2
