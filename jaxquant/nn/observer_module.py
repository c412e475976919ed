"""``ObserverModule``: an observer config and its state, as an NNX module (PyTorch's
``activation_post_process``).

Calling it on a float array updates the statistics (a pure ``observer.update`` whose result is
written back into a :class:`~jaxquant.nn.variables.QuantStats` variable) and returns the input
unchanged, so it can sit after any layer. Under ``nnx.jit``, or ``jax.jit`` over split state, the
update is traced once and reused for every batch.
"""
from __future__ import annotations

from typing import Any

import jax
from flax import nnx
from flax.errors import TraceContextError

from jaxquant.core.qparams import calculate_qparams
from jaxquant.nn.variables import QuantStats
from jaxquant.observers import check_observer_state


class ObserverModule(nnx.Module):
    """Holds ``observer`` (a frozen, hashable config) and ``stats`` (its state pytree)."""

    def __init__(self, observer: Any, example_or_shape: Any = None):
        self.observer = observer
        self.stats = QuantStats(observer.init(example_or_shape))

    def __call__(self, x: jax.Array) -> jax.Array:
        state = self.observer.update(self.stats.get_value(), x)
        try:
            self.stats.set_value(state)
        except TraceContextError as e:
            # The model was closed over by jax.jit/vmap/grad: its QuantStats belong to the outer
            # trace and cannot be written from this one (flax's own message does not say what to do).
            raise ValueError(
                f"a prepared model's observer ({type(self.observer).__name__}) was called inside jax.jit (or "
                "vmap/grad) with the model closed over, so its statistics cannot be updated. Calibrate with "
                "jaxquant.calibrate(model, batches) (one jitted step), call it through nnx.jit(lambda m, x: "
                "m(x))(model, x), or split the state yourself (jaxquant.make_calibration_step)") from e
        return x

    def calculate_qparams(self) -> tuple[jax.Array, jax.Array]:
        """``(scale float32, zero_point int32)`` from the statistics seen so far."""
        return calculate_qparams(self.observer, self.stats.get_value())

    @property
    def dtype(self):
        return self.observer.dtype

    def checked_qparams(self, path: str) -> tuple[jax.Array, jax.Array]:
        """Concrete qparams for ``convert``; raises naming ``path`` if the observer saw no data or NaN/Inf."""
        check_observer_state(self.observer, self.stats.get_value(), name=path)
        return self.calculate_qparams()
