"""``QuantizedModel``: a Linen module plus the workflow stage it is in; ``init``/``apply`` run the module
under the jaxquant interceptor. A frozen, explicit value: nothing is patched, and the variables go in
and out as usual (``apply(variables, x, mutable=['quant_stats'])``)."""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn

from jaxquant.linen.interceptor import QuantInterceptor, Record


@dataclasses.dataclass(frozen=True, eq=False)
class QuantizedModel:
    """A Linen module in one stage of a jaxquant workflow.

    Attributes:
      module: the user's unmodified Linen module.
      mode: ``"float"`` (only fused BatchNorms differ from ``module``), ``"observe"`` (after
        :func:`prepare`), ``"qat"`` (after :func:`prepare_qat`), ``"static"`` (after :func:`convert`),
        ``"dynamic"`` (after :func:`quantize_dynamic`).
      qconfig_mapping: which layers are quantized and how (keys: dotted Linen paths and Linen types).
      fused: dotted paths of BatchNorms folded into the layer before them (they act as identity).
      reduce_range, per_token: dynamic-activation options (PyTorch's defaults: 7-bit, per tensor).
    """

    module: nn.Module
    mode: str = "float"
    qconfig_mapping: Any = None
    fused: frozenset = frozenset()
    reduce_range: bool = True
    per_token: Optional[bool] = None

    def replace(self, **changes: Any) -> "QuantizedModel":
        return dataclasses.replace(self, **changes)

    def interceptor(self, record: Optional[Record] = None) -> QuantInterceptor:
        return QuantInterceptor(self, record)

    def init(self, rngs: Any, *args: Any, **kwargs: Any) -> Any:
        """``module.init`` under the interceptor (observer / fake-quant state is created, not updated)."""
        with nn.intercept_methods(self.interceptor()):
            return self.module.init(rngs, *args, **kwargs)

    def apply(self, variables: Any, *args: Any, **kwargs: Any) -> Any:
        """``module.apply`` under the interceptor; pass ``mutable=['quant_stats']`` to calibrate / train QAT."""
        with nn.intercept_methods(self.interceptor()):
            return self.module.apply(variables, *args, **kwargs)

    def __call__(self, variables: Any, *args: Any, **kwargs: Any) -> Any:
        return self.apply(variables, *args, **kwargs)
