"""Static quantized modules: what ``convert`` puts in place of observed float modules."""
from jaxquant.nn.quantized.conv import Conv
from jaxquant.nn.quantized.dropout import Dropout
from jaxquant.nn.quantized.float_ops import (
    ELU,
    GELU,
    BatchNorm,
    BNReLU,
    ConvTranspose,
    FloatOpQuantized,
    GroupNorm,
    Hardswish,
    InstanceNorm,
    LayerNorm,
    LeakyReLU,
)
from jaxquant.nn.quantized.functional import QFunctional
from jaxquant.nn.quantized.linear import Linear
from jaxquant.nn.quantized.stubs import DeQuantize, Quantize
