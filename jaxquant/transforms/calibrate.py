"""``calibrate``: run an observed model over data with one compiled step, updating observer state."""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import jax
from flax import nnx

from jaxquant.module_paths import named_modules
from jaxquant.nn.observer_module import ObserverModule
from jaxquant.nn.variables import QuantStats


def _default_forward(model: nnx.Module, batch: Any) -> Any:
    return model(*batch) if isinstance(batch, tuple) else model(batch)


def observer_modules(model: nnx.Module) -> list[tuple[str, ObserverModule]]:
    """Every ``ObserverModule`` in ``model`` with its dotted path."""
    return [(path, m) for path, m in named_modules(model) if isinstance(m, ObserverModule)]


def check_observers(model: nnx.Module) -> None:
    """Raise if any observer saw NaN/Inf or no data, naming its module path (host-side check)."""
    from jaxquant.observers import check_observer_state

    for path, module in observer_modules(model):
        check_observer_state(module.observer, module.stats.get_value(), name=path)


def make_calibration_step(model: nnx.Module, forward: Callable[[nnx.Module, Any], Any] = _default_forward):
    """A jitted pure step ``(stats, batch) -> stats`` over the model's split state.

    This is what :func:`calibrate` runs; use it directly to write your own loop::

        graphdef, stats, rest = nnx.split(model, QuantStats, ...)
        step = make_calibration_step(model)
        for batch in batches:
            stats = step(stats, batch)
        nnx.update(model, stats)

    ``stats`` is the ``QuantStats`` state (a pytree); the float parameters are closed over as
    constants of the compiled step, so only the statistics move between calls.
    """
    graphdef, _, rest = nnx.split(model, QuantStats, ...)

    @jax.jit
    def step(stats, batch):
        m = nnx.merge(graphdef, stats, rest)
        forward(m, batch)
        return nnx.state(m, QuantStats)

    return step


def calibrate(
    model: nnx.Module,
    batches: Iterable[Any],
    forward: Callable[[nnx.Module, Any], Any] = _default_forward,
    *,
    progress: bool = True,
    num_batches: Optional[int] = None,
) -> nnx.Module:
    """Feed representative data through an observed model (``prepare``'s output), in place.

    One ``jax.jit``-compiled step is reused for every batch (batches of a new shape compile once
    more); observer state is carried as a pytree and written back at the end.

    Args:
      model: the observed model; put BatchNorm/Dropout in eval mode first (``model.eval()``).
      batches: an iterable of inputs: an array ``(N, ...)`` or a tuple of positional args per batch.
      forward: ``forward(model, batch)`` if the model is not called as ``model(batch)``.
      progress: show a tqdm progress bar.
      num_batches: stop after this many batches (also the progress bar's total).
    Returns:
      ``model``, with updated observer statistics.
    Raises:
      ValueError naming the observer's module path if the data held NaN/Inf, or if an observer saw
      nothing (e.g. an empty iterable, or a branch the data never reached).
    """
    if not observer_modules(model):
        raise ValueError("calibrate: the model has no observers; call prepare(model, qconfig) first")
    step = make_calibration_step(model, forward)
    stats = nnx.state(model, QuantStats)
    total = num_batches if num_batches is not None else (len(batches) if hasattr(batches, "__len__") else None)
    iterator = iter(batches)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, total=total, desc="calibrate", leave=False)
    for i, batch in enumerate(iterator):
        if num_batches is not None and i >= num_batches:
            break
        stats = step(stats, batch)
    nnx.update(model, stats)
    check_observers(model)
    return model
