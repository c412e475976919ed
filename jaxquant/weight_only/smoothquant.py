"""SmoothQuant (Xiao et al. 2023): migrate activation outliers into the weights for W8A8.

For a layer ``Y = X W`` (flax layout, ``X`` ``(rows, K)``), per input channel ``j``
``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``; then ``Y = (X diag(s)^-1) (diag(s) W)``: the
smoothed activation has flatter channels (easier per-tensor int8) and the weight absorbs the
difference (per-channel int8 handles it). ``alpha`` is given or searched on a grid per layer,
minimising the simulated W8A8 output error on the calibration sample. The divide by ``s`` stays in
the layer (:class:`SmoothQuantLinear`) rather than being folded into the previous op, so every
``nnx.Linear`` can take it; the int8 part is jaxquant's dynamic ``Linear`` (u8 x s8 VNNI dot).
"""
from __future__ import annotations

from functools import partial
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxquant.nn.variables import QuantParams

__all__ = ["SmoothQuantLinear", "smoothing_factors", "smoothquant_search", "smooth_quantize",
           "DEFAULT_SQ_ALPHAS"]

DEFAULT_SQ_ALPHAS: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def smoothing_factors(act_max: jax.Array, kernel: jax.Array, alpha: float) -> jax.Array:
    """``s_j = max|X_j|^alpha / max_n |W_jn|^(1-alpha)`` (float32 ``(K,)``), clamped away from 0."""
    a = jnp.maximum(jnp.asarray(act_max, jnp.float32), 1e-5)
    w = jnp.maximum(jnp.max(jnp.abs(jnp.asarray(kernel, jnp.float32)), axis=1), 1e-5)
    return jnp.maximum(jnp.power(a, alpha) / jnp.power(w, 1.0 - alpha), 1e-5)


def _fq_per_tensor_act(x):
    # Dynamic per-tensor asymmetric uint8, as the dynamic Linear quantizes its input.
    mn, mx = jnp.minimum(jnp.min(x), 0.0), jnp.maximum(jnp.max(x), 0.0)
    s = jnp.maximum((mx - mn) / 255.0, 1e-8)
    z = jnp.round(-mn / s)
    return (jnp.clip(jnp.round(x / s) + z, 0, 255) - z) * s


def _fq_per_channel_weight(w):
    s = jnp.maximum(jnp.max(jnp.abs(w), axis=0) / 127.5, 1e-8)  # per output channel (columns)
    return jnp.clip(jnp.round(w / s), -128, 127) * s


@jax.jit
def _sq_losses(kernel, act_max, sample, alphas):
    ref = sample @ kernel

    def one(alpha):
        s = smoothing_factors(act_max, kernel, alpha)
        y = _fq_per_tensor_act(sample / s) @ _fq_per_channel_weight(kernel * s[:, None])
        return jnp.sum((y - ref) ** 2)

    return jax.lax.map(one, alphas)


def smoothquant_search(kernel: jax.Array, act_max: np.ndarray, sample: np.ndarray,
                       alphas: Sequence[float] = DEFAULT_SQ_ALPHAS, where: str = "smoothquant") -> tuple[float, np.ndarray]:
    """The ``alpha`` of ``alphas`` with the smallest simulated W8A8 (per-tensor activation) output error
    on ``sample`` ``(S, K)``; returns ``(alpha, losses)``."""
    if sample.shape[0] == 0:
        raise ValueError(f"{where}: no calibration sample reached this layer; run real inputs through the model")
    losses = np.asarray(_sq_losses(jnp.asarray(kernel, jnp.float32), jnp.asarray(act_max, jnp.float32),
                                   jnp.asarray(sample, jnp.float32), jnp.asarray(alphas, jnp.float32)))
    return float(alphas[int(np.argmin(losses))]), losses


class SmoothQuantLinear(nnx.Module):
    """``inner(x / smooth)`` where ``inner`` is a W8A8 dynamic ``Linear`` holding ``diag(smooth) W``.

    float ``(..., K)`` -> float32 ``(..., N)``.
    """

    def __init__(self, inner: nnx.Module, smooth: jax.Array, alpha: float, name: str = ""):
        self.inner = inner
        self.smooth = QuantParams(jnp.asarray(smooth, jnp.float32))
        self.alpha = float(alpha)
        self.name = name

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.inner(x / self.smooth.get_value())


def smooth_quantize(model: nnx.Module, stats: dict, *, alpha: Optional[float] = None,
                    alphas: Sequence[float] = DEFAULT_SQ_ALPHAS, per_token: bool = False, qconfig: Any = None,
                    progress: bool = True) -> nnx.Module:
    """W8A8 with SmoothQuant: each ``nnx.Linear`` in ``stats`` becomes a :class:`SmoothQuantLinear`.

    Args:
      model: float NNX model (not modified).
      stats: path -> :class:`~jaxquant.weight_only.calibration.LinearStats` (``collect_linear_stats``).
      alpha: migration strength; ``None`` searches ``alphas`` per layer.
      per_token: per-token activation scales (else per tensor, the setting SmoothQuant targets).
      qconfig: weight qconfig of the dynamic Linear (default per-channel int8).
    Returns:
      A new model; layers not in ``stats`` stay float.
    """
    from jaxquant.module_paths import copy_model, get_submodule, set_submodule
    from jaxquant.nn.dynamic import Linear as DynamicLinear
    from jaxquant.qconfig import per_channel_dynamic_qconfig

    qconfig = per_channel_dynamic_qconfig if qconfig is None else qconfig
    if not stats:
        raise ValueError("smooth_quantize: no layer statistics; run collect_linear_stats on calibration data first")
    result = copy_model(model)
    items = list(stats.items())
    if progress:
        from tqdm.auto import tqdm
        items = tqdm(items, desc="smoothquant", leave=False)
    for path, st in items:
        lin = get_submodule(result, path)
        if not isinstance(lin, nnx.Linear):
            raise TypeError(f"smooth_quantize: '{path}' is a {type(lin).__name__}, expected nnx.Linear")
        kernel = jnp.asarray(lin.kernel.get_value(), jnp.float32)
        a = alpha if alpha is not None else smoothquant_search(kernel, st.abs_max, st.sample, alphas, path)[0]
        s = smoothing_factors(st.abs_max, kernel, a)
        scaled = nnx.Linear(kernel.shape[0], kernel.shape[1], use_bias=lin.bias is not None, rngs=nnx.Rngs(0))
        scaled.kernel.set_value(kernel * s[:, None])
        if lin.bias is not None:
            scaled.bias.set_value(lin.bias.get_value())
        inner = DynamicLinear.from_float(scaled, qconfig, path, per_token=per_token, reduce_range=False)
        set_submodule(result, path, SmoothQuantLinear(inner, s, a, name=path))
    return result
