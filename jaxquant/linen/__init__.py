"""Quantization workflows for Flax Linen models (static PTQ, dynamic, QAT, BatchNorm folding).

Unmodified ``@nn.compact`` models are run under an ``nn.intercept_methods`` interceptor that quantizes
supported layers (``nn.Dense``, ``nn.DenseGeneral``, ``nn.Einsum``, ``nn.Conv``, ``nn.ConvTranspose``,
``nn.Embed``, the Dense layers of ``nn.LSTMCell`` / ``nn.GRUCell``, and this package's ``QuantStub`` /
``FloatFunctional``) per layer; state lives in the ``quant_stats`` and ``quant_params`` collections
(and ``quant_cache``: weights packed for the native backend at convert time).
See docs/linen.md.
"""
from jaxquant.linen.fusion import fuse_modules
from jaxquant.linen.model import QuantizedModel
from jaxquant.linen.names import QUANT_CACHE, QUANT_PARAMS, QUANT_STATS
from jaxquant.linen.qconfig_mappings import get_default_qat_qconfig_mapping, get_default_qconfig_mapping
from jaxquant.linen.stubs import DeQuantStub, FloatFunctional, QuantStub
from jaxquant.linen.transforms import calibrate, convert, pack_native, prepare, prepare_qat, quantize_dynamic

__all__ = [
    "QUANT_CACHE", "QUANT_PARAMS", "QUANT_STATS", "QuantizedModel", "DeQuantStub", "FloatFunctional", "QuantStub",
    "calibrate", "convert", "fuse_modules", "get_default_qat_qconfig_mapping", "get_default_qconfig_mapping",
    "pack_native", "prepare", "prepare_qat", "quantize_dynamic",
]
