"""The duck-typed contracts of observers and fake quants, as ``typing.Protocol``s: what prepare, convert,
the QAT modules and the Linen interceptor rely on, checked with ``isinstance`` instead of ``hasattr``
probes. Any class with these methods qualifies (jaxquant's own, or a user's), as in PyTorch."""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax


@runtime_checkable
class Observer(Protocol):
    """A frozen, hashable config over a state pytree: ``init`` -> ``update`` per batch ->
    ``calculate_qparams``; ``merge`` combines states that saw different data."""

    def init(self, example_or_shape: Any = None) -> Any: ...

    def update(self, state: Any, x: jax.Array) -> Any: ...

    def calculate_qparams(self, state: Any) -> tuple[jax.Array, jax.Array]: ...


@runtime_checkable
class FakeQuant(Protocol):
    """A fake-quantize config: ``init`` -> ``apply(state, x) -> (fake-quantized x, new state)``, and
    ``calculate_qparams`` of the qparams convert stores."""

    def init(self, example_or_shape: Any = None) -> Any: ...

    def apply(self, state: Any, x: jax.Array) -> tuple[jax.Array, Any]: ...

    def calculate_qparams(self, state: Any) -> tuple[jax.Array, jax.Array]: ...
