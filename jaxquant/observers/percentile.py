"""``PercentileObserver``: clip the observed range at a percentile of the running histogram.

The statistics are exactly :class:`~jaxquant.observers.histogram.HistogramObserver`'s (same
state, same range growth by re-binning the old histogram), so it streams over any number of
batches with a fixed-size state; only ``calculate_qparams`` differs: instead of the L2 search it
reads the lower and upper percentiles off the histogram's CDF, interpolating linearly inside the
bin that holds them, and feeds that ``(min, max)`` to PyTorch's qparams formula.

PyTorch has no percentile observer in ``torch.ao``; the name and ``percentile`` argument follow
the usual calibrators (TensorRT/ModelOpt's "percentile" calibration).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxquant import torch_numerics as tn
from jaxquant.observers.histogram import HistogramObserver, HistogramState


@dataclasses.dataclass(frozen=True, kw_only=True)
class PercentileObserver(HistogramObserver):
    """Histogram of everything observed; range clipped to ``[P(100 - percentile), P(percentile)]``.

    ``percentile`` in ``(50, 100]`` (default 99.99): 100 gives the running min/max (up to one bin
    width, see :meth:`percentile_range`). ``bins`` (2048) fixes the state size; the state is a
    :class:`~jaxquant.observers.histogram.HistogramState`. Per-tensor qschemes only.
    """

    percentile: float = 99.99

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 50.0 < float(self.percentile) <= 100.0:
            raise ValueError(
                f"{type(self).__name__}: percentile must be in (50, 100], got {self.percentile}; "
                "it is the upper percentile, the lower one is 100 - percentile"
            )

    def clipped_range(self, state: HistogramState) -> tuple[jax.Array, jax.Array]:
        """The percentile-clipped range that ``calculate_qparams`` covers: :meth:`percentile_range`."""
        return self.percentile_range(state)

    def percentile_range(self, state: HistogramState) -> tuple[jax.Array, jax.Array]:
        """The ``(lower, upper)`` percentile values, float32 scalars (``(inf, -inf)`` if empty).

        Each is where the histogram's CDF, taken as linear inside every bin, reaches
        ``q / 100 * total``. The sample with that rank lies in the same bin, so on a single batch
        the result is within one bin width ``(max_val - min_val) / bins`` of the order statistics
        next to that rank, hence of ``np.percentile`` of the data up to their spacing (tiny in a
        dense tail, large in a sparse one). Range growth re-bins old counts by their sub-bin mid
        points, adding up to one more bin width.
        """
        bins = self.bins
        hist = state.histogram
        empty = (state.min_val == jnp.inf) | (state.max_val == -jnp.inf)
        mn = jnp.where(empty, 0.0, state.min_val)
        mx = jnp.where(empty, 0.0, state.max_val)
        # cumulative counts in (emulated) double so 1e8-sample histograms keep their tails exact
        csum = tn.cumsum_via_double(hist)
        total = csum[-1]
        width = (mx - mn) / jnp.float32(bins)

        def at(q: float) -> jax.Array:
            target = jnp.float32(q / 100.0) * total
            # first bin whose cumulative count reaches the target; the mass before it is csum[i-1]
            i = jnp.clip(jnp.sum(csum < target, dtype=jnp.int32), 0, bins - 1)
            before = jnp.where(i > 0, csum[jnp.maximum(i - 1, 0)], 0.0)
            count = hist[i]
            frac = jnp.where(count > 0, jnp.clip((target - before) / jnp.where(count > 0, count, 1.0), 0.0, 1.0), 0.0)
            return mn + (i.astype(jnp.float32) + frac) * width

        p = float(self.percentile)
        lo = jnp.clip(at(100.0 - p), mn, mx)
        hi = jnp.clip(at(p), mn, mx)
        # the percentile ends are exact at 100 (lower target 0 lands at the start of bin 0)
        hi = jnp.where(p >= 100.0, mx, hi)
        lo = jnp.where(p >= 100.0, mn, lo)
        return jnp.where(empty, jnp.inf, lo), jnp.where(empty, -jnp.inf, hi)


__all__ = ["PercentileObserver"]
