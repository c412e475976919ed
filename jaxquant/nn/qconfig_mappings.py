"""Default QConfigMappings with the NNX front end's module types (PyTorch 2.13's
``get_default_qconfig_mapping``; :mod:`jaxquant.linen.qconfig_mappings` is Linen's)."""
from __future__ import annotations

from jaxquant.nn.activations import Hardsigmoid, Sigmoid, Softmax, Tanh
from jaxquant.qconfig_mapping import QConfigMapping, default_qconfig_mapping

FIXED_QPARAMS_MODULES = {"hardsigmoid": Hardsigmoid, "sigmoid": Sigmoid, "softmax": Softmax, "tanh": Tanh}


def get_default_qconfig_mapping(backend: str = "x86", version: int = 0) -> QConfigMapping:
    """The default post-training QConfigMapping for ``backend`` (PyTorch 2.13's): the backend's
    default QConfig globally, fixed qparams for sigmoid/hardsigmoid/softmax ([0, 1]) and tanh
    ([-1, 1]), per-tensor weights for ConvTranspose on x86/fbgemm, float weights for LayerNorm."""
    return default_qconfig_mapping(False, backend, version, FIXED_QPARAMS_MODULES)


def get_default_qat_qconfig_mapping(backend: str = "x86", version: int = 1) -> QConfigMapping:
    """The default QAT QConfigMapping for ``backend`` (fixed-qparams ops get FixedQParamsFakeQuantize)."""
    return default_qconfig_mapping(True, backend, version, FIXED_QPARAMS_MODULES)
