"""Entry checks of the eager-mode transforms: refuse, with what to do, inputs that would fail later
with an unrelated message (or not fail at all).

Each check reads only the model's structure and static attributes (no arrays), so it costs a walk
over the modules and nothing on device.
"""
from __future__ import annotations

import difflib
from typing import Any

from flax import nnx

from jaxquant.module_paths import named_modules
from jaxquant.transforms.propagate import propagate_qconfig
from jaxquant.nn.observed import Observed
from jaxquant.nn.observer_module import ObserverModule
from jaxquant.qconfig_mapping import QConfigMapping


def check_nnx_model(model: Any, where: str) -> None:
    """Raise ``TypeError`` unless ``model`` is a Flax NNX module (a Linen module is pointed to
    ``jaxquant.linen``, which has the same workflow for Linen)."""
    try:
        import flax.linen as nn
    except ImportError:  # pragma: no cover - flax always ships linen
        nn = None
    if nn is not None and isinstance(model, nn.Module):
        raise TypeError(
            f"{where}: got a Flax Linen module ({type(model).__name__}); jaxquant.{where} works on Flax NNX "
            f"modules. For Linen use jaxquant.linen.{where}(model, variables, ...) (see docs/linen.md), or "
            "wrap the Linen module with flax.nnx.bridge.ToNNX")
    if not isinstance(model, nnx.Module):
        raise TypeError(f"{where}: expected a Flax NNX module (flax.nnx.Module), got {type(model).__name__}")


def check_not_prepared(model: nnx.Module, where: str) -> None:
    """Raise ``ValueError`` if ``model`` already holds observers, fake quants or quantized modules:
    preparing twice would wrap observed layers in observers again and fail much later in ``convert``."""
    found = []
    for path, module in named_modules(model):
        if isinstance(module, (Observed, ObserverModule)):
            found.append((path, "observed (it was prepared already)"))
        elif type(module).__module__.startswith(("jaxquant.nn.qat", "jaxquant.nn.quantized")):
            found.append((path, f"a {type(module).__module__.split('.')[2]} module ({type(module).__name__})"))
    if found:
        names = ", ".join(f"'{p or '<model>'}'" for p, _ in found[:4]) + (", ..." if len(found) > 4 else "")
        raise ValueError(
            f"{where}: {names} {'is' if len(found) == 1 else 'are'} {found[0][1]}; {where} takes the float "
            f"model. Call {where} once, on the float (fused) model, and keep using the model it returned")


def check_eval_mode(model: nnx.Module, where: str) -> None:
    """Raise ``ValueError`` naming every BatchNorm/Dropout left in training mode.

    In training mode BatchNorm normalises with the batch's statistics and updates its running
    averages, and Dropout zeroes activations at random: the observers would record ranges the
    int8 model never sees (and the running statistics would change under calibration)."""
    bad = []
    for path, module in named_modules(model):
        if isinstance(module, nnx.BatchNorm) and not module.use_running_average:
            bad.append(f"'{path}' (BatchNorm, use_running_average=False)")
        elif isinstance(module, nnx.Dropout) and not module.deterministic and module.rate > 0:
            bad.append(f"'{path}' (Dropout, deterministic=False)")
    if bad:
        raise ValueError(
            f"{where}: {', '.join(bad)} in training mode; calibration must see the activations of "
            "inference. Call model.eval() on the float model before fuse_modules/prepare (or on the "
            "prepared model before calibrate)")


def check_module_names(model: nnx.Module, mapping: Any, where: str) -> None:
    """Raise ``KeyError`` if a ``QConfigMapping.set_module_name`` (or ``..._object_type_order``)
    entry names a path that is not in ``model`` (a typo would otherwise silently quantize the layer
    it meant to keep float), suggesting the closest paths."""
    if not isinstance(mapping, QConfigMapping):
        return
    names = list(mapping.module_name_qconfigs)
    names += [name for (name, _, _) in mapping.module_name_object_type_order_qconfigs]
    paths = [p for p, _ in named_modules(model)]
    known = set(paths)
    for name in names:
        if name in known:
            continue
        near = difflib.get_close_matches(name, [p for p in paths if p], n=5, cutoff=0.5)
        hint = f"did you mean {', '.join(repr(p) for p in near)}?" if near else \
            f"module paths: {', '.join(repr(p) for p in paths if p)[:400]}"
        raise KeyError(f"{where}: the QConfigMapping names module path '{name}' (set_module_name), which is not "
                       f"in the model; {hint} Paths are NNX attribute paths joined by dots, e.g. "
                       "'block1.conv', 'layers.0'")


def checked_qconfigs(model: Any, qconfig_or_mapping: Any, where: str, what: str, example: str) -> dict[str, Any]:
    """The entry checks of ``prepare``/``prepare_qat``, then every module path's qconfig; ``ValueError``
    when none has one (nothing would be ``what``)."""
    check_nnx_model(model, where)
    check_not_prepared(model, where)
    check_module_names(model, qconfig_or_mapping, where)
    qconfigs = propagate_qconfig(model, qconfig_or_mapping)
    if all(q is None for q in qconfigs.values()):
        raise ValueError(f"{where}: no module has a qconfig, so nothing would be {what}; pass a {example} or a "
                         "QConfigMapping")
    return qconfigs
