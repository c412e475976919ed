"""Where does quantization lose accuracy? Per-layer comparison of a float and a quantized model.

The anchor is PyTorch's numeric debugger (``torch.ao.quantization`` PT2E ``compare_results``): run
both models on the same inputs, capture every module's output, and report the signal-to-quantization
noise ratio (SQNR, ``20 log10(||x_float|| / ||x_float - x_quant||)`` dB, PyTorch's ``compute_sqnr``)
per module path. Outputs are captured by wrapping the modules of a *copy* of each model in recording
modules (:func:`record_calls`); nothing global is patched and the models passed in are not changed.

Compare the quantized model with the float model it came from *after fusion* (``fuse_modules``):
then the paths line up (``block1.conv`` is Conv+BN+ReLU in both).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxquant.module_paths import copy_model, get_submodule, named_modules, set_submodule
from jaxquant.nn.stubs import DeQuantStub, QuantStub, QuantWrapper
from jaxquant.optional_deps import require
from jaxquant.qconfig_mapping import QConfigMapping
from jaxquant.qtensor import QTensor
from jaxquant.quantization_mappings import get_default_static_quant_module_mappings
from jaxquant.transforms import calibrate, convert, prepare


# ----------------------------------------------------------------------------------------------
# Recording module calls


@dataclasses.dataclass
class ModuleCall:
    """One call of a module during a recorded forward: its path, the module, inputs and output."""

    path: str
    module: nnx.Module
    args: tuple
    kwargs: dict
    output: Any


class CallLog:
    """The calls recorded during a forward, in the order they *returned* (children before parents)."""

    def __init__(self) -> None:
        self.calls: list[ModuleCall] = []

    def __hash__(self) -> int:  # static attribute of the recording modules: identity is enough
        return id(self)

    def __eq__(self, other) -> bool:
        return self is other


class _Recorder(nnx.Module):
    """Calls the wrapped module and logs the call; stands in for it on a copy of the model."""

    def __init__(self, module: nnx.Module, path: str, log: CallLog):
        self.module = nnx.data(module)
        self.recorded_path = path
        self.log = log

    def __call__(self, *args, **kwargs):
        out = self.module(*args, **kwargs)
        self.log.calls.append(ModuleCall(self.recorded_path, self.module, args, kwargs, out))
        return out


@contextlib.contextmanager
def record_calls(model: nnx.Module, include: Optional[Callable[[str, nnx.Module], bool]] = None
                 ) -> Iterator[tuple[nnx.Module, CallLog]]:
    """A copy of ``model`` whose modules log their calls, and the log.

    ``include(path, module)`` picks the modules to record (default: all but the root; the root's
    output is what calling the copy returns). Use the copy inside the ``with`` block::

        with record_calls(model) as (recording, log):
            recording(x)
        outputs = {c.path: c.output for c in log.calls}
    """
    log = CallLog()
    recording = copy_model(model)
    chosen = [(p, m) for p, m in named_modules(recording) if p != "" and (include is None or include(p, m))]
    # Deepest first, so a parent's path still resolves once its children are wrapped.
    for path, _ in sorted(chosen, key=lambda item: -item[0].count(".")):
        set_submodule(recording, path, _Recorder(get_submodule(recording, path), path, log))
    yield recording, log


def _as_float(value: Any) -> Optional[np.ndarray]:
    if isinstance(value, QTensor):
        return np.asarray(value.dequantize(), np.float64)
    if isinstance(value, (jax.Array, np.ndarray)) and jnp.issubdtype(value.dtype, jnp.floating):
        return np.asarray(value, np.float64)
    return None


def _captured_outputs(model: nnx.Module, inputs: Any) -> dict[str, list[Any]]:
    with record_calls(model) as (recording, log):
        graphdef, state = nnx.split(recording)

        @jax.jit
        def run(state, x):
            log.calls.clear()
            out = nnx.merge(graphdef, state)(x)
            return out, [c.output for c in log.calls]

        # A fresh jit function traces exactly once, so the log then holds this trace's call order.
        final, outputs = run(state, inputs)
        paths = [c.path for c in log.calls]
    captured: dict[str, list[Any]] = {}
    for path, output in zip(paths, outputs):
        captured.setdefault(path, []).append(output)
    captured.setdefault("", []).append(final)
    return captured


# ----------------------------------------------------------------------------------------------
# Comparison


def compute_sqnr(x: Any, y: Any) -> float:
    """SQNR in dB of ``y`` against the reference ``x``: ``20 log10(||x|| / ||x - y||)`` (PyTorch's
    ``compute_sqnr``); ``inf`` when they are equal, ``-inf`` when ``x`` is all zeros and ``y`` is not."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape:
        raise ValueError(f"compute_sqnr: shapes differ, {x.shape} vs {y.shape}")
    signal, noise = np.linalg.norm(x), np.linalg.norm(x - y)
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return float(20.0 * np.log10(signal / noise))


@dataclasses.dataclass(frozen=True)
class LayerComparison:
    """One module path's float vs quantized outputs."""

    path: str
    float_type: str
    quantized_type: str
    shape: tuple[int, ...]
    sqnr_db: float
    max_abs_error: float
    call_index: int = 0


@dataclasses.dataclass(frozen=True)
class NumericComparison:
    """Per-layer comparison (rows in the order the float model produced them); ``str()`` is a table."""

    layers: tuple[LayerComparison, ...]
    skipped: tuple[tuple[str, str], ...] = ()

    def to_markdown(self) -> str:
        """A markdown table: path, types, output shape, SQNR (dB), max |error|."""
        lines = ["| path | float module | quantized module | output shape | SQNR (dB) | max abs error |",
                 "|---|---|---|---|---:|---:|"]
        for r in self.layers:
            name = r.path or "(model output)"
            if r.call_index:
                name += f" [call {r.call_index}]"
            lines.append(f"| {name} | {r.float_type} | {r.quantized_type} | {list(r.shape)} | "
                         f"{r.sqnr_db:.2f} | {r.max_abs_error:.4g} |")
        return "\n".join(lines)

    def __str__(self) -> str:
        rows = [("path", "float", "quantized", "shape", "SQNR dB", "max|err|")]
        for r in self.layers:
            rows.append((r.path or "(output)", r.float_type, r.quantized_type, "x".join(map(str, r.shape)),
                         f"{r.sqnr_db:.2f}", f"{r.max_abs_error:.4g}"))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        out = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
        out.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(out)

    def sqnr(self) -> dict[str, float]:
        """``{path: SQNR dB}`` (first call of each path)."""
        return {r.path: r.sqnr_db for r in self.layers if r.call_index == 0}

    def plot(self, ax=None):
        """A matplotlib bar chart of SQNR per layer (returns the Figure). Needs ``jaxquant[plot]``."""
        matplotlib = require("matplotlib", "plot", "NumericComparison.plot")

        if ax is None:
            matplotlib.use("Agg", force=False)
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(self.layers)), 4))
        else:
            fig = ax.figure
        names = [r.path or "(output)" for r in self.layers]
        finite = [r.sqnr_db if math.isfinite(r.sqnr_db) else np.nan for r in self.layers]
        ax.bar(range(len(names)), finite, color="tab:blue")
        for i, r in enumerate(self.layers):
            if not math.isfinite(r.sqnr_db):
                ax.annotate("exact" if r.sqnr_db > 0 else "-inf", (i, 0), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
        ax.set_ylabel("SQNR (dB)")
        ax.set_title("float vs quantized, per module output")
        fig.tight_layout()
        return fig


def compare(float_model: nnx.Module, quantized_model: nnx.Module, inputs: Any) -> NumericComparison:
    """Per-layer SQNR and max abs error between two models on the same ``inputs``.

    Args:
      float_model: the float model (ideally after ``fuse_modules``, so paths line up).
      quantized_model: the model from ``convert`` (or a prepared/QAT model).
      inputs: one batch for ``model(inputs)``, e.g. float32 ``(N, 28, 28, 1)``.
    Returns:
      :class:`NumericComparison` with a row for every module path present in both models whose
      outputs are float arrays or QTensors of equal shape (QTensors are dequantized), plus the
      model output (path ``""``). Paths that exist in one model only, or whose outputs cannot be
      compared, are listed in ``skipped`` with the reason.
    """
    float_outputs = _captured_outputs(float_model, inputs)
    quant_outputs = _captured_outputs(quantized_model, inputs)
    float_types = {p: type(m).__name__ for p, m in named_modules(float_model)}
    quant_types = {p: type(m).__name__ for p, m in named_modules(quantized_model)}
    rows, skipped = [], []
    for path, f_list in float_outputs.items():
        q_list = quant_outputs.get(path)
        if q_list is None:
            skipped.append((path, "not called in the quantized model"))
            continue
        for index, (f_out, q_out) in enumerate(zip(f_list, q_list)):
            f, q = _as_float(f_out), _as_float(q_out)
            if f is None or q is None:
                skipped.append((path, "output is not a float array or QTensor"))
                continue
            if f.shape != q.shape:
                skipped.append((path, f"shapes differ: {f.shape} vs {q.shape}"))
                continue
            rows.append(LayerComparison(path, float_types.get(path, "?"), quant_types.get(path, "?"),
                                        tuple(f.shape), compute_sqnr(f, q),
                                        float(np.max(np.abs(f - q))) if f.size else 0.0, index))
    skipped.extend((p, "not called in the float model") for p in quant_outputs if p not in float_outputs)
    # Model output last, as the table reads top to bottom through the network.
    rows.sort(key=lambda r: r.path == "")
    return NumericComparison(tuple(rows), tuple(skipped))


# ----------------------------------------------------------------------------------------------
# Sensitivity analysis


@dataclasses.dataclass(frozen=True)
class SensitivityResult:
    """The metric with each layer quantized alone (everything else float)."""

    float_metric: float
    per_layer: dict[str, float]

    def deltas(self) -> dict[str, float]:
        """``{path: metric(layer quantized) - metric(float)}``."""
        return {p: m - self.float_metric for p, m in self.per_layer.items()}

    def ranked(self, higher_is_better: bool = True) -> list[tuple[str, float]]:
        """Layers ordered from most to least harmful to quantize (by delta)."""
        return sorted(self.deltas().items(), key=lambda kv: kv[1] if higher_is_better else -kv[1])

    def to_markdown(self, higher_is_better: bool = True) -> str:
        lines = [f"float metric: {self.float_metric:.6g}", "", "| layer quantized alone | metric | delta |",
                 "|---|---:|---:|"]
        for path, delta in self.ranked(higher_is_better):
            lines.append(f"| {path} | {self.per_layer[path]:.6g} | {delta:+.4g} |")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()


def quantizable_layers(float_model: nnx.Module, mapping: Optional[dict] = None) -> list[str]:
    """Paths of the modules ``convert`` would quantize (Linear, Conv, fused ConvReLU, ...), outermost only."""
    mapping = get_default_static_quant_module_mappings() if mapping is None else mapping
    found: list[str] = []
    for path, module in named_modules(float_model):
        if path and type(module) in mapping and not isinstance(module, (QuantStub, DeQuantStub)):
            if not any(path.startswith(p + ".") for p in found):
                found.append(path)
    return found


def sensitivity_analysis(float_model: nnx.Module, qconfig: Any, calibration_data: Iterable[Any],
                         eval_fn: Callable[[nnx.Module], float], *, layers: Optional[Sequence[str]] = None,
                         forward: Optional[Callable[[nnx.Module, Any], Any]] = None) -> SensitivityResult:
    """Quantize one layer at a time and measure ``eval_fn`` to decide which layers to keep float.

    For each layer path, a copy of ``float_model`` gets that layer wrapped in a ``QuantWrapper``
    (quantize its input, dequantize its output) and a ``QConfigMapping`` with ``qconfig`` for that
    path and ``None`` globally; it is prepared, calibrated on ``calibration_data`` and converted.

    Args:
      float_model: the float model (fused as you will deploy it). Not modified.
      qconfig: the QConfig to try on each layer.
      calibration_data: batches for ``jaxquant.calibrate`` (re-iterated for every layer: a list).
      eval_fn: ``model -> float`` metric (accuracy, SQNR of the output, ...).
      layers: paths to try (default :func:`quantizable_layers`).
      forward: calibration forward ``(model, batch) -> output``; default ``model(batch)``.
    Returns:
      :class:`SensitivityResult` with the float metric and the metric per singly-quantized layer.
    """
    calibration_data = list(calibration_data)
    layers = quantizable_layers(float_model) if layers is None else list(layers)
    float_metric = float(eval_fn(float_model))
    per_layer = {}
    for path in layers:
        candidate = copy_model(float_model)
        set_submodule(candidate, path, QuantWrapper(get_submodule(candidate, path)))
        mapping = QConfigMapping().set_global(None).set_module_name(path, qconfig)
        prepared = prepare(candidate, mapping)
        calibrate(prepared, calibration_data, forward or (lambda m, b: m(b)), progress=False)
        metric = float(eval_fn(convert(prepared)))
        if not math.isfinite(metric):
            raise ValueError(f"sensitivity_analysis: eval_fn returned {metric} with '{path}' quantized")
        per_layer[path] = metric
    return SensitivityResult(float_metric, per_layer)
