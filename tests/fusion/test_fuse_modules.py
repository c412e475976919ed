"""fuse_modules / fuse_modules_qat on NNX models: outputs, structure, paths, inplace, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxquant.fusion import (
    DEFAULT_OP_LIST_TO_FUSER_METHOD,
    fuse_conv_bn,
    fuse_known_modules,
    fuse_modules,
    fuse_modules_qat,
    get_fuser_method,
)
from jaxquant.module_paths import get_submodule
from jaxquant.nn import Identity, ReLU, ReLU6
from jaxquant.nn.intrinsic import BNReLU, ConvBn, ConvBnReLU, ConvReLU, LinearBn, LinearReLU


def _randomize_bn(bn: nnx.BatchNorm, seed: int) -> None:
    """Non-trivial running stats, scale and bias, so folding is really exercised."""
    rng = np.random.default_rng(seed)
    c = bn.mean.shape[0]
    bn.mean.set_value(jnp.asarray(rng.normal(size=c), jnp.float32))
    bn.var.set_value(jnp.asarray(rng.uniform(0.1, 2.0, size=c), jnp.float32))
    if bn.scale is not None:
        bn.scale.set_value(jnp.asarray(rng.normal(size=c), jnp.float32))
    if bn.bias is not None:
        bn.bias.set_value(jnp.asarray(rng.normal(size=c), jnp.float32))


def _build(make, seed: int = 0):
    """``make()`` with random float32 values in every variable and random BatchNorm stats.

    Built abstractly and filled from numpy: NNX's initializers run eagerly, one XLA compile per op
    and shape, which costs seconds per model on a loaded 2-core machine."""
    graphdef, state = nnx.split(nnx.eval_shape(make))
    rng = np.random.default_rng(seed)
    state = jax.tree.map(
        lambda v: jnp.asarray(rng.normal(scale=0.5, size=v.shape), v.dtype)
        if jnp.issubdtype(v.dtype, jnp.floating) else jnp.zeros(v.shape, v.dtype), state)
    model = nnx.merge(graphdef, state)
    for i, (_, m) in enumerate(nnx.iter_graph(model)):
        if isinstance(m, nnx.BatchNorm):
            _randomize_bn(m, seed + 1 + i)
    return model


def _x(shape, seed: int = 0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


@nnx.jit
def _run(model, x):
    return model(x)


def _assert_close(actual, expected, rtol=1e-5):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * np.abs(expected).max())


def _state_arrays(model):
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))


class Chain(nnx.Module):
    """layer -> bn -> relu, where each slot may be skipped."""

    def __init__(self, layer, bn=None, relu=None):
        self.layer = layer
        self.bn = bn
        self.relu = relu

    def __call__(self, x):
        for m in (self.layer, self.bn, self.relu):
            if m is not None:
                x = m(x)
        return x


def _built(make, seed: int = 0):
    """``_build(lambda: make(nnx.Rngs(0)))``."""
    return _build(lambda: make(_rngs()), seed)


def _rngs():
    return nnx.Rngs(0)


CONV_CASES = {
    "conv1d": (lambda r: nnx.Conv(4, 6, (3,), rngs=r), (2, 9, 4)),
    "conv2d_nobias": (lambda r: nnx.Conv(4, 8, (3, 3), use_bias=False, rngs=r), (2, 7, 7, 4)),
    "conv2d_strided": (lambda r: nnx.Conv(4, 8, (3, 3), strides=2, padding="VALID", rngs=r),
                       (2, 9, 9, 4)),
    "conv2d_grouped": (lambda r: nnx.Conv(4, 8, (3, 3), feature_group_count=2, rngs=r),
                       (2, 6, 6, 4)),
    "conv2d_depthwise": (lambda r: nnx.Conv(6, 6, (3, 3), feature_group_count=6, use_bias=False,
                                            rngs=r), (2, 6, 6, 6)),
    "conv3d": (lambda r: nnx.Conv(3, 5, (2, 3, 3), rngs=r), (1, 4, 5, 5, 3)),
    "convT": (lambda r: nnx.ConvTranspose(4, 6, (3, 3), strides=2, rngs=r), (2, 5, 5, 4)),
    "convT_transpose_kernel": (lambda r: nnx.ConvTranspose(4, 6, (3, 3), transpose_kernel=True,
                                                           use_bias=False, rngs=r), (2, 5, 5, 4)),
}


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv_bn_eval_fusion_preserves_outputs(case):
    make, shape = CONV_CASES[case]
    model = _built(lambda r: Chain(layer := make(r), nnx.BatchNorm(layer.out_features, rngs=r)), 1)
    layer = model.layer
    model.eval()
    x = _x(seed=2, shape=shape)
    expected = _run(model, x)
    fused = fuse_modules(model, ["layer", "bn"])
    assert type(fused.layer) is type(layer)
    assert isinstance(fused.bn, Identity)
    assert fused.layer.bias is not None
    _assert_close(_run(fused, x), expected)
    assert model.bn is not fused.bn and isinstance(model.bn, nnx.BatchNorm)  # original untouched


@pytest.mark.parametrize("case", [c for c in CONV_CASES if not c.startswith("convT")])
def test_conv_bn_relu_eval_fusion(case):
    make, shape = CONV_CASES[case]
    model = _built(lambda r: Chain(layer := make(r), nnx.BatchNorm(layer.out_features, rngs=r),
                                   ReLU()), 3)
    model.eval()
    x = _x(seed=4, shape=shape)
    expected = _run(model, x)
    assert (expected < 0).sum() == 0 and (expected == 0).sum() > 0  # the ReLU matters here
    fused = fuse_modules(model, ["layer", "bn", "relu"])
    assert isinstance(fused.layer, ConvReLU) and isinstance(fused.layer.conv, nnx.Conv)
    assert isinstance(fused.bn, Identity) and isinstance(fused.relu, Identity)
    _assert_close(_run(fused, x), expected)


@pytest.mark.parametrize("use_bias", [True, False])
def test_linear_bn_eval_fusion(use_bias):
    model = _built(lambda r: Chain(nnx.Linear(10, 7, use_bias=use_bias, rngs=r),
                                   nnx.BatchNorm(7, rngs=r)), 5)
    model.eval()
    x = _x(seed=6, shape=(5, 10))
    expected = _run(model, x)
    fused = fuse_modules(model, ["layer", "bn"])
    assert isinstance(fused.layer, nnx.Linear) and isinstance(fused.bn, Identity)
    _assert_close(_run(fused, x), expected)


def test_bn_without_scale_or_bias_folds():
    model = _built(lambda r: Chain(nnx.Conv(3, 4, (3, 3), rngs=r),
                                   nnx.BatchNorm(4, use_scale=False, use_bias=False, rngs=r)), 7)
    model.eval()
    x = _x(seed=8, shape=(2, 5, 5, 3))
    _assert_close(_run(fuse_modules(model, ["layer", "bn"]), x), _run(model, x))


@pytest.mark.parametrize("make,shape,fused_type", [
    (lambda r: Chain(nnx.Conv(3, 4, (3, 3), rngs=r), relu=ReLU()), (2, 5, 5, 3), ConvReLU),
    (lambda r: Chain(nnx.Linear(3, 4, rngs=r), relu=ReLU()), (2, 3), LinearReLU),
    (lambda r: Chain(nnx.BatchNorm(3, rngs=r), relu=ReLU()), (2, 5, 5, 3), BNReLU),
])
@pytest.mark.parametrize("qat", [False, True])
def test_relu_patterns(make, shape, fused_type, qat):
    model = _built(make, 9)
    model.eval()
    x = _x(seed=10, shape=shape)
    expected = _run(model, x)
    fused = (fuse_modules_qat if qat else fuse_modules)(model, ["layer", "relu"])
    assert type(fused.layer) is fused_type and isinstance(fused.relu, Identity)
    _assert_close(_run(fused, x), expected)


def test_qat_fusion_keeps_bn_and_matches_train_and_eval_outputs():
    class Net(nnx.Module):
        def __init__(self):
            r = _rngs()
            self.conv1 = nnx.Conv(3, 4, (3, 3), use_bias=False, rngs=r)
            self.bn1 = nnx.BatchNorm(4, rngs=r)
            self.relu1 = ReLU()
            self.conv2 = nnx.Conv(4, 4, (1, 1), rngs=r)
            self.bn2 = nnx.BatchNorm(4, rngs=r)
            self.fc = nnx.Linear(4, 5, rngs=r)
            self.bn3 = nnx.BatchNorm(5, rngs=r)

        def __call__(self, x):
            x = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
            return self.bn3(self.fc(x.mean(axis=(1, 2))))

    model = _build(Net, 20)
    x = _x(seed=11, shape=(4, 6, 6, 3))
    groups = [["conv1", "bn1", "relu1"], ["conv2", "bn2"], ["fc", "bn3"]]
    qat = fuse_modules_qat(model, groups)
    assert type(qat.conv1) is ConvBnReLU and type(qat.conv2) is ConvBn and type(qat.fc) is LinearBn
    assert all(isinstance(getattr(qat, n), Identity) for n in ("bn1", "relu1", "bn2", "bn3"))
    # unfolded: same parameters, BN statistics carried over
    np.testing.assert_array_equal(qat.conv1.conv.kernel[...], model.conv1.kernel[...])
    np.testing.assert_array_equal(qat.conv1.bn.mean[...], model.bn1.mean[...])
    # train mode (batch statistics) and eval mode both behave as the unfused model
    _assert_close(_run(qat, x), _run(model, x))
    np.testing.assert_allclose(qat.conv1.bn.mean[...], model.bn1.mean[...], rtol=1e-6, atol=1e-7)
    model.eval()
    qat.eval()
    _assert_close(_run(qat, x), _run(model, x))


class Block(nnx.Module):
    def __init__(self, cin, cout, r):
        self.conv = nnx.Conv(cin, cout, (3, 3), use_bias=False, rngs=r)
        self.bn = nnx.BatchNorm(cout, rngs=r)
        self.act = ReLU()

    def __call__(self, x):
        return self.act(self.bn(self.conv(x)))


class Net(nnx.Module):
    """Nested modules, an nnx.List of blocks and an nnx.Sequential head."""

    def __init__(self, r):
        self.stem = Block(3, 4, r)
        self.blocks = nnx.List([Block(4, 4, r), Block(4, 6, r)])
        self.head = nnx.Sequential(nnx.Linear(6, 8, rngs=r), nnx.BatchNorm(8, rngs=r), ReLU(),
                                   nnx.Linear(8, 3, rngs=r))

    def __call__(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = b(x)
        return self.head(x.mean(axis=(1, 2)))


GROUPS = [["stem.conv", "stem.bn", "stem.act"],
          ["blocks.0.conv", "blocks.0.bn", "blocks.0.act"],
          ["blocks.1.conv", "blocks.1.bn"],
          ["head.layers.0", "head.layers.1"]]


def _net():
    model = _built(Net, 100)
    model.eval()
    return model


def test_nested_list_and_sequential_paths():
    model = _net()
    x = _x(seed=12, shape=(2, 6, 6, 3))
    expected = _run(model, x)
    fused = fuse_modules(model, GROUPS)
    assert isinstance(fused.stem.conv, ConvReLU)
    assert isinstance(fused.blocks[0].conv, ConvReLU)
    assert isinstance(fused.blocks[1].conv, nnx.Conv) and isinstance(fused.blocks[1].bn, Identity)
    assert isinstance(fused.blocks[1].act, ReLU)  # not in any group: untouched
    assert isinstance(fused.head.layers[0], nnx.Linear)
    assert isinstance(fused.head.layers[1], Identity)
    _assert_close(_run(fused, x), expected)
    # the fused model still jits and splits like any NNX model
    graphdef, state = nnx.split(fused)
    _assert_close(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x), expected)


def test_not_inplace_leaves_original_untouched():
    model = _net()
    before = _state_arrays(model)
    fused = fuse_modules(model, GROUPS)
    assert fused is not model
    assert type(model.stem.conv) is nnx.Conv and type(model.head.layers[1]) is nnx.BatchNorm
    jax.tree.map(np.testing.assert_array_equal, _state_arrays(model), before)


def test_inplace_changes_given_model():
    model = _net()
    x = _x(seed=13, shape=(2, 6, 6, 3))
    expected = _run(model, x)
    out = fuse_modules(model, GROUPS, inplace=True)
    assert out is model
    assert isinstance(model.stem.conv, ConvReLU) and isinstance(model.head.layers[1], Identity)
    _assert_close(_run(model, x), expected)


def test_failed_group_leaves_model_untouched_even_inplace():
    model = _net()
    before = _state_arrays(model)
    bad = GROUPS[:2] + [["blocks.1.conv", "blocks.1.nope"]]
    with pytest.raises(KeyError, match="blocks.1.nope"):
        fuse_modules(model, bad, inplace=True)
    assert type(model.stem.conv) is nnx.Conv and type(model.blocks[0].bn) is nnx.BatchNorm
    jax.tree.map(np.testing.assert_array_equal, _state_arrays(model), before)


def test_matches_torch_fuse_modules():
    torch = pytest.importorskip("torch")
    tnn = torch.nn

    torch.manual_seed(0)
    tm = tnn.Sequential(tnn.Conv2d(3, 8, 3, padding=1, bias=False), tnn.BatchNorm2d(8), tnn.ReLU(),
                        tnn.Conv2d(8, 8, 3, padding=1, groups=8), tnn.BatchNorm2d(8))
    for bn in (tm[1], tm[4]):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.2, 2)
        bn.weight.data.uniform_(-2, 2)
        bn.bias.data.uniform_(-1, 1)
    tm.eval()

    fm = _built(lambda r: nnx.Sequential(
        nnx.Conv(3, 8, (3, 3), padding=1, use_bias=False, rngs=r), nnx.BatchNorm(8, rngs=r),
        ReLU(), nnx.Conv(8, 8, (3, 3), padding=1, feature_group_count=8, rngs=r),
        nnx.BatchNorm(8, rngs=r)))
    for i in (0, 3):
        w = tm[i].weight.detach().numpy().transpose(2, 3, 1, 0)
        fm.layers[i].kernel.set_value(jnp.asarray(w))
    fm.layers[3].bias.set_value(jnp.asarray(tm[3].bias.detach().numpy()))
    for i in (1, 4):
        fm.layers[i].mean.set_value(jnp.asarray(tm[i].running_mean.numpy()))
        fm.layers[i].var.set_value(jnp.asarray(tm[i].running_var.numpy()))
        fm.layers[i].scale.set_value(jnp.asarray(tm[i].weight.detach().numpy()))
        fm.layers[i].bias.set_value(jnp.asarray(tm[i].bias.detach().numpy()))
    fm.eval()

    tf = torch.ao.quantization.fuse_modules(tm, [["0", "1", "2"], ["3", "4"]])
    ff = fuse_modules(fm, [["layers.0", "layers.1", "layers.2"], ["layers.3", "layers.4"]])
    for tconv, fconv in ((tf[0][0], ff.layers[0].conv), (tf[3], ff.layers[3])):
        np.testing.assert_allclose(fconv.kernel[...],
                                   tconv.weight.detach().numpy().transpose(2, 3, 1, 0),
                                   rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(fconv.bias[...], tconv.bias.detach().numpy(),
                                   rtol=1e-6, atol=1e-6)
    x = np.random.default_rng(1).normal(size=(2, 3, 6, 6)).astype(np.float32)
    with torch.no_grad():
        ty = tf(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
    _assert_close(_run(ff, jnp.asarray(x.transpose(0, 2, 3, 1))), ty, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# errors


def test_bn_in_train_mode_is_rejected_for_eval_fusion():
    model = _built(lambda r: Chain(nnx.Conv(3, 4, (3, 3), rngs=r), nnx.BatchNorm(4, rngs=r)))
    with pytest.raises(ValueError, match=r"\['layer', 'bn'\].*call model.eval\(\) first, or use "
                                         r"fuse_modules_qat"):
        fuse_modules(model, ["layer", "bn"])
    assert type(fuse_modules_qat(model, ["layer", "bn"]).layer) is ConvBn


def test_unsupported_pattern_lists_supported_ones():
    model = _built(lambda r: Chain(nnx.Conv(3, 4, (3, 3), rngs=r), nnx.BatchNorm(4, rngs=r),
                                   ReLU6()))
    model.eval()
    with pytest.raises(NotImplementedError) as info:
        fuse_modules(model, ["layer", "bn", "relu"])
    msg = str(info.value)
    assert "['layer', 'bn', 'relu']" in msg and "(Conv, BatchNorm, ReLU6)" in msg
    assert "supported patterns" in msg and "(Conv, BatchNorm, ReLU)" in msg
    assert "(Linear, ReLU)" in msg
    with pytest.raises(NotImplementedError, match=r"\(Conv, ReLU6\)"):
        fuse_modules(model, ["layer", "relu"])
    with pytest.raises(NotImplementedError, match=r"\(BatchNorm, Conv\)"):
        fuse_modules(model, ["bn", "layer"])


def test_missing_path_is_named():
    model = _net()
    with pytest.raises(KeyError, match=r"blocks\.5\.conv"):
        fuse_modules(model, [["blocks.5.conv", "blocks.5.bn"]])
    with pytest.raises(KeyError, match="stem.bnn"):
        fuse_modules(model, ["stem.conv", "stem.bnn"])


@pytest.mark.parametrize("qat", [False, True])
def test_channel_mismatch_is_named(qat):
    model = _built(lambda r: Chain(nnx.Conv(3, 4, (3, 3), rngs=r), nnx.BatchNorm(5, rngs=r)))
    model.eval()
    fuse = fuse_modules_qat if qat else fuse_modules
    with pytest.raises(ValueError, match=r"\['layer', 'bn'\].*5 features.*4 output"):
        fuse(model, ["layer", "bn"])
    lin = _built(lambda r: Chain(nnx.Linear(3, 4, rngs=r), nnx.BatchNorm(6, rngs=r)))
    lin.eval()
    with pytest.raises(ValueError, match=r"\['layer', 'bn'\].*6 features.*4 output"):
        fuse(lin, ["layer", "bn"])


def test_bn_over_another_axis_is_rejected():
    model = _built(lambda r: Chain(nnx.Conv(3, 4, (3, 3), rngs=r),
                                   nnx.BatchNorm(4, axis=1, rngs=r)))
    model.eval()
    with pytest.raises(ValueError, match="axis 1.*axis=-1"):
        fuse_modules(model, ["layer", "bn"])


def test_qat_specific_errors():
    convt = _built(lambda r: Chain(nnx.ConvTranspose(3, 4, (3, 3), rngs=r),
                                   nnx.BatchNorm(4, rngs=r)))
    with pytest.raises(NotImplementedError, match="ConvTranspose.*QAT"):
        fuse_modules_qat(convt, ["layer", "bn"])
    noscale = _built(lambda r: Chain(nnx.Conv(3, 4, (3, 3), rngs=r),
                                     nnx.BatchNorm(4, use_scale=False, rngs=r)))
    with pytest.raises(ValueError, match="use_scale=True"):
        fuse_modules_qat(noscale, ["layer", "bn"])


def test_function_instead_of_module_is_named():
    model = _built(lambda r: nnx.Sequential(nnx.Linear(3, 4, rngs=r), nnx.relu))
    with pytest.raises(TypeError, match=r"'layers.1' is a .*not a module.*jaxquant.nn.ReLU"):
        fuse_modules(model, ["layers.0", "layers.1"])


def test_malformed_groups():
    model = _net()
    with pytest.raises(TypeError, match="list of module paths"):
        fuse_modules(model, "stem.conv")
    with pytest.raises(ValueError, match="at least two"):
        fuse_modules(model, [["stem.conv"]])
    with pytest.raises(ValueError, match="more than once"):
        fuse_modules(model, ["stem.conv", "stem.conv"])
    with pytest.raises(ValueError, match="unknown keys"):
        fuse_modules(model, GROUPS, fuse_custom_config_dict={"additional_fuser_mapping": {}})


# ------------------------------------------------------------------------------------------------
# extension points


class ConvReLU6(nnx.Module):
    def __init__(self, conv, act):
        self.conv, self.act = conv, act

    def __call__(self, x):
        return self.act(self.conv(x))


def test_additional_fuser_method_mapping():
    model = _built(lambda r: Chain(nnx.Conv(3, 4, (3, 3), rngs=r), nnx.BatchNorm(4, rngs=r),
                                   ReLU6()), 30)
    model.eval()
    x = _x(seed=14, shape=(2, 5, 5, 3))
    expected = _run(model, x)
    calls = []

    def fuse_conv_bn_relu6(is_qat, conv, bn, act):
        calls.append(is_qat)
        return ConvReLU6(fuse_conv_bn(is_qat, conv, bn), act)

    config = {"additional_fuser_method_mapping": {(nnx.Conv, nnx.BatchNorm, ReLU6):
                                                  fuse_conv_bn_relu6}}
    fused = fuse_modules(model, ["layer", "bn", "relu"], fuse_custom_config_dict=config)
    assert calls == [False]
    assert isinstance(fused.layer, ConvReLU6) and isinstance(fused.layer.conv, nnx.Conv)
    _assert_close(_run(fused, x), expected)


def test_custom_fuser_func_is_used():
    model = _built(lambda r: Chain(nnx.Linear(3, 4, rngs=r), relu=ReLU()))
    seen = []

    def fuser_func(mods, is_qat, additional):
        seen.append((tuple(type(m) for m in mods), is_qat, dict(additional)))
        return fuse_known_modules(mods, is_qat, additional)

    fused = fuse_modules_qat(model, ["layer", "relu"], fuser_func=fuser_func)
    assert seen == [((nnx.Linear, ReLU), True, {})]
    assert isinstance(fused.layer, LinearReLU)
    with pytest.raises(ValueError, match="returned 1 modules for 2 paths"):
        fuse_modules(model, ["layer", "relu"], fuser_func=lambda mods, q, a: mods[:1])


def test_get_fuser_method_table_and_subclasses():
    assert set(DEFAULT_OP_LIST_TO_FUSER_METHOD) == {
        (nnx.Conv, nnx.BatchNorm), (nnx.Conv, nnx.BatchNorm, ReLU), (nnx.Conv, ReLU),
        (nnx.Linear, nnx.BatchNorm), (nnx.Linear, ReLU), (nnx.BatchNorm, ReLU),
        (nnx.ConvTranspose, nnx.BatchNorm)}
    assert get_fuser_method((nnx.Conv, nnx.BatchNorm)) is fuse_conv_bn

    class MyConv(nnx.Conv):
        pass

    assert get_fuser_method((MyConv, nnx.BatchNorm)) is fuse_conv_bn
    with pytest.raises(NotImplementedError, match=r"\(Linear, ReLU6\)"):
        get_fuser_method((nnx.Linear, ReLU6))


def test_efficientnet_lite_fusion_patterns():
    """The model port's own list of Conv+BN pairs (depthwise, 1x1, strided) fuses output-exactly."""
    from jaxquant.models.efficientnet_lite import BlockConfig, EfficientNetLite, fusion_patterns

    blocks = (BlockConfig(1, 3, 1, 1, 8, 8), BlockConfig(2, 5, 2, 3, 8, 12))
    model = _built(lambda r: EfficientNetLite(blocks, stem_ch=8, head_ch=16, num_classes=5,
                                              rngs=r), 40)
    model.eval()
    x = _x(seed=15, shape=(2, 32, 32, 3))
    expected = _run(model, x)
    patterns = fusion_patterns(model)
    assert len(patterns) == 1 + 2 + 3 + 3 + 1  # stem, 3 blocks (first without expand), head
    fused = fuse_modules(model, patterns)
    assert all(isinstance(get_submodule(fused, bn), Identity) for _, bn in patterns)
    _assert_close(_run(fused, x), expected)
