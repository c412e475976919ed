"""Flax NNX modules: float building blocks, fused (``intrinsic``), observed, ``quantized`` (static),
``dynamic`` and ``qat`` ones. The submodules are namespaces, like ``torch.ao.nn.quantized``, and load on
first use (PEP 562, as ``torch.ao.nn`` does): so the modules of one can import another's at module level
without the package's own ``__init__`` closing a cycle."""
import importlib
from jaxquant.nn.activations import (
    ELU,
    Flatten,
    GELU,
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

_SUBPACKAGES = ("dynamic", "intrinsic", "qat", "quantized")


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list:
    return sorted(set(globals()) | set(_SUBPACKAGES))
