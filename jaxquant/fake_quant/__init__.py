"""Fake quantization: straight-through and learnable (LSQ) functions, FakeQuantize configs, presets."""
from typing import Any

from jaxquant.fake_quant import presets as _presets
from jaxquant.fake_quant.fake_quantize import (
    FakeQuantize,
    FakeQuantizeBase,
    FakeQuantizeState,
    FixedQParamsFakeQuantize,
    FusedMovingAvgObsFakeQuantize,
    Identity,
    disable_fake_quant,
    disable_observer,
    enable_fake_quant,
    enable_observer,
    fused_choose_qparams,
    with_args,
)
from jaxquant.fake_quant.functional import (
    fake_quantize_per_channel_affine,
    fake_quantize_per_tensor_affine,
)
from jaxquant.fake_quant.learnable import (
    LearnableFakeQuantize,
    LearnableFakeQuantizeState,
    fake_quantize_learnable_per_channel_affine,
    fake_quantize_learnable_per_tensor_affine,
)
from jaxquant.fake_quant.presets import (
    default_affine_fixed_qparams_fake_quant,
    default_dynamic_fake_quant,
    default_embedding_fake_quant,
    default_embedding_fake_quant_4bit,
    default_fake_quant,
    default_fixed_qparams_range_0to1_fake_quant,
    default_fixed_qparams_range_neg1to1_fake_quant,
    default_fused_act_fake_quant,
    default_fused_per_channel_wt_fake_quant,
    default_fused_wt_fake_quant,
    default_per_channel_weight_fake_quant,
    default_symmetric_fixed_qparams_fake_quant,
    default_weight_fake_quant,
    fused_per_channel_wt_fake_quant_range_neg_127_to_127,
    fused_wt_fake_quant_range_neg_127_to_127,
)


def __getattr__(name: str) -> Any:
    if name == "default_histogram_fake_quant":
        return getattr(_presets, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
