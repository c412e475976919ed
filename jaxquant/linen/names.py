"""Collection names and module paths shared by every part of ``jaxquant.linen``.

Observer / fake-quant state lives in ``quant_stats`` (mutable during calibration and QAT); a
converted model's int8 weights and static qparams live in ``quant_params``; weights in the native
backend's layouts, derived from them at convert time, in ``quant_cache`` (rebuilt, never saved). Module paths are
Linen scope paths joined with dots ("Conv_0", "block.Dense_1"): the keys of QConfigMapping rules.
"""
from __future__ import annotations

from typing import Any

QUANT_STATS = "quant_stats"
QUANT_PARAMS = "quant_params"
QUANT_CACHE = "quant_cache"


def module_path(module: Any) -> str:
    """Dotted path of a bound Linen module ("" for the root)."""
    return ".".join(str(p) for p in module.path)


def display_path(path: str) -> str:
    return path or "<root>"
