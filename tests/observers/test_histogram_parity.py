"""HistogramObserver: histogram, searched range, scale and zero point equal PyTorch 2.13's bit for bit."""
import warnings

import jax
import numpy as np
import pytest

from jaxquant import dtypes as D
from jaxquant.observers import HistogramObserver
from observer_torch_ref import special_batches, torch_kwargs, torch_qparams

torch = pytest.importorskip("torch")


def batches(rng, count):
    out = []
    for _ in range(count):
        scale = 10 ** rng.uniform(-3, 3)
        shift = rng.uniform(-1, 1) * scale * rng.uniform(0, 3)
        kind = rng.integers(0, 3)
        n = int(rng.integers(1, 3000))
        x = (rng.standard_normal(n) * scale + shift if kind == 0 else
             rng.exponential(scale, n) + shift if kind == 1 else rng.uniform(-scale, scale, n) + shift)
        out.append(x.astype(np.float32))
    return out


def check(kw, sequences):
    ours = HistogramObserver(**kw)
    update, qparams = jax.jit(ours.update), jax.jit(ours.calculate_qparams)
    search = jax.jit(ours.non_linear_param_search)
    for seq in sequences:
        theirs = torch.ao.quantization.HistogramObserver(**torch_kwargs(kw))
        state = ours.init()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for x in seq:
                x = np.asarray(x, np.float32)
                state = update(state, x)
                theirs(torch.from_numpy(x))
                np.testing.assert_array_equal(np.asarray(state.histogram), theirs.histogram.numpy())
                assert float(state.min_val) == theirs.min_val.item()
                assert float(state.max_val) == theirs.max_val.item()
            t_min, t_max = theirs._non_linear_param_search()
        new_min, new_max = search(state)
        assert (float(new_min), float(new_max)) == (t_min.item(), t_max.item())
        scale, zp = qparams(state)
        t_scale, t_zp = torch_qparams(theirs)
        assert float(scale) == float(t_scale[0]) and int(zp) == int(t_zp[0])


def test_default_quint8_many_growing_batches():
    rng = np.random.default_rng(0)
    check(dict(dtype=D.quint8), [batches(rng, 4) for _ in range(4)])


def test_symmetric_qint8_and_special_inputs():
    rng = np.random.default_rng(1)
    specials = [s.reshape(-1) for s in special_batches(rng)]
    seqs = [[s] for s in specials] + [specials, [np.array([1.5])], [np.array([-2.0]), np.array([5.0])]]
    check(dict(dtype=D.qint8, qscheme=D.per_tensor_symmetric), seqs + [batches(rng, 3)])


@pytest.mark.slow
@pytest.mark.parametrize("kw", [dict(dtype=D.quint8, quant_min=0, quant_max=127),
                                dict(dtype=D.qint8, quant_min=-8, quant_max=7, reduce_range=True),
                                dict(dtype=D.quint8, bins=256)], ids=["0-127", "4bit-reduced", "256bins"])
def test_custom_ranges(kw):
    rng = np.random.default_rng(2)
    check(kw, [batches(rng, 3) for _ in range(3)])
