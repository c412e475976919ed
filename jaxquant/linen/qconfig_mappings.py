"""Default QConfigMappings with Linen's layer types (PyTorch 2.13's defaults, as
:func:`jaxquant.get_default_qconfig_mapping` gives for NNX)."""
from __future__ import annotations

import flax.linen as nn

from jaxquant.fake_quant.presets import default_weight_fake_quant
from jaxquant.qconfig import QConfig, _default_weight_observer
from jaxquant.qconfig_mapping import QConfigMapping, default_qconfig_mapping


def _with_linen_types(mapping: QConfigMapping, is_qat: bool, backend: str) -> QConfigMapping:
    glob = mapping.global_qconfig
    if backend in ("fbgemm", "x86"):
        # per-channel weights are not supported for transposed convolutions on fbgemm/x86 (pytorch#47535)
        weight = default_weight_fake_quant if is_qat else _default_weight_observer
        mapping.set_object_type(nn.ConvTranspose, QConfig(activation=glob.activation, weight=weight))
    return mapping


def get_default_qconfig_mapping(backend: str = "x86", version: int = 0) -> QConfigMapping:
    """PyTorch's default PTQ mapping for ``backend`` plus Linen's ``nn.ConvTranspose`` rule (per-tensor
    weights on x86/fbgemm). ``nn.Embed`` stays float unless given ``float_qparams_weight_only_qconfig``."""
    return _with_linen_types(default_qconfig_mapping(False, backend, version), False, backend)


def get_default_qat_qconfig_mapping(backend: str = "x86", version: int = 1) -> QConfigMapping:
    """PyTorch's default QAT mapping for ``backend`` plus Linen's ``nn.ConvTranspose`` rule."""
    return _with_linen_types(default_qconfig_mapping(True, backend, version), True, backend)
