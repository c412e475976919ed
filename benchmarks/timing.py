"""Shared timing helpers for the benchmark scripts.

The machines are noisy (+-20-30 % between runs), so every comparison is made inside one
process, interleaving the candidates round by round, and reported as medians and as
*paired* ratios (the ratio is taken within each round, then the median over rounds), which
cancels most of the slow drift of a shared machine.

Each timed sample is preceded by one untimed call of the same candidate. Without it, a
candidate would always start with the caches its neighbour left behind: a 64 MB float32
4096x4096 weight evicts the 16 MB int8 one from the 32 MB L3, and the int8 dot then streams
from DRAM (about 2x slower) although a layer served back to back keeps its weight in cache.
``warm_sample=False`` measures that cold case.

Typical use::

    from timing import time_interleaved, median_ms, paired_ratio, markdown_table, write_json
    t = time_interleaved({"jax_f32": lambda: f(x), "jax_int8": lambda: g(x)}, repeats=15)
    print(median_ms(t["jax_int8"]), paired_ratio(t, "jax_f32", "jax_int8"))
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Mapping, Sequence

__all__ = [
    "block", "time_interleaved", "median_ms", "paired_ratio", "markdown_table", "write_json",
    "environment", "import_torch",
]


def import_torch(threads: int = 2) -> Any:
    """PyTorch set up for a side-by-side CPU comparison, or ``None`` when it is not installed.

    PyTorch's OpenMP threads spin-wait between calls by default, stealing the cores from XLA's
    threads when the two libraries are interleaved; passive waiting keeps both honest. That policy
    is read when torch loads its OpenMP runtime, so call this before anything imports torch. Also
    sets ``threads`` intra-op threads and the x86 quantized engine (fbgemm's successor).
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import torch
    except ImportError:  # the torch columns become n/a
        return None
    torch.set_num_threads(threads)
    torch.backends.quantized.engine = "x86"
    return torch


def block(out: Any) -> Any:
    """Wait until every JAX array in ``out`` is computed (torch/numpy results are synchronous)."""
    try:
        import jax
        return jax.block_until_ready(out)
    except ImportError:  # pragma: no cover - jax is a hard dependency of the project
        return out


def _calls_per_sample(fn: Callable[[], Any], min_sample_s: float) -> int:
    t0 = time.perf_counter()
    block(fn())
    dt = time.perf_counter() - t0
    if dt <= 0:
        return 1000
    return max(1, min(1000, int(min_sample_s / dt)))


def time_interleaved(
    fns: Mapping[str, Callable[[], Any]],
    *,
    repeats: int = 15,
    warmup: int = 2,
    min_sample_s: float = 0.002,
    warm_sample: bool = True,
) -> dict[str, list[float]]:
    """Time several zero-argument callables interleaved in one process.

    Each callable is warmed up (compiled) ``warmup`` times, then ``repeats`` rounds are run;
    within a round every callable is timed once, in an order rotated each round so none
    always runs right after the same neighbour. A sample is the mean over enough back-to-back
    calls to last ``min_sample_s`` (so microsecond kernels are not dominated by timer noise),
    after one untimed call when ``warm_sample`` (see the module docstring).

    Returns:
      ``{name: [seconds per call, one per round]}``.
    """
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            block(fns[name]())
    inner = {name: _calls_per_sample(fns[name], min_sample_s) for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            fn, n = fns[name], inner[name]
            if warm_sample:
                block(fn())
            t0 = time.perf_counter()
            for _ in range(n):
                out = fn()
            block(out)
            times[name].append((time.perf_counter() - t0) / n)
    return times


def median_ms(samples: Sequence[float]) -> float:
    """Median of per-call times given in seconds, in milliseconds."""
    return 1e3 * statistics.median(samples)


def paired_ratio(times: Mapping[str, Sequence[float]], numerator: str, denominator: str) -> float:
    """Median over rounds of ``times[numerator][r] / times[denominator][r]``.

    With numerator = baseline and denominator = candidate this is the candidate's speed-up.
    """
    a, b = times[numerator], times[denominator]
    return statistics.median(x / y for x, y in zip(a, b))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != v:
            return "n/a"
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Render dict rows as a GitHub markdown table (floats to 3 significant digits); the columns are
    every key of any row, in order of first appearance, unless given."""
    if not rows:
        return ""
    columns = list(columns or dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    """Versions and machine facts worth keeping next to any timing."""
    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "ld_preload": os.environ.get("LD_PRELOAD", ""),
    }
    for mod in ("jax", "jaxlib", "torch", "numpy"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - an absent optional package is just not reported
            pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    env["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return env


def write_json(path: str, results: Any, **extra: Any) -> None:
    """Write ``{"environment": ..., "results": results, **extra}`` to ``path`` (folders created)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"environment": environment(), "results": results, **extra}, f, indent=2)
