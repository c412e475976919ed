"""The dynamic activation quantization at exact .5 ties, against PyTorch's dynamic Linear.

fbgemm quantizes ``nearbyint(x * (1/scale) + zero_point)``: the zero point is added before the one
rounding (ties to even). Rounding ``x/scale`` first and adding the zero point after moves every
tie by one step when the zero point is odd. The input below makes the dynamic qparams exact by
hand: min -3/16, max 7.75 over reduce_range's 127 levels gives scale (7.75 + 3/16)/127 = 1/16 and
zero point 3, so ``x = (k + 1/2)/16`` lands exactly on ties.
"""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxquant.transforms.quantize_dynamic import quantize_dynamic

torch = pytest.importorskip("torch")


@pytest.fixture
def x86_engine():
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = "x86"
    yield
    torch.backends.quantized.engine = previous

X = np.array([[-3 / 16, 7.75, 0.5 / 16, 2.5 / 16, 4.5 / 16, -1.5 / 16]], np.float32)


def _hand_quantized(x):
    """scale 1/16, zero point 3: nearbyint(16 x + 3), ties to even, in [0, 127]."""
    return np.clip(np.round(x * 16 + 3), 0, 127)


def test_hand_values_are_ties_where_the_two_formulas_differ():
    wrong = np.clip(np.round(X * 16) + 3, 0, 127)
    right = _hand_quantized(X)
    assert list(right[0]) == [0, 127, 4, 6, 8, 2]
    assert np.sum(right != wrong) == 4  # every tie value moves by one step with the wrong formula


def test_dynamic_linear_ties_match_torch(x86_engine):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(6, 5)).astype(np.float32)  # (in, out), flax layout
    lin = nnx.Linear(6, 5, use_bias=False, rngs=nnx.Rngs(0))
    lin.kernel.set_value(jnp.asarray(w))
    jq = quantize_dynamic(nnx.Sequential(lin))
    tl = torch.nn.Linear(6, 5, bias=False)
    with torch.no_grad():
        tl.weight.copy_(torch.from_numpy(w.T))
    tq = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(tl), {torch.nn.Linear}, dtype=torch.qint8)
    yt = tq(torch.from_numpy(X)).numpy()
    yj = np.asarray(jq(jnp.asarray(X)))
    # Same int8 weights, same qparams, same integers: only float32 rounding of the dequantization.
    wq = tq[0].weight().int_repr().numpy().T.astype(np.float64)
    ws = tq[0].weight().q_scale()
    ref = (_hand_quantized(X) - 3) @ wq * (ws / 16)
    np.testing.assert_allclose(yt, ref, rtol=1e-6, atol=1e-6)  # PyTorch does what the docstring says
    np.testing.assert_allclose(yj, yt, rtol=1e-6, atol=1e-6)
    wrong = (np.clip(np.round(X * 16) + 3, 0, 127) - 3) @ wq * (ws / 16)
    assert np.abs(wrong - yt).max() > 1e-2  # the test can tell the two formulas apart
