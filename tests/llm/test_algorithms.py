"""GPTQ, AWQ and SmoothQuant against numpy references on small matrices, and the calibration pass."""
import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import nnx

from jaxquant.weight_only import WeightOnlyLinear, int4_weight_only, quantize_blockwise
from jaxquant.weight_only.awq import awq_search, quantize_awq
from jaxquant.weight_only.calibration import collect_linear_stats
from jaxquant.weight_only.gptq import GPTQError, gptq_quantize, quantize_gptq
from jaxquant.weight_only.smoothquant import SmoothQuantLinear, smooth_quantize, smoothing_factors


def _correlated_inputs(rows, k, seed=0):
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((k, k)) * 0.3 + np.eye(k)
    x = rng.standard_normal((rows, k)) @ mix
    x[:, :3] *= 8  # a few salient channels, as in LLM activations
    return x.astype(np.float32)


def _np_gptq(w_nk, h, bits, gs, damp):
    """The paper's Algorithm 1 without lazy batching (symmetric, groups chosen at their first column)."""
    w = w_nk.astype(np.float64).copy()
    n, k = w.shape
    h = h + damp * np.mean(np.diag(h)) * np.eye(k)
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    out = np.zeros_like(w)
    for i in range(k):
        if i % gs == 0:
            scale = np.maximum(np.abs(w[:, i:i + gs]).max(1) / ((qmax - qmin) / 2), np.finfo(np.float32).eps)
        q = np.clip(np.round(w[:, i] / scale), qmin, qmax)
        out[:, i] = q * scale
        err = (w[:, i] - out[:, i]) / u[i, i]
        w[:, i:] -= np.outer(err, u[i, i:])
    return out


def test_gptq_matches_unbatched_reference_and_beats_rtn():
    k, n, rows = 64, 24, 512
    x = _correlated_inputs(rows, k)
    w = np.random.default_rng(1).standard_normal((k, n)).astype(np.float32)  # flax (K, N)
    xtx = x.T.astype(np.float64) @ x
    q = gptq_quantize(jnp.asarray(w), xtx, rows, bits=4, group_size=16, block_size=16)
    ref = _np_gptq(w.T, 2 * xtx / rows, 4, 16, 0.01).T
    got = np.asarray(q.dequantize())
    assert np.mean(np.isclose(got, ref, rtol=1e-4, atol=1e-5)) > 0.98  # rare ties may round the other way
    rtn = np.asarray(quantize_blockwise(jnp.asarray(w), bits=4, group_size=16).dequantize())
    err = lambda wq: np.linalg.norm(x @ w - x @ wq)
    assert err(got) < 0.8 * err(rtn), (err(got), err(rtn))
    # act-order (static groups) is also better than round-to-nearest.
    qa = gptq_quantize(jnp.asarray(w), xtx, rows, bits=4, group_size=16, act_order=True)
    assert err(np.asarray(qa.dequantize())) < err(rtn)


def test_gptq_bad_inputs():
    k, n = 32, 8
    w = jnp.asarray(np.random.default_rng(2).standard_normal((k, n)), jnp.float32)
    x = _correlated_inputs(16, k)
    with pytest.raises(GPTQError, match=r"16 calibration rows for 32 inputs"):
        gptq_quantize(w, x.T @ x, 16, group_size=16, where="gptq: 'layer'")
    # Rank-deficient but with enough rows: duplicated input channels make H singular.
    x = _correlated_inputs(100, k // 2)
    x = np.concatenate([x, x], axis=1)
    xtx = x.T.astype(np.float64) @ x
    with pytest.raises(GPTQError, match=r"not positive definite \(damp_percent=0.0\)"):
        gptq_quantize(w, xtx, 100, group_size=16, damp_percent=0.0)
    q = gptq_quantize(w, xtx, 100, group_size=16, damp_percent=0.01)  # damping fixes it
    assert np.all(np.isfinite(np.asarray(q.dequantize())))
    with pytest.raises(ValueError, match="group_size 12 does not divide"):
        gptq_quantize(w, xtx, 100, group_size=12)


def test_awq_loss_is_the_output_error_and_never_worse_than_rtn():
    k, n, rows = 64, 16, 400
    x = _correlated_inputs(rows, k, seed=3)
    w = np.random.default_rng(4).standard_normal((k, n)).astype(np.float32)
    xtx = x.T.astype(np.float64) @ x
    grid = (0.0, 0.5, 1.0)
    alpha, s, losses = awq_search(jnp.asarray(w), xtx, np.abs(x).mean(0), rows, group_size=32, alpha_grid=grid)
    # The Hessian form equals the direct output error ||XW - (X/s) Q(sW)||^2 / rows for each alpha.
    for a, loss in zip(grid, losses):
        sa = np.abs(x).mean(0) ** a
        sa = sa / np.sqrt(sa.max() * sa.min())
        wq = np.asarray(quantize_blockwise(jnp.asarray(w * sa[:, None]), bits=4, group_size=32).dequantize())
        direct = np.sum((x @ w - (x / sa) @ wq) ** 2) / rows
        # alpha = 0 is exact; otherwise s is float32 in the library, which can flip a near-tie code.
        assert loss == pytest.approx(direct, rel=1e-4 if a == 0 else 2e-2)
    assert losses[grid.index(alpha)] <= losses[0]  # alpha = 0 is round-to-nearest
    assert alpha > 0  # salient channels: scaling helps


def test_smoothquant_preserves_float_product_and_beats_per_tensor_w8a8():
    k, n = 48, 32
    rng = np.random.default_rng(5)
    x = rng.standard_normal((256, k)).astype(np.float32)
    x[:, [3, 17]] *= 50  # activation outlier channels
    w = rng.standard_normal((k, n)).astype(np.float32) * 0.1
    s = np.asarray(smoothing_factors(np.abs(x).max(0), w, 0.5))
    np.testing.assert_allclose((x / s) @ (w * s[:, None]), x @ w, rtol=1e-4, atol=1e-3)
    expected = np.sqrt(np.abs(x).max(0)) / np.sqrt(np.abs(w).max(1))
    np.testing.assert_allclose(s, expected, rtol=1e-5)

    class Net(nnx.Module):
        def __init__(self):
            self.lin = nnx.Linear(k, n, use_bias=False, rngs=nnx.Rngs(0))
        def __call__(self, x):
            return self.lin(x)

    net = Net()
    net.lin.kernel.set_value(jnp.asarray(w))
    stats = collect_linear_stats(net, [jnp.asarray(x[:128]), jnp.asarray(x[128:])], progress=False)
    np.testing.assert_allclose(stats["lin"].xtx, x.T.astype(np.float64) @ x, rtol=1e-4, atol=1e-3)  # float32 sums
    np.testing.assert_allclose(stats["lin"].abs_max, np.abs(x).max(0), rtol=1e-6)
    assert stats["lin"].rows == 256 and stats["lin"].sample.shape == (256, k)
    sq = smooth_quantize(net, stats, progress=False)
    assert isinstance(sq.lin, SmoothQuantLinear)
    from jaxquant import per_channel_dynamic_qconfig, quantize_dynamic
    plain = quantize_dynamic(net, {nnx.Linear: per_channel_dynamic_qconfig}, reduce_range=False)
    ref = x @ w
    e_sq = np.linalg.norm(np.asarray(sq(jnp.asarray(x))) - ref)
    e_plain = np.linalg.norm(np.asarray(plain(jnp.asarray(x))) - ref)
    assert e_sq < 0.5 * e_plain, (e_sq, e_plain)
    with pytest.raises(ValueError, match="no layer statistics"):
        smooth_quantize(net, {})


def test_model_level_gptq_and_awq_and_too_little_data():
    k, n = 32, 16

    class Net(nnx.Module):
        def __init__(self):
            self.a = nnx.Linear(k, n, rngs=nnx.Rngs(0))
            self.b = nnx.Linear(n, 8, rngs=nnx.Rngs(1))
        def __call__(self, x):
            return self.b(jax.nn.relu(self.a(x)))

    net = Net()
    x = _correlated_inputs(64, k, seed=6)
    stats = collect_linear_stats(net, [jnp.asarray(x)], progress=False)
    cfg = int4_weight_only(16)
    g = quantize_gptq(net, stats, cfg, progress=False)
    a = quantize_awq(net, stats, cfg, progress=False)
    assert isinstance(g.a, WeightOnlyLinear) and isinstance(a.b, WeightOnlyLinear)
    assert a.a.input_scale.get_value().shape == (k,)
    ref = np.asarray(net(jnp.asarray(x)))
    for m in (g, a):
        out = np.asarray(nnx.jit(lambda m, x: m(x))(m, jnp.asarray(x)))
        assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 0.2
    few = collect_linear_stats(net, [jnp.asarray(x[:8])], progress=False)
    with pytest.raises(GPTQError, match=r"'a'.*8 calibration rows for 32 inputs"):
        quantize_gptq(net, few, cfg, progress=False)
    with pytest.raises(ValueError, match="no calibration batch"):
        collect_linear_stats(net, [], progress=False)


def test_awq_clip_picks_each_groups_best_ratio_like_numpy():
    from jaxquant.weight_only.awq import awq_clip

    rng = np.random.default_rng(5)
    k, n, gs = 64, 6, 32
    w = rng.standard_normal((k, n)).astype(np.float32)
    w[3, :] *= 6  # a large weight per column: clipping it helps the rest of its group
    x = rng.standard_normal((200, k)).astype(np.float32)
    x[:, 40] *= 8
    xtx = (x.T @ x).astype(np.float64)
    grid = (1.0, 0.9, 0.8, 0.7, 0.6)
    q, ratio = awq_clip(jnp.asarray(w), xtx, 200, bits=4, group_size=gs, clip_grid=grid)
    h = xtx / 200
    ref_w = np.zeros_like(w, np.float64)
    tie = np.zeros(w.shape, bool)  # w / s == -7.5 exactly: XLA may round it either way
    for j in range(n):
        for g in range(k // gs):
            sl = slice(g * gs, (g + 1) * gs)
            wg = w[sl, j]
            best = None
            for r in grid:  # symmetric int4: scale = r max|w| / 7.5, codes in [-8, 7] (float32 like the library)
                s = max(np.abs(wg * np.float32(r)).max() / np.float32(7.5), np.finfo(np.float32).eps)
                deq = np.clip(np.round(wg / np.float32(s)), -8, 7).astype(np.float64) * s
                e = wg.astype(np.float64) - deq
                loss = e @ h[sl, sl] @ e
                if best is None or loss < best[0] - 1e-9:
                    best = (loss, r, deq, np.abs(wg / np.float32(s) + 7.5) < 1e-4)
            assert ratio[j, g] == pytest.approx(best[1])
            ref_w[sl, j], tie[sl, j] = best[2], best[3]
    assert tie.sum() <= n * 2
    np.testing.assert_allclose(np.asarray(q.dequantize())[~tie], ref_w[~tie], rtol=1e-5, atol=1e-5)
    assert (ratio < 1).any()  # the search is not a no-op on this weight
    with pytest.raises(ValueError, match="must contain 1.0"):
        awq_clip(jnp.asarray(w), xtx, 200, group_size=gs, clip_grid=(0.9, 0.8))
