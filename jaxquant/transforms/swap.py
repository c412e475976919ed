"""The one module-swap walk of ``prepare``, ``prepare_qat``, ``quantize_dynamic`` and ``convert``.

Each transform is a function ``swap(path, module)`` saying what becomes of one module; this walk
does the rest the same way for all four: work on a copy (so an error leaves the user's model
untouched), visit parents before children, skip what lies inside a unit already handled, put the new
module in place, and move the result into the user's model for ``inplace=True``.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from flax import nnx

from jaxquant.module_paths import copy_model, named_modules, replace_contents, set_submodule
from jaxquant.nn.functional_modules import FloatFunctional
from jaxquant.nn.observed import Observed
from jaxquant.nn.stubs import DeQuantStub

# ``swap`` returns: None (leave the module, walk into it), the module itself (edited in place: a unit
# now, its children are not visited), or a new module to put at ``path``.
SwapFn = Callable[[str, nnx.Module], Optional[nnx.Module]]


def _inside(path: str, unit: str) -> bool:
    return path == unit or path.startswith(unit + ".")


def swap_modules(model: nnx.Module, swap: SwapFn) -> tuple[nnx.Module, list[str]]:
    """A copy of ``model`` with ``swap`` applied to every module outside the units already handled.

    Returns ``(result, handled paths)``. A new module returned for the root path ``""`` becomes the
    result itself (and ends the walk).
    """
    result = copy_model(model)
    handled: list[str] = []
    for path, module in named_modules(result):
        if any(_inside(path, unit) for unit in handled if unit != ""):
            continue
        new = swap(path, module)
        if new is None:
            continue
        handled.append(path)
        if new is module:
            continue
        if path == "":
            return new, handled
        set_submodule(result, path, new)
    return result, handled


def finish(model: nnx.Module, result: nnx.Module, inplace: bool) -> nnx.Module:
    """``result``, or for ``inplace=True`` the user's ``model`` with ``result``'s contents moved in."""
    if not inplace:
        return result
    replace_contents(model, result)
    return model


def has_params(module: nnx.Module) -> bool:
    return any(True for _ in nnx.state(module, nnx.Param).flat_state())


def is_leaf(module: nnx.Module) -> bool:
    return not any(child is not module for _, child in named_modules(module))


def observe_stub_or_functional(path: str, module: nnx.Module, qconfig: Any,
                               make_output: Callable[[Any, str], nnx.Module]) -> Optional[nnx.Module]:
    """What ``prepare`` and ``prepare_qat`` do alike to a ``FloatFunctional`` (its output observer or fake
    quant from ``make_output(qconfig, path)``) and a ``DeQuantStub`` (wrapped with none); None otherwise."""
    if isinstance(module, FloatFunctional):
        module.activation_post_process = nnx.data(make_output(qconfig, path))
        return module
    if type(module) is DeQuantStub:
        return Observed(module, None, qconfig)
    return None


def refuse_unmapped_layer(path: str, module: nnx.Module, counterpart: str, otherwise: str) -> None:
    """ValueError for a leaf with parameters and a qconfig that the mapping has no ``counterpart`` for."""
    if is_leaf(module) and has_params(module):
        t = type(module)
        raise ValueError(f"'{path}' ({t.__module__}.{t.__qualname__}) has a qconfig but no {counterpart} quantized "
                         f"counterpart. Keep it float with qconfig_mapping.set_module_name('{path}', None) (and put a "
                         f"DeQuantStub before it), {otherwise}")
