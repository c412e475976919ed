import warnings

import numpy as np
import pytest

from jaxquant import dtypes as D

torch = pytest.importorskip("torch")

TORCH_DTYPE = {D.qint8: torch.qint8, D.quint8: torch.quint8, D.qint32: torch.qint32, D.quint4: torch.quint4x2}
TORCH_QSCHEME = {
    D.per_tensor_affine: torch.per_tensor_affine,
    D.per_tensor_symmetric: torch.per_tensor_symmetric,
    D.per_channel_affine: torch.per_channel_affine,
    D.per_channel_symmetric: torch.per_channel_symmetric,
    D.per_channel_affine_float_qparams: torch.per_channel_affine_float_qparams,
}


def torch_kwargs(kw: dict) -> dict:
    out = dict(kw)
    if "dtype" in out:
        out["dtype"] = TORCH_DTYPE[out["dtype"]]
    if "qscheme" in out:
        out["qscheme"] = TORCH_QSCHEME[out["qscheme"]]
    return out


def torch_qparams(obs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s, z = obs.calculate_qparams()
    return s.numpy(), z.numpy()


# Batches that stress the formula: all-zero, constant, one element, tiny and huge ranges,
# all negative, all positive, boundary-ish values.
def special_batches(rng: np.random.Generator, shape=(4, 6)) -> list[np.ndarray]:
    n = int(np.prod(shape))
    g = rng.standard_normal(shape)
    return [
        np.zeros(shape),
        np.full(shape, 3.25),
        np.full(shape, -0.5),
        g * 1e-9,
        g * 1e6,
        -np.abs(g) - 1.0,
        np.abs(g) + 2.0,
        np.linspace(-1.0, 1.0, n).reshape(shape),
        g * 10 ** rng.uniform(-3, 3) + rng.uniform(-2, 2),
    ]
