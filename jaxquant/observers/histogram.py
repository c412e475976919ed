"""``HistogramObserver``: PyTorch's running histogram and L2 search for the clipping range.

Same algorithm as ``torch.ao.quantization.HistogramObserver`` (histc binning, range growth by
upsampling the old histogram 16x and re-binning its mid points, caffe2's non-linear parameter
search), rewritten with static shapes so that ``update`` and ``calculate_qparams`` both run under
``jax.jit``/``vmap``: the search is a ``lax.while_loop`` whose per-step bin moves are vectorised
counts over the cumulative histogram. Every float op rounds as PyTorch's CPU kernels do (see
:mod:`jaxquant.torch_numerics`), including the Python-double bookkeeping of the search,
so the qparams equal PyTorch's bit for bit.
"""
from __future__ import annotations

import dataclasses
from fractions import Fraction
from typing import Any, Hashable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.dtypes import qint32
from jaxquant import torch_numerics as tn
from jaxquant.observers.base import UniformQuantizationObserverBase, all_reduce_min_max, as_float32, finite_min_max


class HistogramState(NamedTuple):
    """``histogram`` float32 ``(bins,)`` over ``[min_val, max_val]`` (float32 scalars, ``(inf, -inf)``
    until data arrives), ``num_batches`` int32 and ``nonfinite`` bool."""

    histogram: jax.Array
    min_val: jax.Array
    max_val: jax.Array
    num_batches: jax.Array
    nonfinite: jax.Array


# --- the Python-double schedule of PyTorch's search -----------------------------------------
# alpha_k = alpha_{k-1} + 1e-5 and beta_k = beta_{k-1} - 1e-5 in doubles. Each sequence is exactly
# piecewise linear (constant increment while its binade is fixed), so a handful of (start index,
# value, increment) triples, each as a float32 pair, reproduces it in-graph.
_STEPSIZE = 1e-5
_MAX_STEPS = 100_010


def _piecewise(seq: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    inc = np.diff(seq)
    starts = np.concatenate([[0], np.nonzero(inc[1:] != inc[:-1])[0] + 1])
    base = seq[starts]
    step = inc[np.minimum(starts, len(inc) - 1)]
    # consecutive terms are within a factor 2, so np.diff is exact and each run is exactly
    # linear in real arithmetic; spot-check that with rationals
    for k in range(0, len(seq) - 1, 4999):
        r = int(np.searchsorted(starts, k, side="right")) - 1
        assert Fraction(base[r]) + (k - int(starts[r])) * Fraction(step[r]) == Fraction(seq[k])

    def pair(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        hi = v.astype(np.float32)
        return hi, (v - hi.astype(np.float64)).astype(np.float32)

    b_hi, b_lo = pair(base)
    s_hi, s_lo = pair(step)
    return starts.astype(np.int32), b_hi, b_lo, s_hi, s_lo


_ALPHA = np.add.accumulate(np.concatenate([[0.0], np.full(_MAX_STEPS, _STEPSIZE)]))
_BETA = np.subtract.accumulate(np.concatenate([[1.0], np.full(_MAX_STEPS, _STEPSIZE)]))
_ALPHA_RUNS = _piecewise(_ALPHA)
_BETA_RUNS = _piecewise(_BETA)
# ``while alpha < beta`` holds exactly while ka + kb <= _LOOP_LIMIT (checked over all ka).
_LOOP_LIMIT = int(np.searchsorted(-_BETA, -_ALPHA[0], side="left")) - 1
assert all(
    int(np.searchsorted(-_BETA, -_ALPHA[ka], side="left")) - 1 == _LOOP_LIMIT - ka
    for ka in range(0, _LOOP_LIMIT + 1, 997)
)
del _ALPHA, _BETA


def _schedule_value(runs: tuple, k: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The double ``alpha_k`` (or ``beta_k``) as a float32 pair ``hi + lo``."""
    starts, b_hi, b_lo, s_hi, s_lo = (jnp.asarray(a) for a in runs)
    r = jnp.searchsorted(starts, k, side="right") - 1
    n = (k - starts[r]).astype(jnp.float32)
    p, e = tn.two_prod(n, s_hi[r])
    e = e + n * s_lo[r]
    s, t = tn.two_sum(b_hi[r], p)
    t = t + (e + b_lo[r])
    return tn.two_sum(s, t)


def _threshold(runs: tuple, k: jax.Array, total: jax.Array) -> jax.Array:
    """float32(alpha_k * total), the Python double product PyTorch compares a float32 tensor with."""
    hi, lo = _schedule_value(runs, k)
    p, e = tn.two_prod(hi, total)
    return p + (e + lo * total)


@dataclasses.dataclass(frozen=True, kw_only=True)
class HistogramObserver(UniformQuantizationObserverBase):
    """Histogram of everything observed; qparams from the range minimising the L2 quantization
    error (PyTorch's approximate search), then PyTorch's min/max formula.

    ``bins`` (default 2048) fixes the state size; ``upsample_rate`` (16) is how finely the old
    histogram is resampled when the range grows. Per-tensor qschemes only. The search cost does not
    depend on the data size: at most ~1e5 cheap loop steps, typically a few hundred.
    """

    bins: int = 2048
    upsample_rate: int = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        me = type(self).__name__
        if self.qscheme.is_per_channel:
            raise ValueError(f"{me}: qscheme {self.qscheme!r} is per channel; only per_tensor_affine and "
                             "per_tensor_symmetric are supported (use PerChannelMinMaxObserver for weights)")
        if self.is_dynamic:
            raise ValueError(f"{me} doesn't support dynamic quantization; use is_dynamic=False")
        if self.bins < 1 or self.upsample_rate < 1:
            raise ValueError(f"{me}: bins and upsample_rate must be >= 1, got {self.bins} and {self.upsample_rate}")
        if self.bins * self.upsample_rate >= 2**24:
            raise ValueError(f"{me}: bins * upsample_rate must stay below 2**24 (float32 indices)")

    @property
    def dst_nbins(self) -> int:
        """``2 ** bits`` of the dtype's storage, as PyTorch (256 for every 8-bit and 4-bit dtype)."""
        return 2**32 if self.dtype == qint32 else 256

    def init(self, example_or_shape: Any = None) -> HistogramState:
        return HistogramState(
            histogram=jnp.zeros((self.bins,), jnp.float32),
            min_val=jnp.asarray(jnp.inf, jnp.float32),
            max_val=jnp.asarray(-jnp.inf, jnp.float32),
            num_batches=jnp.zeros((), jnp.int32),
            nonfinite=jnp.zeros((), jnp.bool_),
        )

    # -- update ------------------------------------------------------------------------------
    def update(self, state: HistogramState, x: jax.Array) -> HistogramState:
        """Add ``x`` (float, any shape) to the histogram, growing its range as PyTorch does.

        NaN/Inf entries are left out and flagged (PyTorch drops +-Inf with a warning and fails on
        NaN); a batch with no finite value leaves the histogram unchanged.
        """
        return self.sharded_update(state, x, None)

    def sharded_update(self, state: HistogramState, x: jax.Array, axis_name: Optional[Hashable]) -> HistogramState:
        """As :meth:`update` on the whole batch split over ``axis_name`` (inside ``shard_map``/``pmap``;
        ``None``: ``x`` is the whole batch). The batch range and NaN flag are reduced over the axis
        before anything depends on them and the shards' int32 bin counts are summed with ``psum``
        (exact), so every device computes the single-device result."""
        x = as_float32(x, type(self).__name__)
        if x.size == 0:
            return state
        x_min, x_max, bad = all_reduce_min_max(*finite_min_max(x), axis_name)
        has_data = x_min <= x_max
        cur_min, cur_max = state.min_val, state.max_val
        first = (cur_min == jnp.inf) | (cur_max == -jnp.inf)
        new_min = jnp.where(first, x_min, jnp.minimum(cur_min, x_min))
        new_max = jnp.where(first, x_max, jnp.maximum(cur_max, x_max))
        safe_min = jnp.where(has_data, new_min, 0.0)
        safe_max = jnp.where(has_data, new_max, 0.0)
        # Exact int32 counts (summed over shards as integers), made float32 once, as PyTorch's histc
        # sums its per-thread partial counts; a float32 count would stop growing at 2**24 per bin.
        upd = tn.histc_counts(x, self.bins, safe_min, safe_max, valid=jnp.isfinite(x))
        if axis_name is not None:
            upd = jax.lax.psum(upd, axis_name)
        upd = upd.astype(jnp.float32)
        same = (new_min == cur_min) & (new_max == cur_max)

        def grow(_: Any) -> jax.Array:
            return self._combine_histograms(state.histogram, cur_min, cur_max, upd, safe_min, safe_max)

        combined = jax.lax.cond(first | same, lambda _: upd + jnp.where(first, 0.0, state.histogram), grow, None)
        return HistogramState(
            histogram=jnp.where(has_data, combined, state.histogram),
            min_val=jnp.where(has_data, new_min, cur_min),
            max_val=jnp.where(has_data, new_max, cur_max),
            num_batches=state.num_batches + 1,
            nonfinite=state.nonfinite | bad,
        )

    def merge(self, *states: HistogramState) -> HistogramState:
        """Each histogram re-binned into the union of the ranges (PyTorch's ``_combine_histograms`` rule;
        a state already on that range is kept as is, an empty one adds nothing), then summed in order as
        one observer adding batches would: exact when every state already had the union range,
        otherwise the approximation PyTorch makes when a range grows."""
        hists, mins, maxs = (jnp.stack([getattr(st, f) for st in states]) for f in ("histogram", "min_val", "max_val"))
        g_min, g_max = jnp.min(mins), jnp.max(maxs)
        g_empty = (g_min == jnp.inf) | (g_max == -jnp.inf)
        safe_gmin = jnp.where(g_empty, 0.0, g_min)
        safe_gmax = jnp.where(g_empty, 0.0, g_max)

        def one(hist: jax.Array, lo: jax.Array, hi: jax.Array) -> jax.Array:
            empty = (lo == jnp.inf) | (hi == -jnp.inf)
            same = (lo == g_min) & (hi == g_max)

            def rebin(_: Any) -> jax.Array:
                return self._combine_histograms(hist, lo, hi, jnp.zeros_like(hist), safe_gmin, safe_gmax)

            return jax.lax.cond(empty, lambda _: jnp.zeros_like(hist),
                                lambda _: jax.lax.cond(same, lambda _: hist, rebin, None), None)

        rebinned = jax.vmap(one)(hists, mins, maxs)
        total = rebinned[0]
        for i in range(1, rebinned.shape[0]):
            total = total + rebinned[i]
        num_batches = jnp.max(jnp.stack([st.num_batches for st in states]))
        nonfinite = jnp.any(jnp.stack([st.nonfinite for st in states]))
        return HistogramState(total, g_min, g_max, num_batches, nonfinite)

    def _combine_histograms(self, orig_hist: jax.Array, orig_min: jax.Array, orig_max: jax.Array,
                            update_hist: jax.Array, update_min: jax.Array, update_max: jax.Array) -> jax.Array:
        """PyTorch's ``_combine_histograms`` for a range that grew (update range contains orig)."""
        orig_min = jnp.where(jnp.isfinite(orig_min), orig_min, 0.0)
        orig_max = jnp.where(jnp.isfinite(orig_max), orig_max, 0.0)
        point = orig_min == orig_max

        def single_value(_: Any) -> jax.Array:
            # the old histogram is one value: drop its whole mass into the new bin of that value
            one = tn.histc(orig_min.reshape(1), self.bins, update_min, update_max)
            return one * tn.torch_sum(orig_hist) + update_hist

        def upscale(_: Any) -> jax.Array:
            return update_hist + self._upscale_histogram(orig_hist, orig_min, orig_max, update_min, update_max)

        return jax.lax.cond(point, single_value, upscale, None)

    def _upscale_histogram(self, histogram: jax.Array, orig_min: jax.Array, orig_max: jax.Array,
                           update_min: jax.Array, update_max: jax.Array) -> jax.Array:
        """Old histogram split into ``upsample_rate`` sub-bins per bin, whose mid points are
        re-binned into the new range (PyTorch's ``_upscale_histogram``), summed in index order as
        ``torch.bincount`` does."""
        rate, bins = self.upsample_rate, self.bins
        sub = jnp.repeat(tn.true_divide(histogram, jnp.float32(rate)), rate)
        bin_size = tn.true_divide(orig_max - orig_min, jnp.float32(bins * rate))
        mids = tn.linspace(orig_min, orig_max, bins * rate + 1)[:-1] + jnp.float32(0.5) * bin_size
        edges = tn.linspace(update_min, update_max, bins + 1)
        assign = jnp.clip(jnp.searchsorted(edges, mids, side="right") - 1, 0, bins - 1)
        # assign is non-decreasing, so each new bin sums a contiguous run of sub-bins; add the runs
        # position by position (in parallel over bins) to keep bincount's sequential rounding.
        start = jnp.searchsorted(assign, jnp.arange(bins), side="left")
        stop = jnp.searchsorted(assign, jnp.arange(bins), side="right")
        length = stop - start
        n_sub = bins * rate

        def body(carry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
            t, acc = carry
            idx = jnp.minimum(start + t, n_sub - 1)
            return t + 1, acc + jnp.where(t < length, sub[idx], 0.0)

        # The carry starts from zeros_like of the traced operands, not jnp.zeros: inside shard_map
        # it must have the same varying-manual-axes type as what the body adds to it.
        acc0 = jnp.zeros_like(edges[:-1]) + jnp.zeros_like(histogram)
        _, out = jax.lax.while_loop(lambda c: c[0] < jnp.max(length), body, (jnp.zeros_like(length[0]), acc0))
        return out

    # -- qparams -----------------------------------------------------------------------------
    def calculate_qparams(self, state: HistogramState) -> tuple[jax.Array, jax.Array]:
        """``(scale float32 (), zero_point int32 ())`` from the searched range.

        Raises :class:`~jaxquant.observers.base.NotCalibratedError` for a concrete state that saw
        no data or saw NaN/Inf; under ``jit`` an empty state gives PyTorch's (1.0, 0).
        """
        self._checked(state)
        return self._calculate_qparams(*self.clipped_range(state))

    def clipped_range(self, state: HistogramState) -> tuple[jax.Array, jax.Array]:
        """The ``(min, max)`` the qparams cover: :meth:`non_linear_param_search` (subclasses choose theirs)."""
        return self.non_linear_param_search(state)

    def non_linear_param_search(self, state: HistogramState) -> tuple[jax.Array, jax.Array]:
        """PyTorch's ``_non_linear_param_search``: the ``(min, max)`` float32 scalars that approximately
        minimise the L2 quantization error of the histogram (``(inf, -inf)`` if it is empty)."""
        bins = self.bins
        hist = state.histogram
        empty = (state.min_val == jnp.inf) | (state.max_val == -jnp.inf)
        mn = jnp.where(empty, 0.0, state.min_val)
        mx = jnp.where(empty, 0.0, state.max_val)
        bin_width = tn.true_divide(mx - mn, jnp.float32(bins))
        total = tn.torch_sum(hist)
        csum = tn.cumsum_via_double(hist)
        # (max - min) as an exact float32 pair: PyTorch takes it in double for the error function
        d_hi, d_lo = tn.two_sum(mx, -mn)

        def error(start: jax.Array, end: jax.Array) -> jax.Array:
            return self._quantization_error(hist, d_hi, d_lo, start, end)

        def cond(c: tuple) -> jax.Array:
            ka, kb, _, _, _, done = c
            return (~done) & (ka + kb <= _LOOP_LIMIT)

        def body(c: tuple) -> tuple:
            ka, kb, start, end, norm_min, done = c
            thr_a = _threshold(_ALPHA_RUNS, ka + 1, total)
            thr_b = _threshold(_BETA_RUNS, kb + 1, total)
            left = jnp.minimum(jnp.maximum(start, jnp.sum(csum < thr_a, dtype=jnp.int32)), end)
            right = jnp.maximum(jnp.minimum(end, jnp.sum(csum <= thr_b, dtype=jnp.int32) - 1), start)
            move_start = (left - start) > (end - right)
            next_start = jnp.where(move_start, left, start)
            next_end = jnp.where(move_start, end, right)
            ka = ka + move_start.astype(jnp.int32)
            kb = kb + (~move_start).astype(jnp.int32)
            changed = (next_start != start) | (next_end != end)
            norm = jax.lax.cond(changed, lambda _: error(next_start, next_end), lambda _: norm_min, None)
            worse = changed & (norm > norm_min)
            take = changed & ~worse
            return (ka, kb, jnp.where(take, next_start, start), jnp.where(take, next_end, end),
                    jnp.where(take, norm, norm_min), worse)

        zero = jnp.zeros((), jnp.int32)
        init = (zero, zero, zero, jnp.asarray(bins - 1, jnp.int32), jnp.asarray(jnp.inf, jnp.float32),
                empty | (bin_width == 0))  # a zero-width histogram gives (min, min) whatever the bins
        _, _, start, end, _, _ = jax.lax.while_loop(cond, body, init)
        new_min = mn + tn.rounded(bin_width * start.astype(jnp.float32))
        new_max = mn + tn.rounded(bin_width * (end + 1).astype(jnp.float32))
        return (jnp.where(empty, jnp.inf, new_min), jnp.where(empty, -jnp.inf, new_max))

    def _quantization_error(self, hist: jax.Array, d_hi: jax.Array, d_lo: jax.Array,
                            start: jax.Array, end: jax.Array) -> jax.Array:
        """PyTorch's ``_compute_quantization_error(start, end)``: float32 tensor math with the bin
        widths coming from Python doubles (rounded once to float32 where they meet a tensor)."""
        bins, dst_nbins = self.bins, self.dst_nbins
        # bin_width = (max - min) / bins and dst_bin_width = bin_width * (end - start + 1) / dst_nbins
        # in double; both rounded to float32 once.
        k = (end - start + 1).astype(jnp.float32)
        p, e = tn.two_prod(d_hi, k)
        e = e + d_lo * k
        dst = tn.true_divide(p + e, jnp.float32(bins * dst_nbins)) if not _pow2(bins * dst_nbins) \
            else (p + e) * jnp.float32(1.0 / (bins * dst_nbins))
        bw = (d_hi + d_lo) * jnp.float32(1.0 / bins) if _pow2(bins) else tn.true_divide(d_hi + d_lo, jnp.float32(bins))
        half = dst * jnp.float32(0.5)
        src = jnp.arange(bins, dtype=jnp.int32)
        src_begin = tn.rounded((src - start).astype(jnp.float32) * bw)
        src_end = src_begin + bw
        top = jnp.float32(dst_nbins - 1)
        dst_of_begin = jnp.clip(tn.floor_divide(src_begin, dst), 0.0, top)
        dst_of_begin_center = tn.rounded((dst_of_begin + 0.5) * dst)
        dst_of_end = jnp.clip(tn.floor_divide(src_end, dst), 0.0, top)
        density = tn.true_divide(hist, bw)

        def get_norm(delta_begin: jax.Array, delta_end: jax.Array) -> jax.Array:
            cube = tn.rounded(delta_end * delta_end * delta_end) - tn.rounded(delta_begin * delta_begin * delta_begin)
            return tn.rounded(density * tn.true_divide(cube, jnp.float32(3.0)))

        norm = jnp.float32(0.0) + get_norm(src_begin - dst_of_begin_center, jnp.broadcast_to(half, (bins,)))
        norm = norm + tn.rounded((dst_of_end - dst_of_begin - 1.0) * get_norm(-half, half))
        dst_of_end_center = tn.rounded(dst_of_end * dst) + half
        norm = norm + get_norm(-half, src_end - dst_of_end_center)
        # the densities of a zero-width histogram are inf; PyTorch returns 0 before using them
        return jnp.where(dst == 0, jnp.float32(0.0), tn.torch_sum(jnp.where(dst == 0, 0.0, norm)))


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0
