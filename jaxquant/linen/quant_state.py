"""Observer and fake-quant state kept in Linen variables, and traceable weight quantization.

Everything here is traceable (works inside ``jax.jit``, ``nn.scan``, ``nn.vmap``): checks that need
concrete values (was an observer ever fed? is a weight finite?) are made afterwards, on the variable
trees, by :mod:`jaxquant.linen.checks`.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxquant.core.weights import quantize_weight_traceable, quantize_with_qparams
from jaxquant.fake_quant.learnable import LearnableFakeQuantize
from jaxquant.linen.names import QUANT_STATS, display_path, module_path
from jaxquant.observers.protocols import FakeQuant
from jaxquant.qtensor import QTensor


def _stats_variable(module: Any, name: str, init_fn, *init_args):
    if not module.has_variable(QUANT_STATS, name) and not module.is_mutable_collection(QUANT_STATS):
        raise ValueError(
            f"'{display_path(module_path(module))}' ({type(module).__name__}) has no '{QUANT_STATS}/{name}' yet: "
            f"run the prepared model once with apply(..., mutable=['{QUANT_STATS}']) (or calibrate) first")
    return module.variable(QUANT_STATS, name, init_fn, *init_args)


def observe(module: Any, name: str, observer: Any, x: jax.Array) -> jax.Array:
    """Update the observer state ``quant_stats/<name>`` of ``module`` with ``x``; returns ``x``.

    The state is only written when ``quant_stats`` is mutable (``apply(..., mutable=['quant_stats'])``),
    as an observer in eval mode."""
    var = _stats_variable(module, name, observer.init, x)
    # model.init only creates the state: the init example is not calibration data
    if module.is_mutable_collection(QUANT_STATS) and not module.is_initializing():
        var.value = observer.update(var.value, x)
    return x


def fake_quant(module: Any, name: str, config: Any, x: jax.Array, example_or_shape: Any = None) -> jax.Array:
    """Fake-quantize ``x`` with ``config`` (a FakeQuantize config) and state ``quant_stats/<name>``.

    Same shape/dtype as ``x``; gradients straight-through (the config's custom VJP)."""
    if not isinstance(config, FakeQuant):
        raise TypeError(f"'{display_path(module_path(module))}': QAT needs fake-quantize configs, got {config!r}; "
                        "use get_default_qat_qconfig('x86') or jaxquant.linen.get_default_qat_qconfig_mapping()")
    if isinstance(config, LearnableFakeQuantize):
        raise NotImplementedError(
            f"'{display_path(module_path(module))}': LearnableFakeQuantize (LSQ) is not supported in "
            "jaxquant.linen yet; use FakeQuantize / FusedMovingAvgObsFakeQuantize configs")
    var = _stats_variable(module, name, config.init, example_or_shape)
    y, new_state = config.apply(var.value, x)
    if module.is_mutable_collection(QUANT_STATS) and not module.is_initializing():
        var.value = new_state
    return y


def activation_qparams(config: Any, state: Any) -> tuple[jax.Array, jax.Array]:
    """Per-tensor ``(scale float32 (), zero_point int32 ())`` from an observer or fake-quant state."""
    return finish_qparams(*config.calculate_qparams(state))


def finish_qparams(scale: jax.Array, zero_point: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-tensor qparams as stored: float32 ``()`` scale, int32 ``()`` zero point."""
    return (jnp.asarray(scale, jnp.float32).reshape(()),
            jnp.round(jnp.asarray(zero_point)).astype(jnp.int32).reshape(()))


def _as_params(q: QTensor) -> dict:
    """A quantized kernel as the Linen ``quant_params`` entries (per-channel shapes even per tensor)."""
    c = q.shape[-1]
    scale, zero_point = q.channel_qparams()
    return {
        "weight_int": q.int_data,
        "weight_scale": jnp.broadcast_to(jnp.asarray(scale, jnp.float32), (c,)),
        "weight_zero_point": jnp.broadcast_to(jnp.asarray(zero_point), (c,)),
    }


def quantize_kernel(kernel: jax.Array, observer: Any) -> dict:
    """Quantize a float kernel ``(..., C_out)`` with a weight observer: the traceable core of NNX's
    :func:`jaxquant.core.weights.quantize_weight` (observer sees PyTorch's out-channel-first
    layout; integers clamped to the observer's range), without its host-side checks.

    Returns ``{"weight_int": int (..., C_out) in the observer dtype's storage, "weight_scale": float32 (C_out,),
    "weight_zero_point": int32 (or float32 for float qparams) (C_out,)}``.
    """
    return _as_params(quantize_weight_traceable(kernel, observer))


def quantize_gate_group(kernels: list, observer: Any) -> list[dict]:
    """Quantize the kernels ``(..., K, N_g)`` of a recurrent cell's gates (e.g. an LSTM's four input
    Denses) as one weight ``(..., K, sum N_g)``, as PyTorch quantizes ``weight_ih``/``weight_hh``: one
    per-tensor scale over all gates (per channel it changes nothing). Returns one
    :func:`quantize_kernel` dict per gate, in the order given."""
    sizes = [int(k.shape[-1]) for k in kernels]
    whole = quantize_kernel(jnp.concatenate([jnp.asarray(k, jnp.float32) for k in kernels], axis=-1), observer)
    bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    return [{name: value[..., lo:hi] for name, value in whole.items()} for lo, hi in zip(bounds, bounds[1:])]


def quantize_kernel_with_fake_quant(kernel: jax.Array, config: Any, state: Any) -> dict:
    """Quantize a float kernel ``(..., C_out)`` with a weight fake quant's qparams after running it once
    more on the kernel (PyTorch's QAT ``from_float``; :func:`jaxquant.nn.qat.weight_fake_quant.
    quantize_kernel_with_fake_quant` for NNX). Same return as :func:`quantize_kernel`."""
    kernel = jnp.asarray(kernel, jnp.float32)
    w_pt = jnp.moveaxis(kernel, -1, 0)
    _, state = config.apply(state, w_pt)
    scale, zero_point = config.calculate_qparams(state)
    qrange = tuple(config.quant_range) if hasattr(config, "quant_range") else (int(config.quant_min),
                                                                                int(config.quant_max))
    return _as_params(quantize_with_qparams(kernel, jnp.asarray(scale, jnp.float32), zero_point, config.dtype,
                                            config.qscheme, qrange))
