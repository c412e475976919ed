"""``QConfigMapping``: which QConfig each module gets (``torch.ao.quantization.QConfigMapping``).

Precedence, lowest to highest, as PyTorch's FX prepare resolves it:
global < object type < module-name regex (first registered match) < module name (the module or its
nearest named ancestor) < (module name, object type, call index).

Module paths are dotted NNX paths ("features.layers.0.conv", see ``jaxquant.module_paths``); types
are NNX classes (``nnx.Linear``, ``jaxquant.nn.Sigmoid``, ...), functions or method-name strings.
The builder is mutable and chainable like PyTorch's; :func:`qconfig_for` is the pure lookup that
``prepare`` calls.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
from flax import nnx

from jaxquant.fake_quant.fake_quantize import FixedQParamsFakeQuantize
from jaxquant.fake_quant.presets import (
    default_weight_fake_quant,
    fixed_qparams_range_0to1_observer,
    fixed_qparams_range_neg1to1_observer,
)
from jaxquant.qconfig import (
    QConfig,
    QConfigAny,
    _default_placeholder_observer,
    _default_weight_observer,
    default_reuse_input_qconfig,
    get_default_qat_qconfig,
    get_default_qconfig,
)
import jaxquant.qconfig as _qconfig

ObjectType = Union[type, Callable, str]

_GLOBAL_DICT_KEY = ""
_OBJECT_TYPE_DICT_KEY = "object_type"
_MODULE_NAME_REGEX_DICT_KEY = "module_name_regex"
_MODULE_NAME_DICT_KEY = "module_name"
_MODULE_NAME_OBJECT_TYPE_ORDER_DICT_KEY = "module_name_object_type_order"


class QConfigMapping:
    """Mapping from modules to QConfigs; set with ``set_global``, ``set_object_type``,
    ``set_module_name_regex``, ``set_module_name`` and ``set_module_name_object_type_order``
    (increasing priority). Each setter returns ``self`` so calls chain; a later call for the same
    key replaces the earlier QConfig (regexes keep their first-registration order)."""

    def __init__(self) -> None:
        self.global_qconfig: QConfigAny = None
        self.object_type_qconfigs: OrderedDict[ObjectType, QConfigAny] = OrderedDict()
        self.module_name_regex_qconfigs: OrderedDict[str, QConfigAny] = OrderedDict()
        self.module_name_qconfigs: OrderedDict[str, QConfigAny] = OrderedDict()
        self.module_name_object_type_order_qconfigs: OrderedDict[tuple[str, ObjectType, int], QConfigAny] = OrderedDict()

    @staticmethod
    def _check(qconfig: QConfigAny, what: str) -> QConfigAny:
        if qconfig is not None and not isinstance(qconfig, QConfig):
            raise TypeError(f"QConfigMapping.{what}: expected a QConfig or None, got {type(qconfig).__name__}")
        return qconfig

    def set_global(self, global_qconfig: QConfigAny) -> "QConfigMapping":
        """The QConfig of every module nothing more specific matches."""
        self.global_qconfig = self._check(global_qconfig, "set_global")
        return self

    def set_object_type(self, object_type: ObjectType, qconfig: QConfigAny) -> "QConfigMapping":
        """The QConfig for modules of exactly this class (no subclass matching, as PyTorch)."""
        self.object_type_qconfigs[object_type] = self._check(qconfig, "set_object_type")
        return self

    def set_module_name_regex(self, module_name_regex: str, qconfig: QConfigAny) -> "QConfigMapping":
        """The QConfig for module paths matching ``re.match(module_name_regex, path)``; the first
        registered matching regex wins, so register specific patterns first."""
        try:
            re.compile(module_name_regex)
        except re.error as e:
            raise ValueError(f"QConfigMapping.set_module_name_regex: {module_name_regex!r} is not a valid "
                             f"regular expression: {e}") from None
        self.module_name_regex_qconfigs[module_name_regex] = self._check(qconfig, "set_module_name_regex")
        return self

    def set_module_name(self, module_name: str, qconfig: QConfigAny) -> "QConfigMapping":
        """The QConfig for the module at this dotted path and, unless overridden, its submodules."""
        self.module_name_qconfigs[module_name] = self._check(qconfig, "set_module_name")
        return self

    def set_module_name_object_type_order(self, module_name: str, object_type: ObjectType, index: int,
                                          qconfig: QConfigAny) -> "QConfigMapping":
        """The QConfig for the ``index``-th call of ``object_type`` inside the module at ``module_name``."""
        self.module_name_object_type_order_qconfigs[(module_name, object_type, index)] = self._check(
            qconfig, "set_module_name_object_type_order")
        return self

    def __repr__(self) -> str:
        out = [f"{type(self).__name__} ("]
        for name in ("global_qconfig", "object_type_qconfigs", "module_name_regex_qconfigs",
                     "module_name_qconfigs", "module_name_object_type_order_qconfigs"):
            out.append(f" {name}")
            value = getattr(self, name)
            if isinstance(value, OrderedDict) and value:
                out.extend(f"  {k}: {v}" for k, v in value.items())
            else:
                out.append(f"  {value}")
        return "\n".join(out) + "\n)"

    def to_dict(self) -> dict[str, Any]:
        """PyTorch's legacy ``qconfig_dict`` form."""
        return {
            _GLOBAL_DICT_KEY: self.global_qconfig,
            _OBJECT_TYPE_DICT_KEY: list(self.object_type_qconfigs.items()),
            _MODULE_NAME_REGEX_DICT_KEY: list(self.module_name_regex_qconfigs.items()),
            _MODULE_NAME_DICT_KEY: list(self.module_name_qconfigs.items()),
            _MODULE_NAME_OBJECT_TYPE_ORDER_DICT_KEY: [
                (*k, v) for k, v in self.module_name_object_type_order_qconfigs.items()],
        }

    @classmethod
    def from_dict(cls, qconfig_dict: dict[str, Any]) -> "QConfigMapping":
        """Build from PyTorch's legacy ``qconfig_dict`` form."""
        conf = cls()
        if _GLOBAL_DICT_KEY in qconfig_dict:
            conf.set_global(qconfig_dict[_GLOBAL_DICT_KEY])
        for object_type, qconfig in qconfig_dict.get(_OBJECT_TYPE_DICT_KEY, []):
            conf.set_object_type(object_type, qconfig)
        for regex, qconfig in qconfig_dict.get(_MODULE_NAME_REGEX_DICT_KEY, []):
            conf.set_module_name_regex(regex, qconfig)
        for name, qconfig in qconfig_dict.get(_MODULE_NAME_DICT_KEY, []):
            conf.set_module_name(name, qconfig)
        for name, object_type, index, qconfig in qconfig_dict.get(_MODULE_NAME_OBJECT_TYPE_ORDER_DICT_KEY, []):
            conf.set_module_name_object_type_order(name, object_type, index, qconfig)
        return conf


def _parent(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in path else ""


def qconfig_for(
    mapping: QConfigMapping,
    module_path: str,
    module_type: ObjectType,
    index: Optional[int] = None,
) -> QConfigAny:
    """The QConfig of one module under ``mapping`` (pure; PyTorch's FX resolution order).

    Args:
      mapping: the :class:`QConfigMapping`.
      module_path: dotted path of the module ("" for the root), e.g. ``"features.layers.0.conv"``.
      module_type: its class (exact match, no subclasses), or a function / method name.
      index: for ``set_module_name_object_type_order``: how many earlier calls of ``module_type``
        the parent module at ``module_path`` made (None to skip that level).
    Returns:
      The QConfig, or None (leave the module in float).
    """
    if not isinstance(mapping, QConfigMapping):
        raise TypeError(f"qconfig_for: expected a QConfigMapping, got {type(mapping).__name__}")
    qconfig = mapping.object_type_qconfigs.get(module_type, mapping.global_qconfig)
    for regex, regex_qconfig in mapping.module_name_regex_qconfigs.items():
        if re.match(regex, module_path):
            qconfig = regex_qconfig
            break
    name = module_path
    while name != "":
        if name in mapping.module_name_qconfigs:
            qconfig = mapping.module_name_qconfigs[name]
            break
        name = _parent(name)
    if index is not None:
        qconfig = mapping.module_name_object_type_order_qconfigs.get((module_path, module_type, index), qconfig)
    return qconfig


def as_qconfig_mapping(qconfig_or_mapping: Any):
    """A ``QConfigMapping`` from a QConfig (used globally), a mapping, or ``None`` (empty mapping)."""
    if isinstance(qconfig_or_mapping, QConfigMapping):
        return qconfig_or_mapping
    mapping = QConfigMapping()
    if qconfig_or_mapping is not None:
        mapping.set_global(qconfig_or_mapping)
    return mapping


def dynamic_qconfig_mapping(qconfig_spec: Any, dtype: Any, default_types: Callable[[], tuple], module_base: type,
                            base_name: str, *, kind: str = "", types_hint: str = "",
                            check_path: Optional[Callable[[str], None]] = None) -> "QConfigMapping":
    """``quantize_dynamic``'s ``qconfig_spec`` (PyTorch's: ``None`` for ``default_types()``, a set of
    module types or paths, or a dict from type / dotted path to QConfig or None) as a QConfigMapping,
    every entry checked: types must subclass ``module_base`` (named ``base_name`` in the error, with
    ``types_hint`` after it),
    paths go through ``check_path`` (which raises for a path the model lacks). ``kind`` names the
    front end in messages ("Linen " or "")."""
    if qconfig_spec is None or isinstance(qconfig_spec, (set, frozenset, list, tuple)):
        qconfig = _qconfig.default_dynamic_qconfig_for(dtype)
        qconfig_spec = {k: qconfig for k in (default_types() if qconfig_spec is None else qconfig_spec)}
    elif not isinstance(qconfig_spec, Mapping):
        raise TypeError(f"quantize_dynamic: qconfig_spec must be None, a set of {kind}module types, or a dict from "
                        f"module type / dotted path to QConfig; got {type(qconfig_spec).__name__}")
    mapping = QConfigMapping()
    for key, value in qconfig_spec.items():
        if value is not None and not isinstance(value, QConfig):
            raise TypeError(f"quantize_dynamic: qconfig_spec[{key!r}] must be a QConfig or None, got "
                            f"{type(value).__name__} ({value!r})")
        if isinstance(key, type):
            if not issubclass(key, module_base):
                raise TypeError(f"quantize_dynamic: qconfig_spec key {key.__qualname__} is not {base_name} type"
                                f"{types_hint}")
            mapping.set_object_type(key, value)
        elif isinstance(key, str):
            if check_path is not None:
                check_path(key)
            mapping.set_module_name(key, value)
        else:
            raise TypeError(f"quantize_dynamic: qconfig_spec key {key!r} ({type(key).__name__}) is neither a "
                            f"{kind}module type nor a dotted module path string")
    return mapping


def fixed_qparams_ops(modules: Mapping[str, type] = MappingProxyType({})) -> dict[ObjectType, Any]:
    """PyTorch's ``_FIXED_QPARAMS_OP_TO_OBSERVER`` over JAX functions and method names, with a front
    end's module classes for ``"hardsigmoid"``, ``"sigmoid"``, ``"softmax"`` and ``"tanh"`` (``modules``;
    the NNX front end passes ``jaxquant.nn``'s, as this layer sits below the modules)."""
    zero_one, neg_one_one = fixed_qparams_range_0to1_observer, fixed_qparams_range_neg1to1_observer
    table: dict[ObjectType, Any] = {}
    for name, fn, observer in (("hardsigmoid", jax.nn.hard_sigmoid, zero_one), ("sigmoid", jax.nn.sigmoid, zero_one),
                               ("softmax", None, zero_one), ("tanh", jnp.tanh, neg_one_one)):
        if name in modules:
            table[modules[name]] = observer
        if fn is not None:
            table.update({fn: observer, name: observer, name + "_": observer})
    return table


def default_qconfig_mapping(is_qat: bool, backend: str, version: int,
                            fixed_qparams_modules: Mapping[str, type] = MappingProxyType({})) -> QConfigMapping:
    """PyTorch 2.13's default (QAT when ``is_qat``) QConfigMapping for ``backend``, with the front end's
    fixed-qparams module classes (see :func:`fixed_qparams_ops`)."""
    qconfig = get_default_qat_qconfig(backend, version) if is_qat else get_default_qconfig(backend, version)
    default_weight = default_weight_fake_quant if is_qat else _default_weight_observer
    # per-channel weights are not supported for transposed convolutions on fbgemm/x86 (pytorch#47535)
    if backend in ("fbgemm", "x86"):
        qconfig_transpose = QConfig(activation=qconfig.activation, weight=default_weight)
    else:
        qconfig_transpose = qconfig
    # layer norm keeps float weights
    qconfig_layernorm = QConfig(activation=qconfig.activation, weight=_default_placeholder_observer)
    mapping = (
        QConfigMapping()
        .set_global(qconfig)
        .set_object_type("reshape", default_reuse_input_qconfig)
        .set_object_type(nnx.ConvTranspose, qconfig_transpose)
        .set_object_type(nnx.LayerNorm, qconfig_layernorm)
        .set_object_type(nnx.PReLU, _qconfig.default_quint8_weight_qconfig)
    )
    by_observer: dict[Any, QConfig] = {}
    for op, observer in fixed_qparams_ops(fixed_qparams_modules).items():
        if observer not in by_observer:
            activation = FixedQParamsFakeQuantize.with_args(observer=observer) if is_qat else observer
            by_observer[observer] = QConfig(activation=activation, weight=default_weight)
        mapping.set_object_type(op, by_observer[observer])
    return mapping
