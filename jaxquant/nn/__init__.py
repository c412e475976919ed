"""Flax NNX modules: float building blocks, fused (``intrinsic``), observed, ``quantized`` (static),
``dynamic`` and ``qat`` ones. The submodules are namespaces, like ``torch.ao.nn.quantized``."""
from jaxquant.nn import dynamic, intrinsic, qat, quantized
from jaxquant.nn.activations import (
    ELU,
    GELU,
    Flatten,
    Hardsigmoid,
    Hardswish,
    Identity,
    LeakyReLU,
    ReLU,
    ReLU6,
    Sigmoid,
    Softmax,
    Tanh,
    flatten,
    reshape,
)
from jaxquant.nn.functional_modules import FloatFunctional
from jaxquant.nn.observer_module import ObserverModule
from jaxquant.nn.pooling import (
    AdaptiveAvgPool2d,
    AvgPool2d,
    MaxPool2d,
    adaptive_avg_pool2d,
    avg_pool2d,
    max_pool2d,
)
from jaxquant.nn.stubs import DeQuantStub, QuantStub, QuantWrapper
from jaxquant.nn.variables import QuantCache, QuantParams, QuantStats
