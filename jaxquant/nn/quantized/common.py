"""What every quantized module shares: checking its input and reading observed qparams."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.dtypes import QDType, qint8, quint8
from jaxquant.qtensor import QTensor


def require_qtensor(x: Any, module_name: str, module_type: str) -> QTensor:
    """``x`` if it is a per-tensor QTensor; otherwise a TypeError saying where and what to do."""
    if isinstance(x, QTensor):
        if x.axis is not None:
            raise ValueError(f"quantized module '{module_name}' ({module_type}) received a per-channel "
                             "QTensor; activations must be quantized per tensor")
        return x
    raise TypeError(
        f"quantized module '{module_name}' ({module_type}) received a {type(x).__name__} "
        f"({getattr(x, 'dtype', '?')}), not a quantized tensor: insert a QuantStub before it in the float "
        "model, or give it qconfig=None to keep it float"
    )


def observed_qparams(observer_module: Any, path: str) -> tuple[jax.Array, jax.Array, QDType]:
    """Concrete ``(scale, zero_point, dtype)`` from an ``ObserverModule`` (or a QAT fake-quant module:
    anything with ``checked_qparams(path)`` and ``dtype``), validated; errors name ``path``."""
    scale, zero_point = observer_module.checked_qparams(path)
    dtype = observer_module.dtype
    if dtype not in (quint8, qint8):
        raise ValueError(f"'{path}': static quantization needs quint8 or qint8 activations, "
                         f"{observer_module!r} uses {dtype!r}")
    scale = jnp.asarray(scale, jnp.float32).reshape(())
    zero_point = jnp.asarray(zero_point).astype(jnp.int32).reshape(())
    if not np.isfinite(float(scale)) or float(scale) <= 0:
        raise ValueError(f"'{path}': {observer_module!r} produced an invalid scale {float(scale)}")
    return scale, zero_point, dtype
