"""Scale and zero point equal PyTorch 2.13's bit for bit for the min/max observers."""
import itertools
import warnings

import jax
import numpy as np
import pytest

from jaxquant import dtypes as D
from jaxquant.observers import (
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    PerChannelMinMaxObserver,
)

from observer_torch_ref import special_batches, torch_kwargs, torch_qparams

torch = pytest.importorskip("torch")
tq = torch.ao.quantization

PER_TENSOR = [D.per_tensor_affine, D.per_tensor_symmetric]
PER_CHANNEL = [D.per_channel_affine, D.per_channel_symmetric, D.per_channel_affine_float_qparams]
RANGES = {D.qint8: [None, (-8, 7), (-127, 127), (-64, 63)], D.quint8: [None, (0, 15), (0, 127)]}


# configs run in the default (fast) suite; the full matrix is marked slow
JIT_SUBSET = [dict(dtype=D.quint8, qscheme=s, reduce_range=False) for s in PER_TENSOR + PER_CHANNEL] + [
    dict(dtype=D.qint8, qscheme=s, reduce_range=True, quant_min=-8, quant_max=7) for s in PER_TENSOR + PER_CHANNEL]


def configs(qschemes):
    for dtype, qscheme, reduce_range in itertools.product([D.qint8, D.quint8], qschemes, [False, True]):
        for qrange in RANGES[dtype]:
            if qscheme.is_symmetric and reduce_range and dtype == D.quint8:
                continue  # rejected by both libraries (tested in test_errors)
            kw = dict(dtype=dtype, qscheme=qscheme, reduce_range=reduce_range)
            if qrange:
                kw.update(quant_min=qrange[0], quant_max=qrange[1])
            marks = () if kw in JIT_SUBSET else (pytest.mark.slow,)  # one compile per config: ~1-3 s each
            yield pytest.param(kw, id="-".join(f"{v}" for v in kw.values()).replace("jaxquant.", ""), marks=marks)


def run_parity(ours, theirs_factory, batches_list, shape_arg):
    # under jit, so XLA's fusion (FMA contraction, reciprocal division) is part of what is checked
    update = jax.jit(ours.update)
    qparams = jax.jit(ours.calculate_qparams)
    for batches in batches_list:
        theirs = theirs_factory()
        state = ours.init(shape_arg)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for x in batches:
                x = np.asarray(x, np.float32)
                state = update(state, x)
                theirs(torch.from_numpy(x))
        scale, zp = qparams(state)
        t_scale, t_zp = torch_qparams(theirs)
        np.testing.assert_array_equal(np.asarray(scale).reshape(-1), t_scale.reshape(-1))
        np.testing.assert_array_equal(np.asarray(zp).reshape(-1), t_zp.reshape(-1).astype(np.asarray(zp).dtype))
        assert scale.dtype == np.float32


def batch_lists(rng):
    specials = special_batches(rng)
    # every special batch alone, then all of them in sequence, then a shuffled sequence
    order = rng.permutation(len(specials))
    return [[b] for b in specials] + [specials, [specials[i] for i in order]]


@pytest.mark.parametrize("kw", list(configs(PER_TENSOR)))
@pytest.mark.parametrize("cls,tcls", [(MinMaxObserver, tq.MinMaxObserver),
                                      (MovingAverageMinMaxObserver, tq.MovingAverageMinMaxObserver)],
                         ids=["minmax", "moving_avg"])
def test_per_tensor_parity(cls, tcls, kw):
    rng = np.random.default_rng(abs(hash(str(kw))) % 2**32)
    lists = batch_lists(rng) + [[np.array([2.5])], [np.array([-7.0]), np.array([1e-9])]]
    run_parity(cls(**kw), lambda: tcls(**torch_kwargs(kw)), lists, None)


@pytest.mark.parametrize("kw", list(configs(PER_CHANNEL)))
@pytest.mark.parametrize("cls,tcls", [(PerChannelMinMaxObserver, tq.PerChannelMinMaxObserver),
                                      (MovingAveragePerChannelMinMaxObserver,
                                       tq.MovingAveragePerChannelMinMaxObserver)],
                         ids=["per_channel", "moving_avg_per_channel"])
def test_per_channel_parity(cls, tcls, kw):
    rng = np.random.default_rng(abs(hash(str(kw))) % 2**32)
    run_parity(cls(**kw), lambda: tcls(**torch_kwargs(kw)), batch_lists(rng), (4, 6))


@pytest.mark.parametrize("ch_axis", [0, 1, -1])
def test_per_channel_axis_parity(ch_axis):
    kw = dict(dtype=D.qint8, qscheme=D.per_channel_symmetric, ch_axis=ch_axis)
    rng = np.random.default_rng(3)
    x = [rng.standard_normal((3, 5, 2)) * 4, rng.standard_normal((3, 5, 2))]
    run_parity(PerChannelMinMaxObserver(**kw), lambda: tq.PerChannelMinMaxObserver(**torch_kwargs(kw)),
               [x], (3, 5, 2))


def test_averaging_constant_and_eps_parity():
    kw = dict(averaging_constant=0.3, eps=2**-12, dtype=D.qint8, qscheme=D.per_tensor_symmetric)
    rng = np.random.default_rng(4)
    lists = [[rng.standard_normal(50) * 1e-5 for _ in range(3)], [rng.standard_normal(50) * s for s in (1, 5, 0.1)]]
    run_parity(MovingAverageMinMaxObserver(**kw), lambda: tq.MovingAverageMinMaxObserver(**torch_kwargs(kw)),
               lists, None)


@pytest.mark.parametrize("preset_name", ["default_observer", "default_weight_observer",
                                         "weight_observer_range_neg_127_to_127",
                                         "default_per_channel_weight_observer",
                                         "per_channel_weight_observer_range_neg_127_to_127",
                                         "default_float_qparams_observer"])
def test_presets_parity(preset_name):
    import jaxquant.observers as jo
    ours = getattr(jo, preset_name)()
    theirs_factory = getattr(tq.observer, preset_name)
    rng = np.random.default_rng(5)
    run_parity(ours, theirs_factory, [[rng.standard_normal((4, 6)) * 3 + 1, rng.standard_normal((4, 6))]], (4, 6))
