"""Finding and replacing submodules of an NNX model by dotted path ("features.layers.0.conv").

A path is the NNX graph path joined with dots: attribute names, and list indices for ``nnx.List``
(so layer ``i`` of an ``nnx.Sequential`` is ``"<name>.layers.<i>"``). These strings are what
``QConfigMapping.set_module_name``, ``fuse_modules`` and every error message use.
"""
from __future__ import annotations

from flax import nnx


def path_to_str(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def named_modules(model: nnx.Module) -> list[tuple[str, nnx.Module]]:
    """Every module in ``model`` with its dotted path, parents before children ("" is the root).

    Each module object appears once, under the first path that reaches it.
    """
    seen: set[int] = set()
    found = []
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Module) and id(node) not in seen:
            seen.add(id(node))
            found.append((path_to_str(path), node))
    found.sort(key=lambda item: 0 if item[0] == "" else item[0].count(".") + 1)
    return found


def _child(node, key):
    if isinstance(node, (nnx.List, list, tuple)):
        return node[int(key)]
    if isinstance(node, (nnx.Dict, dict)):
        return node[key]
    return getattr(node, str(key))


def _split(path: str) -> list[str]:
    return [p for p in path.split(".") if p != ""]


def get_submodule(model: nnx.Module, path: str):
    """The submodule at dotted ``path``; ``KeyError`` naming the first missing part if absent."""
    node = model
    walked = []
    for part in _split(path):
        try:
            node = _child(node, part)
        except (AttributeError, IndexError, KeyError, ValueError):
            where = ".".join(walked) or "the model root"
            raise KeyError(f"no submodule '{path}': '{part}' does not exist under {where} "
                           f"({type(node).__name__})") from None
        walked.append(part)
    return node


def set_submodule(model: nnx.Module, path: str, new) -> None:
    """Replace the submodule at dotted ``path`` with ``new`` (in place)."""
    parts = _split(path)
    if not parts:
        raise ValueError("cannot replace the model root by path; use the returned model instead")
    parent = get_submodule(model, ".".join(parts[:-1]))
    last = parts[-1]
    if isinstance(parent, (nnx.List, list)):
        parent[int(last)] = new
    elif isinstance(parent, (nnx.Dict, dict)):
        parent[last] = new
    else:
        # nnx.data: the slot may have been declared static (e.g. None) in the float model.
        setattr(parent, last, nnx.data(new))


def copy_model(model: nnx.Module) -> nnx.Module:
    """A deep copy sharing nothing mutable with ``model`` (``nnx.clone``), each module's attributes
    in ``model``'s order.

    ``nnx.clone`` goes through ``split``/``merge``, which rebuilds every module with its attributes
    sorted by name; the transforms copy through here, so a prepared or converted model keeps the
    definition order the user wrote (what ``summary`` and PyTorch's printouts follow).
    """
    copy = nnx.clone(model)
    done: set[int] = set()
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, nnx.Module) or id(node) in done:
            continue
        done.add(id(node))
        twin = get_submodule(copy, path_to_str(path)) if path else copy
        _reorder_attributes(vars(twin), list(vars(node)))
    return copy


def _reorder_attributes(attrs: dict, order: list[str]) -> None:
    ranked = [k for k in order if k in attrs] + [k for k in attrs if k not in set(order)]
    if ranked == list(attrs):
        return
    items = [(k, attrs[k]) for k in ranked]
    attrs.clear()  # same keys and values, new insertion order
    attrs.update(items)


def replace_contents(target: nnx.Module, source: nnx.Module) -> None:
    """Make ``target`` structurally equal to ``source`` by moving ``source``'s attributes over.

    Used by the ``inplace=True`` transforms: they build the result on a copy (so a failure leaves the
    user's model untouched) and only then move it into the model the user holds.
    """
    if type(target) is not type(source):
        raise TypeError(f"cannot move a {type(source).__name__} into a {type(target).__name__}")
    for name in list(vars(target)):
        if not name.startswith("_"):
            if name not in vars(source):
                object.__delattr__(target, name)
    for name, value in vars(source).items():
        if not name.startswith("_"):
            setattr(target, name, nnx.data(value) if isinstance(value, nnx.Module) else value)
