"""Quantization-aware training modules (``torch.ao.nn.qat`` and ``torch.ao.nn.intrinsic.qat``):
float Params trained through fake quantization, converted by ``convert`` to the int8 modules."""
from jaxquant.nn.qat.conv import Conv, ConvBn, ConvBnReLU, ConvReLU, conv_with_kernel
from jaxquant.nn.qat.fake_quant_module import FakeQuantModule
from jaxquant.nn.qat.linear import Linear, LinearBn, LinearReLU

__all__ = ["Conv", "ConvBn", "ConvBnReLU", "ConvReLU", "FakeQuantModule", "Linear", "LinearBn", "LinearReLU",
           "conv_with_kernel"]
