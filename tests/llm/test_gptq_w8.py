"""GPTQ at 8 bits, one scale per output channel: the error-compensation update worked by hand, the
lazy-batch / act-order variants against a numpy reference, bad inputs, and a small Llama end to end
(the W8 GPTQ layers decode through the same weight-only kernel as round-to-nearest int8)."""
import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import nnx

import jaxquant as jq
from jaxquant.models.llama import Llama, LlamaConfig
from jaxquant.weight_only import WeightOnlyLinear, quantize_blockwise
from jaxquant.weight_only.gptq import GPTQError, gptq_quantize


def _hand_layer():
    # Flax layout (K=3 inputs, N=2 outputs). Row 0's largest |w| is 1.275 (scale 1.275/127.5 = 0.01),
    # row 1's is 2.55 (scale 0.02); the largest sits in column 2, which the Hessian decouples.
    w_nk = np.array([[0.1236, 0.4945, 1.275],
                     [-0.0310, 0.1080, 2.55]], np.float32)
    # H = 2 X^T X / rows = [[2, 1, 0], [1, 2, 0], [0, 0, 1]]  =>  H^-1 = [[2/3, -1/3, 0], [-1/3, 2/3, 0], [0, 0, 1]].
    # Upper Cholesky U of H^-1: U00 = sqrt(2/3), U01 = -1/sqrt(6), U11 = 1/sqrt(2), U22 = 1, others 0.
    # After column 0: E0 = (w0 - q0) / U00 and w1 -= E0 * U01, i.e. w1 += (w0 - q0) / 2 (the OBS update
    # -(w0 - q0) * Hinv01 / Hinv00); column 2 is untouched (U02 = U12 = 0).
    h = np.array([[2.0, 1.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 1.0]])
    rows = 3
    xtx = h * rows / 2.0
    return w_nk, xtx, rows


def test_gptq_w8_per_channel_compensation_worked_by_hand():
    w_nk, xtx, rows = _hand_layer()
    q = gptq_quantize(jnp.asarray(w_nk.T), xtx, rows, bits=8, group_size=None, damp_percent=0.0)
    assert (q.bits, q.group_size, q.in_features, q.out_features, q.symmetric) == (8, 3, 3, 2, True)
    np.testing.assert_allclose(np.asarray(q.scale)[:, 0], [0.01, 0.02], rtol=1e-6)
    got = np.asarray(q.dequantize()).T  # (N, K)
    # Row 0: q0 = round(12.36) = 12 -> 0.12, error +0.0036; w1 = 0.4945 + 0.0018 = 0.4963 -> code 50 -> 0.50
    # (round-to-nearest gives 49 -> 0.49).
    # Row 1: q0 = round(-1.55) = -2 -> -0.04, error +0.009; w1 = 0.1080 + 0.0045 = 0.1125 -> code 6 -> 0.12
    # (round-to-nearest gives 5 -> 0.10).
    np.testing.assert_allclose(got[:, :2], [[0.12, 0.50], [-0.04, 0.12]], rtol=1e-6)
    rtn = np.asarray(quantize_blockwise(jnp.asarray(w_nk.T), bits=8).dequantize()).T
    np.testing.assert_allclose(rtn[:, :2], [[0.12, 0.49], [-0.04, 0.10]], rtol=1e-6)
    np.testing.assert_array_equal(got[:, 2], rtn[:, 2])  # decoupled column: no compensation reaches it
    # GPTQ minimises the layer's output error tr((W - Q) H (W - Q)^T); here it beats round-to-nearest.
    h = 2 * xtx / rows
    err = lambda wq: float(np.einsum("nk,kl,nl->", w_nk - wq, h, w_nk - wq))
    assert err(got) < err(rtn)
    # Lazy batch updates of one column at a time give the same codes as one block of three.
    q1 = gptq_quantize(jnp.asarray(w_nk.T), xtx, rows, bits=8, group_size=None, damp_percent=0.0, block_size=1)
    np.testing.assert_array_equal(np.asarray(q1.data), np.asarray(q.data))


def _np_gptq_per_channel(w_nk, h, damp, order):
    """Algorithm 1 of the paper, unbatched, int8 symmetric with one scale per row from the unquantized
    weight, columns visited in ``order``."""
    w = w_nk.astype(np.float64)[:, order].copy()
    h = h[np.ix_(order, order)]
    n, k = w.shape
    h = h + damp * np.mean(np.diag(h)) * np.eye(k)
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    scale = np.maximum(np.abs(w_nk).max(1) / 127.5, np.finfo(np.float32).eps)
    out = np.zeros_like(w)
    for i in range(k):
        out[:, i] = np.clip(np.round(w[:, i] / scale), -128, 127) * scale
        w[:, i:] -= np.outer((w[:, i] - out[:, i]) / u[i, i], u[i, i:])
    return out[:, np.argsort(order)]


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_w8_matches_numpy_reference_and_beats_rtn(act_order):
    k, n, rows = 48, 20, 256
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((rows, k)) @ (np.eye(k) + 0.4 * rng.standard_normal((k, k)))).astype(np.float32)
    x[:, :2] *= 10  # salient input channels
    w = rng.standard_normal((k, n)).astype(np.float32)
    xtx = x.T.astype(np.float64) @ x
    q = gptq_quantize(jnp.asarray(w), xtx, rows, bits=8, group_size=None, act_order=act_order, block_size=16)
    h = 2 * xtx / rows
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    ref = _np_gptq_per_channel(w.T, h, 0.01, order).T
    got = np.asarray(q.dequantize())
    assert np.mean(np.isclose(got, ref, rtol=1e-5, atol=1e-6)) > 0.99  # rare near-ties may round the other way
    rtn = np.asarray(quantize_blockwise(jnp.asarray(w), bits=8).dequantize())
    out_err = lambda wq: np.linalg.norm(x @ w - x @ wq)
    assert out_err(got) < 0.7 * out_err(rtn), (out_err(got), out_err(rtn))


def test_gptq_w8_bad_inputs_name_the_layer():
    w_nk, xtx, rows = _hand_layer()
    w = jnp.asarray(w_nk.T)
    for bits in (3, 16):
        with pytest.raises(GPTQError, match=rf"gptq: 'mlp.down': bits must be 4 or 8.*got {bits}"):
            gptq_quantize(w, xtx, rows, bits=bits, group_size=None, where="gptq: 'mlp.down'")
    with pytest.raises(ValueError, match=r"gptq: 'mlp.down': group_size 2 does not divide the contraction size 3"):
        gptq_quantize(w, xtx, rows, bits=8, group_size=2, where="gptq: 'mlp.down'")
    with pytest.raises(ValueError, match=r"group_size must be a positive integer, got 0"):
        gptq_quantize(w, xtx, rows, bits=8, group_size=0)
    with pytest.raises(GPTQError, match=r"block_size .* must be a positive int, got 0"):
        gptq_quantize(w, xtx, rows, bits=8, group_size=None, block_size=0)
    with pytest.raises(GPTQError, match=r"X\^T X has shape \(2, 2\), expected \(3, 3\)"):
        gptq_quantize(w, xtx[:2, :2], rows, bits=8, group_size=None)
    with pytest.raises(GPTQError, match=r"2 calibration rows for 3 inputs"):
        gptq_quantize(w, xtx, 2, bits=8, group_size=None)


def test_gptq_w8_llama_decodes_through_the_weight_only_kernel():
    # Every projection and the head are 32 x 32, so GPTQ's column loop compiles once.
    cfg = LlamaConfig(vocab_size=32, dim=32, n_layers=1, n_heads=2, n_kv_heads=2, hidden_dim=32)
    model = Llama(cfg, rngs=nnx.Rngs(0))
    batches = [jnp.asarray(np.random.default_rng(i).integers(0, 32, (1, 48)), jnp.int32) for i in range(2)]
    stats = jq.collect_linear_stats(model, batches, progress=False)  # every projection and the head
    g = jq.quantize_gptq(model, stats, jq.int8_weight_only(), act_order=True, progress=False)
    mods = [m for _, m in jq.named_modules(g) if isinstance(m, WeightOnlyLinear)]
    assert len(mods) == 7 + 1 and all(m.weight().bits == 8 and m.weight().group_size == m.weight().in_features
                                      for m in mods)
    # One decode row: the kernel's product equals the dequantized weights' float product.
    lin = g.layers[0].mlp.down
    x = jnp.asarray(np.random.default_rng(3).standard_normal((1, 32)), jnp.float32)
    f = jax.jit(lambda x: lin(x))
    if jq.native_backend_available():
        assert "jaxquant_weight_only_gemv" in f.lower(x).compile().as_text()
    ref = np.asarray(x) @ np.asarray(lin.weight().dequantize())
    np.testing.assert_allclose(np.asarray(f(x)), ref, rtol=1e-4, atol=1e-5)
    # On each layer's own calibration inputs, GPTQ's output error is below round-to-nearest int8's.
    for path in ("layers.0.mlp.down", "layers.0.attn.wo", "lm_head"):
        xs = stats[path].sample
        w = np.asarray(jq.get_submodule(model, path).kernel.get_value())
        gq = np.asarray(jq.get_submodule(g, path).weight().dequantize())
        rq = np.asarray(quantize_blockwise(jnp.asarray(w), bits=8).dequantize())
        assert np.linalg.norm(xs @ (w - gq)) < np.linalg.norm(xs @ (w - rq)), path
