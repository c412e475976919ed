"""Dynamic LSTM/GRU over a sequence: the input projection of all T steps is quantized at once (one
activation scale, one (T*B, in) dot), as PyTorch's CPU ``quantized.dynamic.LSTM``/``GRU`` do; NNX
(``nnx.RNN``) and Linen (``nn.RNN``) against ``torch.ao.quantization.quantize_dynamic`` outputs.

Bound: the int8 weights and every activation scale are PyTorch's, so the integer accumulators are
equal and outputs differ by float32 rounding (gates, dequantization), a few 1e-7, unless a zero
point or activation value sits on a rounding tie (then one step of one element; see
test_quantize_dynamic.py). ``atol=2e-5`` passes the former and fails a per-step projection, whose
error against PyTorch is ~1e-3 here (checked below, so the test can fail).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxquant.nn import dynamic as nnqd
from jaxquant.transforms.quantize_dynamic import quantize_dynamic

torch = pytest.importorskip("torch")

I, H, B, T = 12, 16, 3, 10


@pytest.fixture(autouse=True)
def x86_engine():
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = "x86"
    yield
    torch.backends.quantized.engine = previous


def _inputs():
    x = np.random.default_rng(0).normal(size=(B, T, I)).astype(np.float32)
    x[:, :3] *= 4  # the early steps have a wider range: per-step scales would differ from one scale
    return x


class Model(nnx.Module):
    def __init__(self, cell):
        self.rnn = nnx.RNN(cell)

    def __call__(self, x):
        return self.rnn(x)


def _lstm_pair():
    torch.manual_seed(0)
    tl = torch.nn.LSTM(I, H, batch_first=True)
    cell = nnx.LSTMCell(I, H, rngs=nnx.Rngs(0))
    wih, whh = tl.weight_ih_l0.detach().numpy(), tl.weight_hh_l0.detach().numpy()
    b = (tl.bias_ih_l0 + tl.bias_hh_l0).detach().numpy()
    for g, (li, lh) in enumerate([("ii", "hi"), ("if_", "hf"), ("ig", "hg"), ("io", "ho")]):
        getattr(cell, li).kernel.set_value(jnp.asarray(wih[g * H:(g + 1) * H].T))
        getattr(cell, lh).kernel.set_value(jnp.asarray(whh[g * H:(g + 1) * H].T))
        getattr(cell, lh).bias.set_value(jnp.asarray(b[g * H:(g + 1) * H]))
    return tl, Model(cell)


def _gru_pair():
    torch.manual_seed(1)
    tg = torch.nn.GRU(I, H, batch_first=True)
    with torch.no_grad():
        tg.bias_hh_l0.zero_()  # flax's GRUCell has no hidden bias
    cell = nnx.GRUCell(I, H, rngs=nnx.Rngs(0))
    cell.dense_i.kernel.set_value(jnp.asarray(tg.weight_ih_l0.detach().numpy().T))
    cell.dense_i.bias.set_value(jnp.asarray(tg.bias_ih_l0.detach().numpy()))
    cell.dense_h.kernel.set_value(jnp.asarray(tg.weight_hh_l0.detach().numpy().T))
    return tg, Model(cell)


def _per_step(jq_model, x):
    """The old formulation: the cell (own scale per step) under a plain nnx.RNN."""
    rnn = nnx.RNN(jq_model.rnn.cell)
    return np.asarray(rnn(jnp.asarray(x)))


@pytest.mark.slow  # ~15 s on a loaded 2-core machine (two torch modules, XLA compiles)
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_nnx_rnn_matches_torch_dynamic(kind):
    tm, jm = _lstm_pair() if kind == "lstm" else _gru_pair()
    tq = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(tm), {type(tm)}, dtype=torch.qint8)[0]
    jq = quantize_dynamic(jm)
    assert isinstance(jq.rnn, nnqd.RNN) and isinstance(jq.rnn.cell, (nnqd.LSTMCell, nnqd.GRUCell))
    x = _inputs()
    yt = tq(torch.from_numpy(x))[0].detach().numpy()
    yj = np.asarray(nnx.jit(lambda m, v: m(v))(jq, jnp.asarray(x)))
    np.testing.assert_allclose(yj, yt, atol=2e-5, rtol=0)
    assert np.abs(_per_step(jq, x) - yt).max() > 1e-4  # the per-step formulation is measurably off


def test_one_input_projection_dot_over_all_steps():
    _, jm = _lstm_pair()
    jq = quantize_dynamic(jm)
    x = jnp.asarray(_inputs())
    hlo = jax.jit(lambda v: jq(v)).lower(x).as_text()
    # the input projection: one (B*T, I) x (I, 4H) dot outside the loop
    assert f"tensor<{B * T}x{I}xui8>" in hlo or f"tensor<{B * T}x{I}xi8>" in hlo, "no whole-sequence dot"


@pytest.mark.parametrize("options", [dict(reverse=True, keep_order=True), dict(time_major=True),
                                     dict(return_carry=True)])
def test_rnn_options_match_the_per_step_loop_in_float16(options):
    """Loop mechanics (reverse, time-major, carry) against nnx.RNN, with float16 weights (no
    activation quantization, so whole-sequence and per-step projections are the same numbers)."""
    from jaxquant import float16

    _, jm = _gru_pair()
    jq = quantize_dynamic(jm, dtype=float16)
    assert isinstance(jq.rnn, nnqd.RNN)
    x = _inputs()
    if options.get("time_major"):
        x = x.transpose(1, 0, 2)
    ours = jq.rnn(jnp.asarray(x), **options)
    ref = nnx.RNN(jq.rnn.cell)(jnp.asarray(x), **options)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6),
                 ours, ref)


# ------------------------------------------------------------------------------------------ Linen


def _linen_params(kind, tm):
    sd = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
    wih, whh, bih, bhh = sd["weight_ih_l0"], sd["weight_hh_l0"], sd["bias_ih_l0"], sd["bias_hh_l0"]
    rows = lambda a, g: a[g * H:(g + 1) * H]  # noqa: E731
    if kind == "lstm":  # torch gate order i, f, g, o; flax's input Denses have no bias
        p = {}
        for g, name in enumerate("ifgo"):
            p["i" + name] = {"kernel": rows(wih, g).T}
            p["h" + name] = {"kernel": rows(whh, g).T, "bias": rows(bih, g) + rows(bhh, g)}
        return p
    # GRU, torch order r, z, n: b_hr and b_hz fold into the input biases, b_hn stays with 'hn'
    return {"ir": {"kernel": rows(wih, 0).T, "bias": rows(bih, 0) + rows(bhh, 0)},
            "iz": {"kernel": rows(wih, 1).T, "bias": rows(bih, 1) + rows(bhh, 1)},
            "in": {"kernel": rows(wih, 2).T, "bias": rows(bih, 2)},
            "hr": {"kernel": rows(whh, 0).T}, "hz": {"kernel": rows(whh, 1).T},
            "hn": {"kernel": rows(whh, 2).T, "bias": rows(bhh, 2)}}


def _linen_sequence_model(kind):
    """A Linen nn.RNN over an LSTM or GRU cell of width H (the quant params broadcast over time)."""
    import flax.linen as nn

    import jaxquant.linen as jql

    cell_type = nn.LSTMCell if kind == "lstm" else nn.GRUCell

    class Seq(nn.Module):
        @nn.compact
        def __call__(self, xs):
            return nn.RNN(cell_type(H), variable_broadcast=["params", jql.QUANT_PARAMS])(xs)

    return Seq


@pytest.mark.slow  # ~20 s on a loaded 2-core machine
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_linen_rnn_matches_torch_dynamic(kind):
    import jaxquant.linen as jql

    Seq = _linen_sequence_model(kind)
    torch.manual_seed(0)
    tm = torch.nn.LSTM(I, H, batch_first=True) if kind == "lstm" else torch.nn.GRU(I, H, batch_first=True)
    x = _inputs()
    v = Seq().init(jax.random.key(0), jnp.asarray(x))
    cell_name = next(iter(v["params"]))
    loaded = jax.tree.map(jnp.asarray, _linen_params(kind, tm))
    assert jax.tree.structure(loaded) == jax.tree.structure(v["params"][cell_name])
    v = {"params": {cell_name: loaded}}
    np.testing.assert_allclose(np.asarray(Seq().apply(v, jnp.asarray(x))),
                               tm(torch.from_numpy(x))[0].detach().numpy(), atol=1e-5)  # float mapping right
    tq = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(tm), {type(tm)}, dtype=torch.qint8)[0]
    yt = tq(torch.from_numpy(x))[0].detach().numpy()
    qm, qv = jql.quantize_dynamic(Seq(), v, jnp.asarray(x))
    yj = np.asarray(jax.jit(qm.apply)(qv, jnp.asarray(x)))
    np.testing.assert_allclose(yj, yt, atol=2e-5, rtol=0)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_linen_one_input_projection_dot_and_one_weight_scale_per_group(kind):
    import jaxquant.linen as jql

    Seq = _linen_sequence_model(kind)
    x = jnp.asarray(_inputs())
    v = Seq().init(jax.random.key(0), x)
    qm, qv = jql.quantize_dynamic(Seq(), v, x)
    cell = next(iter(qv[jql.QUANT_PARAMS].values()))
    for group in (("ii", "if", "ig", "io"), ("hi", "hf", "hg", "ho")) if kind == "lstm" else \
            (("ir", "iz", "in"), ("hr", "hz", "hn")):
        scales = np.concatenate([np.asarray(cell[g]["weight_scale"]) for g in group])
        kernels = np.concatenate([np.asarray(v["params"][next(iter(v["params"]))][g]["kernel"]) for g in group], -1)
        # PyTorch's per-tensor symmetric qint8 weight scale over the group's concatenated weight
        np.testing.assert_allclose(scales, np.abs(kernels).max() / 127.5, rtol=1e-6)
    hlo = jax.jit(qm.apply).lower(qv, x).as_text()
    assert f"tensor<{B * T}x{I}xui8>" in hlo or f"tensor<{B * T}x{I}xi8>" in hlo, "no whole-sequence dot"
