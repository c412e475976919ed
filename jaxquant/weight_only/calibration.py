"""Per-layer input statistics for GPTQ / AWQ / SmoothQuant, from one jit-compiled calibration pass.

Every selected ``nnx.Linear`` / ``nnx.LinearGeneral`` is wrapped (on a copy of the model) by a
recorder that accumulates, in ``QuantStats`` variables, over the flattened inputs ``X`` ``(rows, K)``:

* ``H = sum X^T X`` (``(K, K)``; GPTQ's Hessian is ``2 H / rows``, AWQ's loss uses it too),
* ``sum |X|`` per input channel (AWQ's activation magnitude ``s_X``),
* ``max |X|`` per input channel (SmoothQuant's ``max |X_j|``),
* the first ``sample_rows`` rows seen (SmoothQuant's alpha search),
* the row count.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxquant.module_paths import copy_model, named_modules, set_submodule
from jaxquant.nn.variables import QuantStats

__all__ = ["LinearStats", "collect_linear_stats", "linear_paths"]


@dataclasses.dataclass(frozen=True)
class LinearStats:
    """Input statistics of one linear layer (numpy float64 where precision matters).

    Attributes:
      xtx: ``(K, K)`` ``sum X^T X`` (float32; GPTQ/AWQ convert per layer).
      abs_mean: ``(K,)`` mean ``|X|`` per input channel.
      abs_max: ``(K,)`` max ``|X|`` per input channel.
      sample: ``(S, K)`` float32, the first rows seen.
      rows: number of input rows accumulated.
    """

    xtx: np.ndarray
    abs_mean: np.ndarray
    abs_max: np.ndarray
    sample: np.ndarray
    rows: int


class _Recorder(nnx.Module):
    def __init__(self, inner: nnx.Module, k: int, sample_rows: int):
        self.inner = inner
        self.xtx = QuantStats(jnp.zeros((k, k), jnp.float32))
        self.abs_sum = QuantStats(jnp.zeros((k,), jnp.float32))
        self.abs_max = QuantStats(jnp.zeros((k,), jnp.float32))
        self.sample = QuantStats(jnp.zeros((sample_rows, k), jnp.float32))
        self.rows = QuantStats(jnp.zeros((), jnp.int32))
        self.k = k

    def __call__(self, x):
        x2 = jnp.asarray(x, jnp.float32).reshape(-1, self.k)
        self.xtx.set_value(self.xtx.get_value() + x2.T @ x2)
        a = jnp.abs(x2)
        self.abs_sum.set_value(self.abs_sum.get_value() + jnp.sum(a, axis=0))
        self.abs_max.set_value(jnp.maximum(self.abs_max.get_value(), jnp.max(a, axis=0)))
        s = self.sample.get_value()
        take = min(s.shape[0], x2.shape[0])
        first = jnp.zeros_like(s).at[:take].set(x2[:take])
        self.sample.set_value(jnp.where(self.rows.get_value() == 0, first, s))
        self.rows.set_value(self.rows.get_value() + x2.shape[0])
        return self.inner(x)


def linear_paths(model: nnx.Module, include: Optional[Callable[[str], bool]] = None) -> list[str]:
    """Dotted paths of the model's ``nnx.Linear`` / ``nnx.LinearGeneral`` modules (filtered by ``include``)."""
    return [p for p, m in named_modules(model) if isinstance(m, (nnx.Linear, nnx.LinearGeneral))
            and p and (include is None or include(p))]


def collect_linear_stats(model: nnx.Module, batches: Iterable[Any], *, paths: Optional[Sequence[str]] = None,
                         forward: Optional[Callable[[nnx.Module, Any], Any]] = None, sample_rows: int = 256,
                         progress: bool = True) -> dict[str, LinearStats]:
    """Run calibration ``batches`` through a copy of ``model`` and return each layer's input statistics.

    Args:
      model: a float NNX model (not modified).
      batches: inputs; each is passed to ``forward(model, batch)`` (default ``model(batch)``).
      paths: layers to record (default: every Linear / LinearGeneral).
      sample_rows: rows of raw input kept per layer.
      progress: tqdm bar over the batches.
    Returns:
      path -> :class:`LinearStats`. Raises ValueError if no batch was given.
    """
    from jaxquant.weight_only.api import linear_weight_2d

    work = copy_model(model)
    paths = list(paths) if paths is not None else linear_paths(work)
    mods = dict(named_modules(work))
    for p in paths:
        if p not in mods:
            raise KeyError(f"collect_linear_stats: '{p}' is not a module path of the model")
        _, _, in_shape, _ = linear_weight_2d(mods[p], p)
        k = int(np.prod(in_shape))
        set_submodule(work, p, _Recorder(mods[p], k, sample_rows))
    fwd = forward if forward is not None else (lambda m, b: m(b))

    @nnx.jit
    def step(m, batch):
        fwd(m, batch)

    it = batches
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(batches, desc="calibration", leave=False)
    n = 0
    for batch in it:
        step(work, batch)
        n += 1
    if n == 0:
        raise ValueError("collect_linear_stats: no calibration batch was given; pass at least one batch of real "
                         "inputs (e.g. a few token sequences)")
    recs = dict(named_modules(work))
    out = {}
    for p in paths:
        r = recs[p]
        rows = int(r.rows.get_value())
        s = np.asarray(r.sample.get_value())[:min(rows, r.sample.get_value().shape[0])]
        out[p] = LinearStats(xtx=np.asarray(r.xtx.get_value()),  # float32: 200+ layers of (K, K) add up
                             abs_mean=np.asarray(r.abs_sum.get_value(), np.float64) / max(rows, 1),
                             abs_max=np.asarray(r.abs_max.get_value(), np.float64), sample=s, rows=rows)
    return out
