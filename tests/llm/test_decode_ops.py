"""The native decode-step ops (jaxquant/native/csrc/decode_ops.cc) against float64 numpy references
worked from the formulas, and the Llama decode step that uses them against the pure-XLA step."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxquant as jq
from jaxquant.models.llama import Llama, LlamaConfig, init_cache, make_forward
from jaxquant.native.decode_ops import add_rms_norm, decode_attention, decode_ops_supported

pytestmark = pytest.mark.skipif(not decode_ops_supported(), reason="native decode ops unavailable")


def _ref_norm(r, w, eps):
    r = r.astype(np.float64)
    return r / np.sqrt(np.mean(r * r, axis=-1, keepdims=True) + eps) * w


@pytest.mark.parametrize("residual", [False, True])
def test_add_rms_norm_matches_numpy(residual):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 1, 40)).astype(np.float32) * 3
    h = rng.standard_normal((3, 1, 40)).astype(np.float32) if residual else None
    w = (1 + 0.3 * rng.standard_normal(40)).astype(np.float32)
    r, y = jax.jit(lambda x, h: add_rms_norm(x, h, jnp.asarray(w), 1e-5))(jnp.asarray(x), None if h is None else jnp.asarray(h))
    r_ref = x.astype(np.float64) + (0 if h is None else h)
    np.testing.assert_allclose(np.asarray(r), r_ref, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(y), _ref_norm(r_ref, w, 1e-5), rtol=2e-6, atol=1e-6)


def _rope_np(x, pos, theta):
    d = x.shape[-1]
    ang = pos * theta ** (-np.arange(0, d, 2) / d)
    c, s = np.cos(ang), np.sin(ang)
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = a * c - b * s, a * s + b * c
    return out


@pytest.mark.parametrize("pos", [0, 5, 9, 13])
def test_decode_attention_matches_numpy(pos):
    # B=2, cache of 10 slots, 2 KV heads shared by 3 query heads each, head dim 8. pos 13 is past the
    # cache: the write lands in the last slot (as lax.dynamic_update_slice clamps) and every slot is read.
    b, s, kvh, g, d, theta = 2, 10, 2, 3, 8, 10000.0
    rng = np.random.default_rng(pos)
    q = rng.standard_normal((b, kvh * g * d)).astype(np.float32)
    k = rng.standard_normal((b, kvh * d)).astype(np.float32)
    v = rng.standard_normal((b, kvh * d)).astype(np.float32)
    ck = rng.standard_normal((b, s, kvh, d)).astype(np.float32)
    cv = rng.standard_normal((b, s, kvh, d)).astype(np.float32)
    ang = np.float32(pos) * (theta ** (-np.arange(0, d, 2) / d)).astype(np.float32)
    out, nk, nv = jax.jit(decode_attention)(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.cos(ang),
                                            jnp.sin(ang), jnp.asarray(ck), jnp.asarray(cv), jnp.int32(pos))
    slot = min(pos, s - 1)
    ek, ev = ck.astype(np.float64).copy(), cv.astype(np.float64).copy()
    ek[:, slot] = _rope_np(k.reshape(b, kvh, d).astype(np.float64), pos, theta)
    ev[:, slot] = v.reshape(b, kvh, d)
    np.testing.assert_allclose(np.asarray(nk), ek, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(nv), ev, rtol=0, atol=0)
    qr = _rope_np(q.reshape(b, kvh, g, d).astype(np.float64), pos, theta)
    n = min(pos + 1, s)
    scores = np.einsum("bkgd,bskd->bkgs", qr, ek[:, :n]) / np.sqrt(d)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ref = np.einsum("bkgs,bskd->bkgd", p, ev[:, :n]).reshape(b, -1)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)


CFG = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, norm_eps=1e-5,
                  rope_theta=10000.0, max_seq_len=64, tie_embeddings=False)


@pytest.mark.parametrize("quantized", [False, True])
def test_native_decode_step_equals_pure_xla_step(quantized):
    """The Llama decode step with the fused ops (native on) against the pure-XLA step, float and W8:
    logits within float rounding at every step, the caches alike, and the compiled step holds one
    attention call per layer and one norm call per norm (none with native off)."""
    model = Llama(CFG, rngs=nnx.Rngs(0))
    if quantized:
        model = jq.quantize_weight_only(model, jq.int8_weight_only(decode_rows=0))  # float matmul both ways
    tokens = np.random.default_rng(5).integers(0, CFG.vocab_size, (2, 5)).astype(np.int32)
    runs = {}
    for on in (False, True):
        with jq.use_native(on):
            forward, state = make_forward(model)
            cache = init_cache(CFG, 2, 8)
            step = forward.lower(state, jnp.asarray(tokens[:, :1]), cache, jnp.int32(0)).compile()  # one compile
            outs = []
            for i in range(tokens.shape[1]):  # token by token from an empty cache
                logits, cache = step(state, jnp.asarray(tokens[:, i:i + 1]), cache, jnp.int32(i))
                outs.append(np.asarray(logits))
            runs[on] = (outs, [np.asarray(a) for kv in cache for a in kv], step.as_text())
    for a, b in zip(runs[False][0], runs[True][0]):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * np.abs(a).max())
    for a, b in zip(runs[False][1], runs[True][1]):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * np.abs(a).max())
    native_text, xla_text = runs[True][2], runs[False][2]
    assert native_text.count('custom_call_target="jaxquant_decode_attention"') == CFG.n_layers
    assert native_text.count('custom_call_target="jaxquant_add_rms_norm"') == 2 * CFG.n_layers + 1
    assert "jaxquant_decode_attention" not in xla_text and "jaxquant_add_rms_norm" not in xla_text


def test_prefill_and_bf16_caches_stay_on_xla():
    # The fused ops cover one new token on a float32 cache; a prompt (T > 1) and other cache dtypes
    # keep the pure-JAX code.
    model = Llama(dataclasses.replace(CFG, n_layers=1), rngs=nnx.Rngs(0))
    forward, state = make_forward(model)
    cache = init_cache(model.config, 1, 8)
    text = forward.lower(state, jnp.zeros((1, 4), jnp.int32), cache, jnp.int32(0)).as_text()
    assert "jaxquant_decode_attention" not in text and "jaxquant_add_rms_norm" not in text
    cache16 = init_cache(model.config, 1, 8, jnp.bfloat16)
    text = forward.lower(state, jnp.zeros((1, 1), jnp.int32), cache16, jnp.int32(0)).as_text()
    assert "jaxquant_decode_attention" not in text
