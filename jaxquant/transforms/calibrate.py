"""``calibrate``: run an observed model over data with one compiled step, updating observer state."""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import os

import jax
import numpy as np
from flax import nnx
from flax.errors import TraceContextError

from jaxquant.core.batches import iterate_batches
from jaxquant.module_paths import named_modules
from jaxquant.nn.observer_module import ObserverModule
from jaxquant.nn.variables import QuantStats
from jaxquant.observers import check_observer_state
from jaxquant.transforms.checks import check_eval_mode, check_nnx_model


def _default_forward(model: nnx.Module, batch: Any) -> Any:
    return model(*batch) if isinstance(batch, tuple) else model(batch)


def observer_modules(model: nnx.Module) -> list[tuple[str, ObserverModule]]:
    """Every ``ObserverModule`` in ``model`` with its dotted path."""
    return [(path, m) for path, m in named_modules(model) if isinstance(m, ObserverModule)]


def check_observers(model: nnx.Module) -> None:
    """Raise if any observer saw NaN/Inf or no data, naming its module path (host-side check)."""
    for path, module in observer_modules(model):
        check_observer_state(module.observer, module.stats.get_value(), name=path)


class CalibrationShapeError(ValueError, TypeError):
    """A calibration batch does not fit a layer of the model (raised while tracing the step).

    Subclasses both ``ValueError`` and ``TypeError``: JAX reports operand shape mismatches as
    ``TypeError``, and code catching that keeps working."""


_JAXQUANT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _shape_of(value: Any) -> Any:
    shapes = jax.tree.map(lambda a: tuple(np.shape(a)), value)
    return shapes[0] if isinstance(shapes, tuple) and len(shapes) == 1 else shapes


def _failing_layer_error(model: nnx.Module, batch: Any, error: Exception) -> Optional[CalibrationShapeError]:
    """If ``error`` was raised by JAX/flax inside one of ``model``'s modules (e.g. a dot_general
    of mismatched shapes), a ``CalibrationShapeError`` naming that module's path, its input and
    weight shapes; ``None`` for errors jaxquant raised itself (they already say where)."""
    frames = []
    tb = error.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    if not frames or os.path.abspath(frames[-1].f_code.co_filename).startswith(_JAXQUANT_DIR):
        return None
    paths = {id(m): p for p, m in named_modules(model)}
    hits = [f for f in frames if id(f.f_locals.get("self")) in paths]
    if not hits:
        return None
    frame = hits[-1]  # innermost module on the stack: the one whose op failed
    module = frame.f_locals["self"]
    code = frame.f_code
    detail = []
    if code.co_argcount > 1 and hasattr(frame.f_locals.get(code.co_varnames[1]), "shape"):
        detail.append(f"its input has shape {tuple(frame.f_locals[code.co_varnames[1]].shape)}")
    for name in ("kernel", "embedding", "scale"):
        variable = getattr(module, name, None)
        if isinstance(variable, nnx.Variable) and hasattr(variable.get_value(), "shape"):
            detail.append(f"its {name} has shape {tuple(variable.get_value().shape)}")
            break
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return CalibrationShapeError(
        f"the batch (shape {_shape_of(batch)}) does not fit layer '{paths[id(module)] or '<model>'}' "
        f"({type(module).__name__}){': ' + ', '.join(detail) if detail else ''}. Calibration batches must "
        f"have the shapes the model takes at inference. ({type(error).__name__}: {first_line})"
    )


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
        try:
            forward(m, batch)
        except TraceContextError as e:
            # a module outside QuantStats (BatchNorm statistics, Dropout's RNG count) tried to
            # change its state: name it instead of flax's trace-level message
            check_eval_mode(m, "calibrate")
            raise ValueError(f"calibrate: the model changed state other than observer statistics while "
                             f"calibrating ({e}); only QuantStats may change. Put the model in eval mode "
                             "(model.eval()) and check that its forward does not update other variables") from e
        except (TypeError, ValueError) as e:
            if isinstance(batch, tuple) and len(batch) > 1 and forward is _default_forward \
                    and "positional argument" in str(e):
                raise TypeError(
                    f"calibrate: a batch is a tuple of {len(batch)} arrays (shapes {_shape_of(batch)}), which "
                    f"calibrate passes as {len(batch)} positional arguments to the model ({e}). If batches are "
                    "(inputs, labels) pairs, pass the inputs only, e.g. (x for x, _ in batches), or "
                    "forward=lambda model, batch: model(batch[0])") from e
            # at trace time only: name the layer a shape error came from (no cost per batch)
            layer_error = _failing_layer_error(m, batch, e)
            if layer_error is None:
                raise
            raise layer_error from e
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
      CalibrationShapeError (a ValueError and TypeError) naming the batch and the layer whose op
      failed when a batch does not fit the model (e.g. the wrong number of features).
    """
    check_nnx_model(model, "calibrate")
    if not observer_modules(model):
        raise ValueError("calibrate: the model has no observers; call prepare(model, qconfig) first")
    step = make_calibration_step(model, forward)
    stats = nnx.state(model, QuantStats)
    for i, batch in iterate_batches(batches, num_batches, progress, "calibrate"):
        try:
            stats = step(stats, batch)
        except CalibrationShapeError as e:
            raise CalibrationShapeError(f"calibrate: batch {i}: {e}") from e.__cause__
    nnx.update(model, stats)
    check_observers(model)
    return model
