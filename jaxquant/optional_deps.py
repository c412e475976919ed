"""Imports of optional dependencies that name the ``pip install`` extra providing them.

The core install (``pip install jaxquant``) covers quantization, inference, ``jq.save``/``load``
and ``jq.export``. ONNX export needs ``jaxquant[onnx]``, plots need ``jaxquant[plot]``; a missing
package is reported as ``ModuleNotFoundError`` saying which extra to install, instead of a bare
``No module named 'onnx'`` from deep inside a call.
"""
from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, extra: str, feature: str) -> ModuleType:
    """Import ``module`` (e.g. ``"onnx"``) for ``feature`` (e.g. ``"export_onnx"``).

    Raises:
      ModuleNotFoundError: naming the feature and ``pip install 'jaxquant[<extra>]'``.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        top = module.split(".")[0]
        if e.name is not None and e.name.split(".")[0] != top:
            raise  # the package is there but one of *its* dependencies is missing: show that
        raise ModuleNotFoundError(
            f"{feature} needs the optional package '{top}', which is not installed: "
            f"pip install 'jaxquant[{extra}]' (or pip install {top})", name=e.name) from e
