"""Pattern fusion over NNX modules: ``fuse_modules`` / ``fuse_modules_qat``, as in
``torch.ao.quantization.fuse_modules`` and ``fuser_method_mappings``.

A group of dotted module paths (``["features.0.conv", "features.0.bn", "features.0.relu"]``) whose
module types match a known pattern is replaced by one module placed at the first path; the other
paths become ``jaxquant.nn.Identity()``. Eval fusion folds BatchNorm into the preceding Conv/Linear;
QAT fusion keeps it in a ``ConvBn``/``ConvBnReLU``/``LinearBn`` for the QAT modules to fold.

A fuser method has PyTorch's signature ``fuser_method(is_qat, *modules) -> nnx.Module``; a
``fuser_func`` (default :func:`fuse_known_modules`) maps ``(modules, is_qat,
additional_fuser_method_mapping)`` to the list of replacement modules, one per path.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence, Union

from flax import nnx

from jaxquant.fusion.bn_folding import fuse_conv_bn_weights, fuse_linear_bn_weights
from jaxquant.module_paths import copy_model, get_submodule, replace_contents, set_submodule
from jaxquant.nn.activations import Identity, ReLU
from jaxquant.nn.intrinsic import BNReLU, ConvBn, ConvBnReLU, ConvReLU, LinearBn, LinearReLU

__all__ = [
    "fuse_conv_bn",
    "fuse_conv_bn_relu",
    "fuse_linear_bn",
    "fuse_convtranspose_bn",
    "fuse_conv_bn_eval",
    "fuse_linear_bn_eval",
    "get_fuser_method",
    "fuse_known_modules",
    "fuse_modules",
    "fuse_modules_qat",
    "DEFAULT_OP_LIST_TO_FUSER_METHOD",
]

FuserMethod = Callable[..., nnx.Module]
ModulesToFuse = Union[Sequence[str], Sequence[Sequence[str]]]


# ---------------------------------------------------------------------------------------------
# checks shared by the fuser methods

def _check_eval(bn: nnx.BatchNorm) -> None:
    if bn.use_running_average is not True:
        raise ValueError(
            "fusion for eval only: call model.eval() first, or use fuse_modules_qat "
            f"(the BatchNorm has use_running_average={bn.use_running_average!r}; eval fusion "
            "folds its running statistics, which only matches eval-mode outputs)")


def _check_bn_axis(bn: nnx.BatchNorm, channel_axis: int) -> None:
    # Conv and Linear outputs carry their channels on the last axis (NHWC); a BatchNorm over any
    # other axis normalises something else and cannot be folded into the kernel.
    axis = bn.axis if isinstance(bn.axis, int) else tuple(bn.axis)
    if axis not in (-1, (-1,), channel_axis, (channel_axis,)):
        raise ValueError(f"the BatchNorm normalises axis {bn.axis!r}, but fusion needs it on the "
                         "last (channel) axis of the preceding layer's output: use axis=-1")


def _bn_features(bn: nnx.BatchNorm) -> int:
    return int(bn.mean.shape[0])


def _check_channels(layer_name: str, out_features: int, bn: nnx.BatchNorm,
                    allow_single: bool = False) -> None:
    n = _bn_features(bn)
    if n != out_features and not (allow_single and n == 1):
        raise ValueError(f"the BatchNorm has {n} features but the {layer_name} has {out_features} "
                         "output channels; they must be equal")


def _check_affine(bn: nnx.BatchNorm) -> None:
    # As PyTorch: QAT's Conv-BN modules train gamma and beta, so both must exist.
    if bn.scale is None or bn.bias is None:
        raise ValueError("QAT fusion needs a BatchNorm with use_scale=True and use_bias=True")


def _conv_out_features(conv: Union[nnx.Conv, nnx.ConvTranspose]) -> int:
    return int(conv.out_features)


def _conv_channel_axis(conv: Union[nnx.Conv, nnx.ConvTranspose]) -> int:
    return len(conv.kernel_size) + 1


def _set_folded(layer, kernel, bias) -> None:
    layer.kernel.set_value(kernel)
    if layer.bias is None:
        layer.bias = nnx.Param(bias)
        layer.use_bias = True
    else:
        layer.bias.set_value(bias)


# ---------------------------------------------------------------------------------------------
# eval folding of whole modules (torch.nn.utils.fusion.fuse_conv_bn_eval / fuse_linear_bn_eval)

def fuse_conv_bn_eval(conv: Union[nnx.Conv, nnx.ConvTranspose],
                      bn: nnx.BatchNorm) -> Union[nnx.Conv, nnx.ConvTranspose]:
    """A new conv computing ``bn(conv(x))`` for an eval-mode ``bn``; ``conv``, ``bn`` are unchanged.

    Works for ``nnx.Conv`` of any rank, grouped or depthwise, and ``nnx.ConvTranspose`` (kernel
    layout read from its ``transpose_kernel`` flag, so there is no ``transpose`` argument as in
    PyTorch); a conv without bias gets one.
    """
    _check_eval(bn)
    _check_bn_axis(bn, _conv_channel_axis(conv))
    _check_channels(type(conv).__name__, _conv_out_features(conv), bn)
    transpose = isinstance(conv, nnx.ConvTranspose) and bool(conv.transpose_kernel)
    fused = nnx.clone(conv)
    kernel, bias = fuse_conv_bn_weights(
        fused.kernel[...], None if fused.bias is None else fused.bias[...], bn.mean[...],
        bn.var[...], bn.epsilon, None if bn.scale is None else bn.scale[...],
        None if bn.bias is None else bn.bias[...], transpose=transpose)
    _set_folded(fused, kernel, bias)
    return fused


def fuse_linear_bn_eval(linear: nnx.Linear, bn: nnx.BatchNorm) -> nnx.Linear:
    """A new ``nnx.Linear`` computing ``bn(linear(x))`` for an eval-mode ``bn`` (inputs unchanged).

    ``bn`` has ``out_features`` features, or 1 (broadcast, as PyTorch allows).
    """
    _check_eval(bn)
    _check_bn_axis(bn, 1)
    _check_channels("Linear", int(linear.out_features), bn, allow_single=True)
    fused = nnx.clone(linear)
    kernel, bias = fuse_linear_bn_weights(
        fused.kernel[...], None if fused.bias is None else fused.bias[...], bn.mean[...],
        bn.var[...], bn.epsilon, None if bn.scale is None else bn.scale[...],
        None if bn.bias is None else bn.bias[...])
    _set_folded(fused, kernel, bias)
    return fused


# ---------------------------------------------------------------------------------------------
# fuser methods (torch.ao.quantization.fuser_method_mappings)

def fuse_conv_bn(is_qat: bool, conv: nnx.Conv, bn: nnx.BatchNorm) -> nnx.Module:
    """QAT: ``ConvBn(conv, bn)``; eval: ``conv`` with ``bn`` folded in."""
    if is_qat:
        _check_bn_axis(bn, _conv_channel_axis(conv))
        _check_channels("Conv", _conv_out_features(conv), bn)
        _check_affine(bn)
        return ConvBn(conv, bn)
    return fuse_conv_bn_eval(conv, bn)


def fuse_conv_bn_relu(is_qat: bool, conv: nnx.Conv, bn: nnx.BatchNorm, relu: ReLU) -> nnx.Module:
    """QAT: ``ConvBnReLU(conv, bn, relu)``; eval: ``ConvReLU(conv with bn folded in, relu)``."""
    if is_qat:
        _check_bn_axis(bn, _conv_channel_axis(conv))
        _check_channels("Conv", _conv_out_features(conv), bn)
        _check_affine(bn)
        return ConvBnReLU(conv, bn, relu)
    return ConvReLU(fuse_conv_bn_eval(conv, bn), relu)


def fuse_linear_bn(is_qat: bool, linear: nnx.Linear, bn: nnx.BatchNorm) -> nnx.Module:
    """QAT: ``LinearBn(linear, bn)``; eval: ``linear`` with ``bn`` folded in."""
    if is_qat:
        _check_bn_axis(bn, 1)
        _check_channels("Linear", int(linear.out_features), bn)
        _check_affine(bn)
        return LinearBn(linear, bn)
    return fuse_linear_bn_eval(linear, bn)


def fuse_convtranspose_bn(is_qat: bool, convt: nnx.ConvTranspose, bn: nnx.BatchNorm) -> nnx.Module:
    """Eval: ``convt`` with ``bn`` folded in. Not supported for QAT (as in PyTorch)."""
    if is_qat:
        raise NotImplementedError("fusing ConvTranspose+BatchNorm is not supported for QAT "
                                  "(as in PyTorch); fuse it with fuse_modules after model.eval()")
    return fuse_conv_bn_eval(convt, bn)


def _sequential_wrapper2(fused_class: type) -> FuserMethod:
    def fuser_method(is_qat: bool, m1: nnx.Module, m2: nnx.Module) -> nnx.Module:
        return fused_class(m1, m2)

    fuser_method.__name__ = f"fuse_{fused_class.__name__}"
    return fuser_method


# PyTorch's table with one Flax type per layer kind (nnx.Conv / nnx.BatchNorm cover 1-3 D).
DEFAULT_OP_LIST_TO_FUSER_METHOD: dict[tuple[type, ...], FuserMethod] = {
    (nnx.Conv, nnx.BatchNorm): fuse_conv_bn,
    (nnx.Conv, nnx.BatchNorm, ReLU): fuse_conv_bn_relu,
    (nnx.Conv, ReLU): _sequential_wrapper2(ConvReLU),
    (nnx.Linear, nnx.BatchNorm): fuse_linear_bn,
    (nnx.Linear, ReLU): _sequential_wrapper2(LinearReLU),
    (nnx.BatchNorm, ReLU): _sequential_wrapper2(BNReLU),
    (nnx.ConvTranspose, nnx.BatchNorm): fuse_convtranspose_bn,
}


def _pattern_str(types: Sequence[type]) -> str:
    return "(" + ", ".join(getattr(t, "__name__", repr(t)) for t in types) + ")"


def get_fuser_method(
    op_list: Sequence[type],
    additional_fuser_method_mapping: Optional[Mapping[tuple, FuserMethod]] = None,
) -> FuserMethod:
    """The fuser method ``f(is_qat, *modules)`` for a tuple of module types.

    ``additional_fuser_method_mapping`` entries take precedence over the defaults. An exact type
    match wins; otherwise the first pattern whose types are base classes of ``op_list`` (so a
    subclass of ``nnx.Conv`` fuses like ``nnx.Conv``). Raises ``NotImplementedError`` listing the
    supported patterns if there is none.
    """
    op_list = tuple(op_list)
    mappings = {**DEFAULT_OP_LIST_TO_FUSER_METHOD, **dict(additional_fuser_method_mapping or {})}
    if op_list in mappings:
        return mappings[op_list]
    ordered = list((additional_fuser_method_mapping or {}).items()) + list(
        DEFAULT_OP_LIST_TO_FUSER_METHOD.items())
    for pattern, method in ordered:
        if len(pattern) == len(op_list) and all(
                isinstance(t, type) and isinstance(p, type) and issubclass(t, p)
                for t, p in zip(op_list, pattern)):
            return method
    supported = ", ".join(_pattern_str(p) for p in mappings)
    raise NotImplementedError(
        f"cannot fuse modules of types {_pattern_str(op_list)}: supported patterns are {supported} "
        "(ReLU means jaxquant.nn.ReLU; add others through "
        "fuse_custom_config_dict={'additional_fuser_method_mapping': {types: fuser_method}})")


def fuse_known_modules(
    mod_list: Sequence[nnx.Module],
    is_qat: bool,
    additional_fuser_method_mapping: Optional[Mapping[tuple, FuserMethod]] = None,
) -> list[nnx.Module]:
    """Replacement modules for ``mod_list``: the fused module first, then one ``Identity`` per rest.

    Eval fusion never mutates the given modules (folded layers are copies); QAT fusion reuses them
    inside the fused container.
    """
    fuser_method = get_fuser_method(tuple(type(m) for m in mod_list),
                                    additional_fuser_method_mapping)
    fused = fuser_method(is_qat, *mod_list)
    return [fused] + [Identity() for _ in mod_list[1:]]


# ---------------------------------------------------------------------------------------------
# model-level entry points

_CONFIG_KEYS = ("additional_fuser_method_mapping",)


def _groups(modules_to_fuse: ModulesToFuse) -> list[list[str]]:
    if isinstance(modules_to_fuse, str) or not isinstance(modules_to_fuse, (list, tuple)):
        raise TypeError("modules_to_fuse must be a list of module paths (one group) or a list of "
                        f"such lists, got {modules_to_fuse!r}")
    if len(modules_to_fuse) == 0:
        return []
    if all(isinstance(p, str) for p in modules_to_fuse):
        groups = [list(modules_to_fuse)]
    else:
        groups = []
        for group in modules_to_fuse:
            if not isinstance(group, (list, tuple)) or not all(isinstance(p, str) for p in group):
                raise TypeError(f"modules_to_fuse: group {group!r} is not a list of module path "
                                "strings (do not mix strings and lists)")
            groups.append(list(group))
    for group in groups:
        if len(group) < 2:
            raise ValueError(f"modules_to_fuse: group {group!r} needs at least two module paths")
        if len(set(group)) != len(group):
            raise ValueError(f"modules_to_fuse: group {group!r} names a module more than once")
        if any(p.strip(".") == "" for p in group):
            raise ValueError(f"modules_to_fuse: group {group!r} contains an empty path (the model "
                             "root cannot be fused)")
    return groups


def _with_paths(err: Exception, group: Sequence[str]) -> Exception:
    message = err.args[0] if (isinstance(err, KeyError) and err.args) else str(err)
    try:
        return type(err)(f"fusing {list(group)}: {message}")
    except Exception:  # an exception type with a custom constructor: keep it as it is
        return err


def _fuse_group(model: nnx.Module, group: Sequence[str], is_qat: bool, fuser_func: Callable,
                additional: Mapping) -> None:
    try:
        mod_list = [get_submodule(model, path) for path in group]
        for path, mod in zip(group, mod_list):
            if not isinstance(mod, nnx.Module):
                raise TypeError(f"'{path}' is a {type(mod).__name__}, not a module: fusion works "
                                "on modules (use jaxquant.nn.ReLU() rather than nnx.relu)")
        new_mods = fuser_func(mod_list, is_qat, additional)
        if len(new_mods) != len(group):
            raise ValueError(f"fuser_func returned {len(new_mods)} modules for {len(group)} paths")
    except (KeyError, ValueError, TypeError, NotImplementedError) as err:
        raise _with_paths(err, group) from err
    for path, new in zip(group, new_mods):
        set_submodule(model, path, new)


def _fuse_modules(model: nnx.Module, modules_to_fuse: ModulesToFuse, is_qat: bool, inplace: bool,
                  fuser_func: Callable, fuse_custom_config_dict: Optional[Mapping[str, Any]]
                  ) -> nnx.Module:
    config = dict(fuse_custom_config_dict or {})
    unknown = sorted(set(config) - set(_CONFIG_KEYS))
    if unknown:
        raise ValueError(f"fuse_custom_config_dict: unknown keys {unknown}; supported: "
                         f"{list(_CONFIG_KEYS)}")
    additional = config.get("additional_fuser_method_mapping", {}) or {}
    groups = _groups(modules_to_fuse)
    # Always work on a copy, so a failing group leaves the caller's model as it was.
    work = copy_model(model)
    for group in groups:
        _fuse_group(work, group, is_qat, fuser_func, additional)
    if not inplace:
        return work
    replace_contents(model, work)
    return model


def fuse_modules(
    model: nnx.Module,
    modules_to_fuse: ModulesToFuse,
    inplace: bool = False,
    fuser_func: Callable = fuse_known_modules,
    fuse_custom_config_dict: Optional[Mapping[str, Any]] = None,
) -> nnx.Module:
    """Fuse groups of modules of an eval-mode model (PyTorch's ``fuse_modules``).

    Patterns: Conv+BN -> Conv with BN folded; Conv+BN+ReLU -> ``ConvReLU(folded conv, relu)``;
    Conv+ReLU -> ``ConvReLU``; Linear+BN -> folded Linear; Linear+ReLU -> ``LinearReLU``;
    BN+ReLU -> ``BNReLU``; ConvTranspose+BN -> folded ConvTranspose. Conv is ``nnx.Conv`` of any
    rank (grouped/depthwise too), BN ``nnx.BatchNorm`` with ``use_running_average=True`` (call
    ``model.eval()``), ReLU ``jaxquant.nn.ReLU``.

    Args:
      model: the float model.
      modules_to_fuse: one group of dotted paths (``["conv", "bn", "relu"]``) or a list of groups;
        paths into ``nnx.Sequential`` look like ``"seq.layers.0"``.
      inplace: change ``model`` itself instead of returning a fused copy.
      fuser_func: ``fuser_func(modules, is_qat, additional_fuser_method_mapping) -> modules``.
      fuse_custom_config_dict: ``{"additional_fuser_method_mapping": {(TypeA, TypeB): f}}`` with
        ``f(is_qat, a, b) -> module``.

    Returns:
      The fused model (``model`` itself if ``inplace``). The fused module sits at each group's
      first path, ``jaxquant.nn.Identity()`` at the others. If any group fails, nothing is changed.
    """
    return _fuse_modules(model, modules_to_fuse, False, inplace, fuser_func,
                         fuse_custom_config_dict)


def fuse_modules_qat(
    model: nnx.Module,
    modules_to_fuse: ModulesToFuse,
    inplace: bool = False,
    fuser_func: Callable = fuse_known_modules,
    fuse_custom_config_dict: Optional[Mapping[str, Any]] = None,
) -> nnx.Module:
    """QAT version of :func:`fuse_modules`: BatchNorm is kept, not folded.

    Conv+BN -> ``ConvBn``; Conv+BN+ReLU -> ``ConvBnReLU``; Linear+BN -> ``LinearBn``;
    Conv+ReLU -> ``ConvReLU``; Linear+ReLU -> ``LinearReLU``; BN+ReLU -> ``BNReLU``. The BatchNorm
    may be in either mode. Arguments and return value as for :func:`fuse_modules`.
    """
    return _fuse_modules(model, modules_to_fuse, True, inplace, fuser_func,
                         fuse_custom_config_dict)
