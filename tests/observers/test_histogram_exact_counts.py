"""HistogramObserver counts exactly past 2**24 values per bin (catalogue O13).

A float32 running count stops at 2**24 = 16 777 216 (``x + 1 == x``). A post-ReLU batch of 20 M
values, most of them exactly zero, puts more than that in the first bin; PyTorch's histc counts it
(its per-thread partial counts stay below 2**24), so its qparams differ from a saturated count's.
"""
import warnings

import jax
import numpy as np
import pytest

from jaxquant.observers import HistogramObserver

torch = pytest.importorskip("torch")

N_ZERO = 20_000_000


def _batch():
    rng = np.random.default_rng(0)
    x = np.zeros(N_ZERO + 200_000, np.float32)  # 80 MB
    x[N_ZERO:] = rng.exponential(1.0, 200_000).astype(np.float32)  # the positive tail after a ReLU
    return x


def test_histc_counts_exactly_past_2_24():
    from jaxquant import torch_numerics as tn

    n = 2 ** 24 + 3
    counts = tn.histc_counts(np.zeros(n, np.float32), 4, np.float32(0), np.float32(1))
    assert int(counts[0]) == n and int(counts.sum()) == n


@pytest.mark.slow
def test_O13_histogram_observer_on_20m_values_in_one_bin_matches_torch():
    x = _batch()
    ours = HistogramObserver()
    state = jax.jit(ours.update)(ours.init(), x)
    theirs = torch.ao.quantization.HistogramObserver()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs(torch.from_numpy(x))
        t_scale, t_zp = theirs.calculate_qparams()
    hist = np.asarray(state.histogram)
    assert hist[0] >= N_ZERO  # a float32 running count would have stopped at 2**24
    np.testing.assert_array_equal(hist, theirs.histogram.numpy())
    scale, zp = jax.jit(ours.calculate_qparams)(state)
    assert (float(scale), int(zp)) == (float(t_scale[0]), int(t_zp[0]))
