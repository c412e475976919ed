"""Module fusion before quantization: BatchNorm folding and Conv/Linear/BN/ReLU pattern fusion."""
from jaxquant.fusion.bn_folding import fuse_conv_bn_weights, fuse_linear_bn_weights
from jaxquant.fusion.fuse_modules import (
    DEFAULT_OP_LIST_TO_FUSER_METHOD,
    fuse_conv_bn,
    fuse_conv_bn_eval,
    fuse_conv_bn_relu,
    fuse_convtranspose_bn,
    fuse_known_modules,
    fuse_linear_bn,
    fuse_linear_bn_eval,
    fuse_modules,
    fuse_modules_qat,
    get_fuser_method,
)

__all__ = [
    "DEFAULT_OP_LIST_TO_FUSER_METHOD",
    "fuse_conv_bn",
    "fuse_conv_bn_eval",
    "fuse_conv_bn_relu",
    "fuse_conv_bn_weights",
    "fuse_convtranspose_bn",
    "fuse_known_modules",
    "fuse_linear_bn",
    "fuse_linear_bn_eval",
    "fuse_linear_bn_weights",
    "fuse_modules",
    "fuse_modules_qat",
    "get_fuser_method",
]
