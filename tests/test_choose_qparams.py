"""choose_qparams equals torch._choose_qparams_per_tensor over many ranges."""
import jax
import numpy as np
import pytest

from jaxquant import dtypes as D
from jaxquant.choose_qparams import choose_qparams, choose_qparams_from_min_max

torch = pytest.importorskip("torch")


def ranges(rng, n):
    out = [(0.0, 0.0), (-1.0, 1.0), (0.0, 5.0), (-3.0, 0.0), (1e-9, 2e-9), (-1e6, 1e6), (2.0, 3.0), (-7.0, -2.0),
           (-1e-7, 3e-7), (-0.5, 127.5)]
    for _ in range(n):
        a = rng.standard_normal() * 10 ** rng.uniform(-8, 6)
        b = a + abs(rng.standard_normal()) * 10 ** rng.uniform(-8, 6)
        out.append((a, b))
    return out


@pytest.mark.parametrize("reduce_range", [False, True])
def test_matches_torch_per_tensor(reduce_range):
    rng = np.random.default_rng(0)
    f = jax.jit(lambda x: choose_qparams(x, D.quint8, reduce_range))
    mismatches = []
    for lo, hi in ranges(rng, 300):
        x = np.array([lo, (lo + hi) / 2, hi], np.float32)
        s, z = f(x)
        ts, tz = torch._choose_qparams_per_tensor(torch.from_numpy(x), reduce_range)
        # PyTorch decides the zero point in float64; where that value is a near-exact .5 tie
        # (e.g. a symmetric range [-a, a]) the last bits of the double scale decide it, which a
        # float32 emulation cannot reproduce, so one step either way is accepted there only.
        qmin, qmax = (0, 127) if reduce_range else (0, 255)
        lo64, hi64 = min(float(np.float32(lo)), 0.0), max(float(np.float32(hi)), 0.0)
        zp64 = qmin - lo64 / ((hi64 - lo64) / (qmax - qmin)) if hi64 > lo64 else 0.0
        near_tie = abs(abs(zp64 - np.floor(zp64)) - 0.5) < 1e-9
        zp_ok = int(z) == tz or (near_tie and abs(int(z) - tz) == 1)
        if float(s) != np.float32(ts) or not zp_ok:
            mismatches.append((lo, hi, float(s), np.float32(ts), int(z), tz))
    assert not mismatches, mismatches[:5]


def test_per_row_matches_per_tensor_rows():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((8, 16)) * rng.uniform(0.01, 10, (8, 1))).astype(np.float32)
    s, z = choose_qparams(x, D.quint8, axis=0)
    for i in range(8):
        si, zi = choose_qparams(x[i], D.quint8)
        assert float(s[i]) == float(si) and int(z[i]) == int(zi)
    s2, z2 = choose_qparams_from_min_max(x.min(1), x.max(1))
    np.testing.assert_array_equal(np.asarray(s2), np.asarray(s))
