"""``quantize_weight_only``: int8 / int4 weight-only quantization of an NNX model (torchao's
``int8_weight_only()`` / ``int4_weight_only(group_size=128)``), activations stay float.

``nnx.Linear`` and ``nnx.LinearGeneral`` become :class:`WeightOnlyLinear`, ``nnx.Embed`` becomes
:class:`WeightOnlyEmbedding`. Ops that cannot hold a block-quantized weight (``nnx.Einsum``,
``nnx.Conv``, recurrent cells) raise when a config names them, instead of being skipped silently.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable, Mapping, Optional, Union

import jax.numpy as jnp
from flax import nnx

from jaxquant.module_paths import copy_model, named_modules, replace_contents, set_submodule
from jaxquant.weight_only.blockwise import quantize_blockwise
from jaxquant.weight_only.modules import WeightOnlyEmbedding, WeightOnlyLinear

__all__ = ["WeightOnlyConfig", "int8_weight_only", "int4_weight_only", "quantize_weight_only",
           "linear_weight_2d", "WeightOnlySpec", "quantize_calibrated"]


@dataclasses.dataclass(frozen=True)
class WeightOnlyConfig:
    """How to quantize one layer's weight (weights only; activations stay float).

    Attributes:
      bits: 8 or 4 (int4 is stored two codes per byte).
      group_size: inputs per scale along the contraction axis (32, 64, 128, ...); ``None`` = one
        scale per output channel.
      symmetric: signed codes, zero point ``2**(bits-1)``; else affine (zero point per group).
      allow_partial_group: accept a group size that does not divide the contraction size (the last
        group is narrower; codes are padded with zero weights).
      decode_rows: calls with at most this many rows run the integer u8 x s8 decode path; larger
        calls dequantize and run a float dot.
    """

    bits: int = 8
    group_size: Optional[int] = None
    symmetric: bool = True
    allow_partial_group: bool = False
    decode_rows: int = 8

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise ValueError(f"WeightOnlyConfig: bits must be 4 or 8, got {self.bits}")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise ValueError(f"WeightOnlyConfig: group_size must be a positive int or None, got {self.group_size!r}")
        if self.decode_rows < 0:
            raise ValueError(f"WeightOnlyConfig: decode_rows must be >= 0, got {self.decode_rows}")


def int8_weight_only(group_size: Optional[int] = None, symmetric: bool = True, **kw: Any) -> WeightOnlyConfig:
    """int8 codes, per output channel by default (torchao's ``int8_weight_only``)."""
    return WeightOnlyConfig(bits=8, group_size=group_size, symmetric=symmetric, **kw)


def int4_weight_only(group_size: int = 128, symmetric: bool = True, **kw: Any) -> WeightOnlyConfig:
    """int4 codes packed two per byte, one scale per ``group_size`` inputs (torchao's ``int4_weight_only``)."""
    return WeightOnlyConfig(bits=4, group_size=group_size, symmetric=symmetric, **kw)


WeightOnlySpec = Union[WeightOnlyConfig, Mapping[Any, Optional[WeightOnlyConfig]]]
_DEFAULT_TYPES = (nnx.Linear, nnx.LinearGeneral)
_REFUSED = (nnx.Einsum, nnx.Conv, nnx.ConvTranspose, nnx.LSTMCell, nnx.OptimizedLSTMCell, nnx.GRUCell)


def linear_weight_2d(module: nnx.Module, path: str):
    """``(kernel (K, N) float32, bias (N,) or None, in_shape, out_shape)`` of a Linear / LinearGeneral.

    Raises ValueError for a LinearGeneral with batch axes or contracting axes other than the
    trailing ones (its kernel is not a plain matrix over the trailing input features).
    """
    kernel = jnp.asarray(module.kernel.get_value(), jnp.float32)
    bias = None if module.bias is None else jnp.asarray(module.bias.get_value(), jnp.float32)
    if isinstance(module, nnx.LinearGeneral):
        in_shape, out_shape = tuple(module.in_features), tuple(module.out_features)
        n_in = len(in_shape)
        if module.batch_axis or tuple(module.axis) != tuple(range(-n_in, 0)):
            raise ValueError(f"quantize_weight_only: '{path}' is an nnx.LinearGeneral with axis={module.axis} "
                             f"batch_axis={dict(module.batch_axis)}; only contraction over the trailing input axes "
                             f"(axis={tuple(range(-n_in, 0))}) without batch axes can be weight-only quantized")
        k = 1
        for d in in_shape:
            k *= int(d)
        return kernel.reshape(k, -1), (None if bias is None else bias.reshape(-1)), in_shape, out_shape
    return kernel, bias, (kernel.shape[0],), (kernel.shape[1],)


def _resolve(spec: WeightOnlySpec, path: str, module: nnx.Module, parents: dict) -> Any:
    """The config for ``path``: the longest matching path key (a module or an ancestor) beats a type key.
    Returns ``"unset"`` when nothing names it."""
    if isinstance(spec, WeightOnlyConfig):
        return spec if isinstance(module, _DEFAULT_TYPES) else "unset"
    best, best_len = "unset", -1
    for key, value in spec.items():
        if isinstance(key, str) and (key == "" or path == key or path.startswith(key + ".")):
            if len(key) > best_len:
                best, best_len = value, len(key)
    if best_len >= 0:
        named = path in spec and isinstance(module, _REFUSED)
        return best if isinstance(module, _DEFAULT_TYPES + (nnx.Embed,)) or named else "unset"
    for key, value in spec.items():
        if isinstance(key, type) and isinstance(module, key):
            return value
    return "unset"


def _check_spec(spec: WeightOnlySpec, paths: set) -> None:
    if isinstance(spec, WeightOnlyConfig):
        return
    if not isinstance(spec, Mapping):
        raise TypeError(f"quantize_weight_only: config must be a WeightOnlyConfig or a dict from module type / "
                        f"dotted path to WeightOnlyConfig (or None), got {type(spec).__name__}")
    for key, value in spec.items():
        if value is not None and not isinstance(value, WeightOnlyConfig):
            raise TypeError(f"quantize_weight_only: config[{key!r}] must be a WeightOnlyConfig or None, got "
                            f"{type(value).__name__}; use int8_weight_only() / int4_weight_only(...)")
        if isinstance(key, str):
            if key not in paths:
                near = sorted(p for p in paths if p and (p.startswith(key) or key.startswith(p)))[:6]
                raise KeyError(f"quantize_weight_only: path '{key}' is not in the model; nearby: {near}")
        elif isinstance(key, type):
            if key in _REFUSED or (issubclass(key, nnx.Module) and key not in _DEFAULT_TYPES + (nnx.Embed,)):
                raise ValueError(f"quantize_weight_only: {key.__qualname__} cannot hold a block-quantized weight "
                                 "(supported: nnx.Linear, nnx.LinearGeneral, nnx.Embed); use quantize_dynamic for "
                                 "int8 on other ops, or leave them float")
        else:
            raise TypeError(f"quantize_weight_only: key {key!r} is neither a module type nor a dotted path")


def quantize_weight_only(model: nnx.Module, config: WeightOnlySpec, *, inplace: bool = False,
                         weight_fn: Optional[Callable[[str, nnx.Module, WeightOnlyConfig], Any]] = None) -> nnx.Module:
    """Replace Linear / LinearGeneral / Embed weights with int8 or int4 block-quantized ones.

    Args:
      model: a float NNX model.
      config: a :class:`WeightOnlyConfig` (applies to every ``nnx.Linear`` and ``nnx.LinearGeneral``;
        embeddings stay float), or a dict from module type or dotted path to a config (``None`` keeps
        that subtree float; the longest path wins over a type). ``nnx.Embed`` is quantized only when
        named.
      inplace: edit ``model`` itself (built on a copy first: a failure leaves it untouched).
      weight_fn: ``(path, module, config) -> (BlockQuantizedWeight, input_scale or None)`` to replace
        round-to-nearest (GPTQ / AWQ plug in here).

    Returns:
      The model with weight-only modules (float inputs and outputs). Warns if nothing matched.

    Raises:
      ValueError naming the layer: a group size that does not divide its contraction size, int4 or
      int8 asked of an op that cannot hold it (Einsum, Conv, recurrent cells).
    """
    result = copy_model(model)
    modules = named_modules(result)
    _check_spec(config, {p for p, _ in modules})
    done: list[str] = []
    for path, module in modules:
        if any(path.startswith(d + ".") for d in done):
            continue
        cfg = _resolve(config, path, module, {})
        if cfg == "unset" or cfg is None:
            continue
        where = f"quantize_weight_only: '{path}' ({type(module).__qualname__})"
        if isinstance(module, _REFUSED):
            raise ValueError(f"{where}: int{cfg.bits} weight-only is not supported for this op (no block-quantized "
                             "kernel); leave it float or use quantize_dynamic for int8")
        if isinstance(module, nnx.Embed):
            table = jnp.asarray(module.embedding.get_value(), jnp.float32)
            q = quantize_blockwise(table.T, bits=cfg.bits, group_size=cfg.group_size, symmetric=cfg.symmetric,
                                   allow_partial_group=cfg.allow_partial_group, where=where)
            new = WeightOnlyEmbedding(q, name=path)
        else:
            kernel, bias, in_shape, out_shape = linear_weight_2d(module, path)
            input_scale = None
            if weight_fn is not None:
                q, input_scale = weight_fn(path, module, cfg)
            else:
                q = quantize_blockwise(kernel, bits=cfg.bits, group_size=cfg.group_size, symmetric=cfg.symmetric,
                                       allow_partial_group=cfg.allow_partial_group, where=where)
            new = WeightOnlyLinear(q, bias, in_shape=in_shape, out_shape=out_shape, input_scale=input_scale,
                                   decode_rows=cfg.decode_rows, name=path)
        if path == "":
            result = new
        else:
            set_submodule(result, path, new)
        done.append(path)
    if not done:
        warnings.warn("quantize_weight_only: no module was quantized (the model has no nnx.Linear / "
                      "nnx.LinearGeneral, or the config names none); returning an unchanged copy",
                      UserWarning, stacklevel=2)
    if inplace:
        if type(result) is not type(model):
            raise TypeError("quantize_weight_only(inplace=True) cannot replace the root module; use the result")
        replace_contents(model, result)
        return model
    return result


def quantize_calibrated(model: nnx.Module, stats: Mapping[str, Any], config: WeightOnlyConfig,
                        layer_fn: Callable[[jnp.ndarray, Any, WeightOnlyConfig, str], tuple], *, desc: str,
                        progress: bool = True) -> nnx.Module:
    """The per-layer driver shared by GPTQ and AWQ: quantize every layer named in ``stats`` with ``layer_fn``.

    Args:
      model: the float NNX model (not modified).
      stats: path -> ``LinearStats`` from :func:`~jaxquant.weight_only.calibration.collect_linear_stats`.
      config: the target format of every layer in ``stats``.
      layer_fn: ``(kernel (K, N) float32, stats, config, where) -> (BlockQuantizedWeight, input_scale (K,) or
        None)``; ``where`` names the layer for error messages.
      desc: the method's name (progress bar and errors).
      progress: a tqdm bar over the layers.

    Returns:
      A new model whose layers in ``stats`` are ``WeightOnlyLinear``; other layers are unchanged.
    """
    if not stats:
        raise ValueError(f"{desc}: no layer statistics; run collect_linear_stats on calibration data first")
    if not isinstance(config, WeightOnlyConfig):
        raise TypeError(f"{desc}: config must be a WeightOnlyConfig (e.g. int4_weight_only(128)), "
                        f"got {type(config).__name__}")
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(stats), desc=desc, leave=False)

    def weight_fn(path, module, cfg):
        kernel, _, _, _ = linear_weight_2d(module, path)
        out = layer_fn(kernel, stats[path], cfg, f"{desc}: '{path}'")
        if bar is not None:
            bar.update(1)
        return out

    try:
        return quantize_weight_only(model, {p: config for p in stats}, weight_fn=weight_fn)
    finally:
        if bar is not None:
            bar.close()
