"""``propagate_qconfig``: which qconfig applies to each module path (PyTorch's eager-mode rules)."""
from __future__ import annotations

from typing import Any, Optional

from flax import nnx

from jaxquant.module_paths import named_modules
from jaxquant.qconfig_mapping import as_qconfig_mapping, qconfig_for

_UNSET = object()


def _own_qconfig(module: nnx.Module) -> Any:
    # Only an attribute set on this very module counts (``module.qconfig = ...``), as in PyTorch.
    return vars(module).get("qconfig", _UNSET)


def _parent_path(path: str) -> Optional[str]:
    if path == "":
        return None
    return path.rsplit(".", 1)[0] if "." in path else ""


def propagate_qconfig(model: nnx.Module, qconfig_or_mapping: Any = None) -> dict[str, Any]:
    """The qconfig (or ``None``: stays float) of every module path in ``model``.

    The mapping is resolved per module with :func:`jaxquant.qconfig_mapping.qconfig_for` (PyTorch's
    QConfigMapping order: global < object type < module-name regex < module name, where a module-name
    entry also covers the module's children). A ``qconfig`` attribute set on a module itself
    (``model.head.qconfig = None``, as in PyTorch's eager mode) is more specific still and applies
    to that module and everything below it.

    Returns:
      ``{path: qconfig or None}`` for every module ("" is the root).
    """
    mapping = as_qconfig_mapping(qconfig_or_mapping)
    attribute_qconfigs: dict[str, Any] = {}
    result: dict[str, Any] = {}
    for path, module in named_modules(model):
        own = _own_qconfig(module)
        if own is not _UNSET:
            attribute_qconfigs[path] = own
        qconfig = qconfig_for(mapping, path, type(module))
        ancestor = path
        while ancestor is not None:
            if ancestor in attribute_qconfigs:
                qconfig = attribute_qconfigs[ancestor]
                break
            ancestor = _parent_path(ancestor)
        result[path] = qconfig
    return result
