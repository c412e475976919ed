"""A conv followed by a clip (ReLU6): ``quantized_conv(clamp=...)`` and ``jq.fuse_quantized_activations``.

The clip of the output codes moves into the conv (the XLA epilogue, or an oneDNN ``eltwise_clip``
post-op inside the native call). Every result must equal, bit for bit, the conv followed by the
separate quantized ReLU6 module it replaces, and a numpy clip of the unclamped conv's codes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxquant as jq
from jaxquant.dtypes import qint8, quint8
from jaxquant.kernels.conv import clamp_codes, pack_conv, quantized_conv
from jaxquant.native import native_backend_available, native_backend_reason, use_native
from jaxquant.nn import ReLU6
from jaxquant.qtensor import QTensor

needs_native = pytest.mark.skipif(not native_backend_available(),
                                  reason=f"native backend unavailable: {native_backend_reason()}")

CASES = [  # spatial, cin, cout, kernel, strides, padding, groups
    ((9, 9), 8, 16, (3, 3), (1, 1), "SAME", 1),
    ((8, 8), 16, 24, (1, 1), (1, 1), "VALID", 1),
    ((9, 9), 16, 16, (5, 5), (2, 2), ((1, 2), (1, 2)), 16),   # depthwise 5x5 stride 2, asymmetric pad
]
# (lo, hi) output codes: ReLU6-like, lo above hi, bounds outside the dtype's range, both out of range
CLAMPS = [(128, 180), (140, 120), (-1000, 1000), (100, 100), (300, 400)]


def _conv_setup(case, out_dtype):
    sp, cin, cout, ks, st, pad, g = case
    rng = np.random.default_rng(cin + cout + g)
    w = rng.integers(-128, 128, ks + (cin // g, cout), dtype=np.int8)
    x = rng.integers(0, 256, (1,) + sp + (cin,)).astype(np.uint8)
    sw = rng.uniform(1e-3, 1e-2, cout).astype(np.float32)
    bias = rng.standard_normal(cout).astype(np.float32) * 0.3
    k_red = int(np.prod(ks)) * cin // g
    out_scale = np.float32(0.02 * 5.5e-3 * 74 * 74 * np.sqrt(k_red) * 3 / 128)
    with use_native(True):
        p = pack_conv(w, sw, 0, bias, strides=st, padding=pad, groups=g)
    xq = QTensor(jnp.asarray(x), jnp.float32(0.02), jnp.int32(120), quint8)
    out_q = quint8 if out_dtype == np.uint8 else qint8
    out_zp = jnp.int32(128 if out_dtype == np.uint8 else 0)
    return p, xq, out_scale, out_zp, out_q


def _run(fn, *args, native):
    with use_native(native):
        jaxpr = str(jax.make_jaxpr(fn)(*args))
        return np.asarray(jax.jit(fn)(*args)), jaxpr


@pytest.mark.parametrize("case", CASES, ids=["3x3", "1x1", "dw5x5s2"])
@pytest.mark.parametrize("out_dtype", [np.uint8, np.int8])
def test_clamped_conv_equals_conv_then_numpy_clip(case, out_dtype):
    p, xq, out_scale, out_zp, out_q = _conv_setup(case, out_dtype)
    plain = lambda xq: quantized_conv(xq, p, out_scale, out_zp, out_dtype=out_q).int_data
    ref_codes, _ = _run(plain, xq, native=False)
    assert len(np.unique(ref_codes)) > 50  # the outputs spread over the range, so the clip bites
    info = np.iinfo(out_dtype)
    for lo, hi in CLAMPS:
        if out_dtype == np.int8:
            lo, hi = lo - 128, hi - 128
        # the quantized ReLU6 module's rule: clip in int32, then saturate into the dtype
        want = np.clip(np.clip(ref_codes.astype(np.int64), lo, hi) if lo <= hi else hi, info.min, info.max)
        want = np.broadcast_to(want, ref_codes.shape).astype(out_dtype)
        clamp = jnp.asarray([lo, hi], jnp.int32)
        fn = lambda xq, c: quantized_conv(xq, p, out_scale, out_zp, out_dtype=out_q, clamp=c).int_data
        xla, _ = _run(fn, xq, clamp, native=False)
        np.testing.assert_array_equal(xla, want, err_msg=f"XLA, clamp {(lo, hi)}")
        if native_backend_available():
            native, jaxpr = _run(fn, xq, clamp, native=True)
            assert "jaxquant_conv_u8s8_clamp" in jaxpr
            np.testing.assert_array_equal(native, want, err_msg=f"native, clamp {(lo, hi)}")


def test_N04_clamp_codes_match_the_relu6_module_and_refuse_lo_above_hi():
    """clamp_codes(0, 6) are the bounds the quantized ReLU6 module clips to, worked by hand."""
    for scale, zp in ((6.0 / 127, 0), (0.05, 100), (0.7, 250), (0.03, -10)):
        lo, hi = np.asarray(clamp_codes(0.0, 6.0, jnp.float32(scale), jnp.int32(zp)))
        assert lo == zp and hi == zp + round(6.0 / np.float32(scale))
    assert np.asarray(clamp_codes(0.0, float("inf"), jnp.float32(0.1), jnp.int32(3))).tolist() == [3, 2**31 - 1]
    with pytest.raises(ValueError, match="lower bound 6.0 is above its upper bound 0.0"):
        clamp_codes(6.0, 0.0, jnp.float32(0.1), jnp.int32(3))


@pytest.fixture(scope="module")
def small_int8():
    """A two-block EfficientNet-Lite (stem, depthwise 3x3, expand, depthwise 5x5 stride 2, head), int8."""
    from jaxquant.models import efficientnet_lite as eff
    blocks = (eff.BlockConfig(1, 3, 1, 1, 8, 8), eff.BlockConfig(1, 5, 2, 2, 8, 12))
    model = eff.EfficientNetLite(blocks, stem_ch=8, head_ch=16, num_classes=5, rngs=nnx.Rngs(9))
    model.eval()
    x = eff.preprocess(np.random.default_rng(10).integers(0, 256, (2, 24, 24, 3)).astype(np.uint8))
    # each conv's output is observed before its ReLU6 (as PyTorch's eager mode): both clip bounds bite
    qconfig = jq.QConfig(activation=jq.MinMaxObserver.with_args(reduce_range=True),
                         weight=jq.default_per_channel_weight_observer)
    observed = jq.prepare(jq.fuse_modules(model, eff.fusion_patterns(model)), qconfig)
    jq.calibrate(observed, [x], progress=False)
    return jq.convert(observed), x, eff


def test_fused_model_equals_unfused_model(small_int8):
    int8, x, eff = small_int8
    pairs = eff.activation_patterns(int8)
    assert len(pairs) == 5 and pairs[0] == ["stem.conv", "stem.act"]
    fused = jq.fuse_quantized_activations(int8, pairs)
    assert isinstance(int8.stem.act, ReLU6)  # the input model is untouched
    assert type(fused.stem.act).__name__ == "Identity" and fused.stem.conv.clamp == (0.0, 6.0)
    ref, _ = _run(lambda v: int8(v), x, native=False)  # today's program: conv, then the ReLU6 module
    assert np.std(ref) > 0
    xla, _ = _run(lambda v: fused(v), x, native=False)
    np.testing.assert_array_equal(xla, ref)
    if native_backend_available():
        native, jaxpr = _run(lambda v: fused(v), x, native=True)
        assert jaxpr.count("jaxquant_conv_u8s8_clamp") == len(pairs)
        np.testing.assert_array_equal(native, ref)


def test_N03_fuse_quantized_activations_bad_input(small_int8):
    int8, _, eff = small_int8
    with pytest.raises(ValueError, match="'stem.bn' is a Identity; only ReLU6, ReLU fold"):
        jq.fuse_quantized_activations(int8, [["stem.conv", "stem.bn"]])
    with pytest.raises(ValueError, match="'stem.act' is a ReLU6, not a converted int8 Conv; call jq.convert"):
        jq.fuse_quantized_activations(int8, [["stem.act", "stem.act"]])
    with pytest.raises(ValueError, match="no submodule 'stem.nope'"):
        jq.fuse_quantized_activations(int8, [["stem.conv", "stem.nope"]])
    with pytest.raises(ValueError, match="'stem.conv' already has a clip folded in"):
        jq.fuse_quantized_activations(int8, [["stem.conv", "stem.act"], ["stem.conv", "head.act"]])
    with pytest.raises(ValueError, match="each pair is"):
        jq.fuse_quantized_activations(int8, ["stem.conv"])
    assert isinstance(int8.stem.act, ReLU6) and int8.stem.conv.clamp is None  # nothing half-done
    float_model = eff.EfficientNetLite(eff.LITE0_BLOCKS[:1], stem_ch=8, head_ch=16, num_classes=5,
                                       rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="call jq.convert first"):
        jq.fuse_quantized_activations(float_model, eff.activation_patterns(float_model))


def test_graph_mode_conv_relu6_clamps_in_the_conv():
    """Graph mode's conv unit with a ReLU6 (``jax.nn.relu6``) hands its clamp to the conv kernel:
    one native call with the clip, the same outputs as the pure-XLA program, close to the float function."""
    def net(params, x):
        y = jax.lax.conv_general_dilated(x, params["w"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jax.nn.relu6(y + params["b"]).mean(axis=(1, 2))

    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(0, 0.5, (3, 3, 4, 8)), jnp.float32),
              "b": jnp.asarray(rng.normal(0, 1, 8), jnp.float32)}
    x = jnp.asarray(rng.normal(0, 2, (2, 6, 6, 4)), jnp.float32)
    observed = jq.graph.prepare(net, (params, x), jq.default_per_channel_qconfig)
    assert observed.units == [("w", "conv", ("add", "clamp"))]
    qprog = jq.graph.convert(observed, jq.graph.calibrate(observed, [x], progress=False))
    xla, _ = _run(lambda v: qprog(v), x, native=False)
    ref = np.asarray(net(params, x))
    assert np.abs(xla - ref).max() < 0.1 * np.abs(ref).max()
    if native_backend_available():
        native, jaxpr = _run(lambda v: qprog(v), x, native=True)
        assert "jaxquant_conv_u8s8_clamp" in jaxpr
        np.testing.assert_array_equal(native, xla)
