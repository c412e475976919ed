"""NNX Variable types that hold quantization state, so ``nnx.split`` can separate it.

``nnx.split(model, nnx.Param, QuantStats, ...)`` gives trainable parameters, observer/fake-quant state
and everything else as three pytrees; a plain ``jax.jit`` calibration or training loop carries the
second one. Gradients are taken with respect to ``nnx.Param`` only.

A module's ``QuantCache`` is derived from its ``QuantParams``; :func:`seal_cache` records (as Variable
metadata, i.e. static, free under ``jit``) which ``QuantParams`` a cache was built from, and
:func:`stale_cache` tells whether they were replaced since (``nnx.update`` carries the loaded
Variables' metadata along with their values).
"""
from __future__ import annotations

import hashlib
import uuid
from typing import Any, Optional, Protocol, runtime_checkable

import jax
import numpy as np
from flax import nnx

_SOURCE = "cache_source"  # metadata key: fingerprint of the QuantParams a cache was built from
_SHAPES = "cache_shapes"  # metadata key on QuantCache: ((name, shape), ...) of those QuantParams


class QuantStats(nnx.Variable):
    """Observer and fake-quantize state (min/max, histograms, scale, zero point, enable flags)."""


class QuantParams(nnx.Variable):
    """The fixed arrays of a converted model: int8 weights, scales, zero points, folded biases."""


class QuantCache(nnx.Variable):
    """Arrays derived from ``QuantParams`` for speed (packed weight layouts, column sums).

    Not part of what defines the model: serialisation and size accounting leave it out
    (``nnx.state(model, nnx.Not(QuantCache))``).
    """


@runtime_checkable
class CachedLayer(Protocol):
    """A quantized layer holding ``QuantCache`` arrays derived from its ``QuantParams`` (packed weights,
    column sums): ``rebuild_cache()`` returns it rebuilt from those, after a load replaced them."""

    def rebuild_cache(self) -> nnx.Module: ...


class StaleCacheError(ValueError):
    """A module's ``QuantParams`` were replaced after its ``QuantCache`` was built, and the cache
    cannot be rebuilt where the module is called (under ``jit``), or the new arrays have other shapes."""


def _variables(module: Any, kind: type) -> list[tuple[str, nnx.Variable]]:
    return sorted((k, v) for k, v in vars(module).items() if isinstance(v, kind))


def _shapes(module: Any) -> tuple[tuple[str, Any], ...]:
    # A tuple, not a dict: metadata is part of the graphdef, which jit hashes.
    return tuple((k, tuple(tuple(np.shape(a)) for a in jax.tree.leaves(v.get_raw_value())))
                 for k, v in _variables(module, QuantParams))


def params_fingerprint(module: Any) -> Optional[str]:
    """A content hash of ``module``'s ``QuantParams`` (names, dtypes, shapes, bytes); ``None`` if any
    of them is being traced (its bytes are not known on the host)."""
    h = hashlib.sha1()
    for name, variable in _variables(module, QuantParams):
        for leaf in jax.tree.leaves(variable.get_raw_value()):
            if isinstance(leaf, jax.core.Tracer):
                return None
            a = np.asarray(leaf)
            h.update(f"{name}:{a.dtype}:{a.shape};".encode())
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:20]


def seal_cache(module: Any) -> None:
    """Mark ``module``'s ``QuantCache`` as built from its current ``QuantParams``.

    Call it at the end of the constructor of every module holding a ``QuantCache``. The fingerprint
    is a content hash when the arrays are concrete (two identical conversions agree), a random token
    otherwise.
    """
    fingerprint = params_fingerprint(module) or uuid.uuid4().hex[:20]
    shapes = _shapes(module)
    for _, variable in _variables(module, QuantParams):
        variable.set_metadata(_SOURCE, fingerprint)
    for _, variable in _variables(module, QuantCache):
        variable.set_metadata(_SOURCE, fingerprint)
        variable.set_metadata(_SHAPES, shapes)


def stale_cache(module: Any) -> Optional[list[str]]:
    """Names of ``module``'s ``QuantParams`` replaced since :func:`seal_cache` (``None`` when the cache
    is current, or was never sealed). A Python-level check of static metadata: no array is read."""
    caches = _variables(module, QuantCache)
    if not caches:
        return None
    expected = caches[0][1].get_metadata(_SOURCE, None)
    if expected is None:
        return None
    replaced = [k for k, v in _variables(module, QuantParams) if v.get_metadata(_SOURCE, None) != expected]
    return replaced or None


def refresh_cache(module: Any, name: str) -> None:
    """Make ``module``'s ``QuantCache`` agree with its ``QuantParams`` after they were replaced
    (``nnx.update`` with another model's arrays): rebuild it in place when the arrays are concrete and
    keep their shapes; otherwise raise :class:`StaleCacheError` naming ``name`` and the fix.

    Costs one dict walk per eager call when nothing changed; under ``jit`` it runs at trace time only.
    """
    replaced = stale_cache(module)
    if replaced is None:
        return
    caches = _variables(module, QuantCache)
    built_for = dict(caches[0][1].get_metadata(_SHAPES, ()))
    now = dict(_shapes(module))
    changed = [k for k in replaced if built_for.get(k) != now.get(k)]
    where = f"{type(module).__qualname__} '{name}'"
    if changed:
        detail = ", ".join(f"{k} has shape {now.get(k)} (the module was built for {built_for.get(k)})"
                           for k in changed)
        raise StaleCacheError(
            f"{where}: arrays loaded into it do not fit its architecture: {detail}. They come from a model "
            "built differently; build the target the same way (fusion, qconfig, layer sizes), or use "
            "jaxquant.load, which checks every shape before changing anything"
        )
    if params_fingerprint(module) is None:
        raise StaleCacheError(
            f"{where}: its QuantParams ({', '.join(replaced)}) were replaced (nnx.update) after its packed "
            "weight (QuantCache) was built, and under jit the cache cannot be rebuilt. Call "
            "jaxquant.rebuild_cache(model) after loading arrays and before jit (jaxquant.load does it)"
        )
    fresh = module.rebuild_cache()
    for key, variable in caches:
        variable.set_value(getattr(fresh, key).get_value())
    seal_cache(module)
