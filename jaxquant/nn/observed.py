"""``Observed``: a float module whose output is watched by an observer, as ``prepare`` leaves it.

``prepare`` wraps each module that will become a quantized module in an ``Observed``: the float
module runs unchanged and its output goes through ``activation_post_process`` (an
:class:`~jaxquant.nn.observer_module.ObserverModule`). The qconfig that applied is kept (static) so
``convert`` knows how to quantize the weights.
"""
from __future__ import annotations

from typing import Any, Optional

from flax import nnx

from jaxquant.nn.observer_module import ObserverModule


class Observed(nnx.Module):
    """``activation_post_process(module(*args))``; ``activation_post_process`` may be ``None``
    (a ``DeQuantStub`` marked for conversion has nothing to observe)."""

    def __init__(self, module: nnx.Module, activation_post_process: Optional[ObserverModule], qconfig: Any):
        self.module = module
        self.activation_post_process = nnx.data(activation_post_process)
        self.qconfig = qconfig

    def __call__(self, *args, **kwargs):
        y = self.module(*args, **kwargs)
        if self.activation_post_process is not None:
            y = self.activation_post_process(y)
        return y
