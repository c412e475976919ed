"""``summary(model, qconfig_mapping)``: what was quantized, how, how big; which mapping entries matched nothing."""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Optional

from flax import nnx

from jaxquant.module_paths import named_modules
from jaxquant.nn.observed import Observed
from jaxquant.nn.variables import QuantParams
from jaxquant.quantization_mappings import get_default_static_quant_module_mappings
from jaxquant.tools.size import model_arrays
from jaxquant.transforms import propagate_qconfig


@dataclasses.dataclass(frozen=True)
class ModuleSummary:
    """One module: ``status`` is "quantized" (int8 module), "observed" (prepared/QAT) or "float"."""

    path: str
    module_type: str
    status: str
    qconfig: Optional[str]
    weight_dtype: Optional[str]
    activation_dtype: Optional[str]
    scheme: Optional[str]
    nbytes: int


@dataclasses.dataclass(frozen=True)
class ModelSummary:
    """Rows for every module that holds arrays or a quantization setting; ``str()`` is a table."""

    modules: tuple[ModuleSummary, ...]
    unmatched_entries: tuple[str, ...]
    total_bytes: int

    def quantized_paths(self) -> list[str]:
        return [m.path for m in self.modules if m.status == "quantized"]

    def __str__(self) -> str:
        rows = [("path", "type", "status", "weight", "activation", "scheme", "bytes", "qconfig")]
        for m in self.modules:
            rows.append((m.path or "(root)", m.module_type, m.status, m.weight_dtype or "-", m.activation_dtype or "-",
                         m.scheme or "-", str(m.nbytes), (m.qconfig or "-")[:60]))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(f"total: {self.total_bytes} bytes in defining arrays")
        if self.unmatched_entries:
            lines.append("QConfigMapping entries that matched no module: " + ", ".join(self.unmatched_entries))
        return "\n".join(lines)


def _own_bytes(arrays: dict, path: str, child_paths: list[str]) -> int:
    prefix = path + "." if path else ""
    total = 0
    for name, array in arrays.items():
        if name.startswith(prefix) and not any(name.startswith(c + ".") for c in child_paths):
            total += array.nbytes
    return total


def _describe(module: Any) -> tuple[str, Optional[str], Optional[str], Optional[str], Optional[str]]:
    """(status, qconfig text, weight dtype, activation dtype, scheme)."""
    if isinstance(module, Observed):
        observer = module.activation_post_process
        return "observed", repr(module.qconfig), None, None if observer is None else repr(observer.dtype), None
    if any(isinstance(v, QuantParams) for v in vars(module).values()):
        weight = vars(module).get("weight_int8")
        weight_dtype = None if weight is None else str(weight.get_value().dtype)
        out_dtype = vars(module).get("out_dtype", vars(module).get("dtype"))
        scheme = vars(module).get("weight_qscheme")
        return ("quantized", None, weight_dtype, None if out_dtype is None else repr(out_dtype),
                None if scheme is None else repr(scheme))
    qconfig = vars(module).get("qconfig")
    if qconfig is not None and hasattr(module, "weight_fake_quant"):
        return "observed", repr(qconfig), None, None, None
    return "float", None, None, None, None


def _unmatched(mapping: Any, modules: list[tuple[str, Any]]) -> list[str]:
    paths = [p for p, _ in modules]
    types = set()
    static_map = get_default_static_quant_module_mappings()
    for _, m in modules:
        types.add(type(m))
        if isinstance(m, Observed):
            types.add(type(m.module))
    # A converted model no longer holds the float types: count the float types that map to its types.
    types |= {float_t for float_t, quant_t in static_map.items() if quant_t in types}
    unmatched = []
    for key in mapping.object_type_qconfigs:
        if isinstance(key, type) and key not in types and not any(issubclass(t, key) for t in types):
            unmatched.append(f"object_type {key.__qualname__}")
    for pattern in mapping.module_name_regex_qconfigs:
        if not any(re.match(pattern, p) for p in paths):
            unmatched.append(f"module_name_regex {pattern!r}")
    for name in mapping.module_name_qconfigs:
        if name not in paths:
            unmatched.append(f"module_name {name!r}")
    for (name, _, _) in mapping.module_name_object_type_order_qconfigs:
        if name not in paths:
            unmatched.append(f"module_name_object_type_order {name!r}")
    return unmatched


def _definition_order(model: nnx.Module) -> dict[str, int]:
    """Rank of each module path in depth-first definition order (the order ``__init__`` assigned the
    attributes, children right after their parent), as PyTorch's ``named_modules`` lists them.
    ``named_modules`` here is breadth-first and alphabetical within a level (NNX's graph order)."""
    order: dict[str, int] = {"": 0}
    seen: set[int] = {id(model)}

    def visit(node: Any, prefix: str) -> None:
        if isinstance(node, (nnx.List, list, tuple)):
            items = [(str(i), v) for i, v in enumerate(node)]
        elif isinstance(node, (nnx.Dict, dict)):
            items = [(str(k), v) for k, v in node.items()]
        elif isinstance(node, nnx.Module):
            items = list(vars(node).items())
        else:
            return
        for key, value in items:
            if isinstance(value, nnx.Variable) or key.startswith("_"):
                continue
            path = f"{prefix}.{key}" if prefix else key
            if isinstance(value, nnx.Module):
                if id(value) in seen:
                    continue
                seen.add(id(value))
                order.setdefault(path, len(order))
            visit(value, path)

    visit(model, "")
    return order


def summary(model: nnx.Module, qconfig_mapping: Any = None) -> ModelSummary:
    """Summarise a float, prepared or converted model.

    Args:
      model: any NNX model.
      qconfig_mapping: optional ``QConfigMapping`` (or QConfig) it was prepared with: its resolved
        QConfig is shown for each module (path-based precedence), and entries for module names,
        regexes or object types that match no module are listed (typos, renamed layers). Entries
        keyed by functions or method names (``"reshape"``) are not checked: modules only.
    Returns:
      :class:`ModelSummary`: per module (that holds arrays or a quantization setting) its path, type,
      status, QConfig, weight and activation dtypes, weight qscheme and own bytes. Rows are depth
      first (each module right before its children; list items by index), attributes in the order
      the module assigned them (``prepare``/``convert``/``quantize_dynamic`` keep that order in their
      copies), as PyTorch prints a model.
    """
    modules = named_modules(model)
    rank = _definition_order(model)
    modules.sort(key=lambda item: rank.get(item[0], len(rank)))  # stable: unknown paths keep their order
    arrays = model_arrays(model)
    resolved = {}
    if qconfig_mapping is not None:
        resolved = propagate_qconfig(model, qconfig_mapping)
    rows = []
    for path, module in modules:
        children = [p for p, _ in modules if p != path and p.startswith(path + "." if path else "")]
        nbytes = _own_bytes(arrays, path, children)
        status, qconfig, weight_dtype, act_dtype, scheme = _describe(module)
        if qconfig is None and resolved.get(path) is not None:
            qconfig = repr(resolved[path])
        if nbytes or status != "float":
            rows.append(ModuleSummary(path, type(module).__name__, status, qconfig, weight_dtype, act_dtype,
                                      scheme, nbytes))
    unmatched = []
    if qconfig_mapping is not None and hasattr(qconfig_mapping, "object_type_qconfigs"):
        unmatched = _unmatched(qconfig_mapping, modules)
    return ModelSummary(tuple(rows), tuple(unmatched), int(sum(a.nbytes for a in arrays.values())))
