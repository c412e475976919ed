"""Dynamic ``nnx.LinearGeneral``: the multi-axis dense of ``nnx.MultiHeadAttention``'s query, key,
value (``in -> (heads, head_dim)``) and output (``(heads, head_dim) -> out``) projections.

Without batch axes a LinearGeneral is a plain matrix product once the contracted input axes are
moved last and flattened: kernel ``(*in_features, *out_features)`` is reshaped to ``(K, N)`` with
``K = prod(in_features)``, ``N = prod(out_features)``, and the whole layer becomes one 2-D dynamic
linear (``jaxquant.nn.dynamic.Linear``: int8, or float16/bfloat16 weights by the qconfig). Weight
scales are therefore per tensor or per flattened output unit (``heads * head_dim`` scales for a
query projection), and per-token activation qparams are per row of the flattened ``(M, K)`` input.

``batch_axis`` (a different kernel per batch index) is a batched dot that the 2-D kernel cannot
express; it is refused at conversion.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxquant.core.grad_guard import refuse_gradient
from jaxquant.core.weights import check_finite
from jaxquant.nn.dynamic.linear import Linear


def matrix_linear(kernel: jax.Array, bias: Optional[jax.Array], qconfig: Any, path: str, *,
                  reduce_range: bool = True, per_token: Optional[bool] = None) -> nnx.Module:
    """A dynamic 2-D linear (int8 / float16 / bfloat16 by ``qconfig.weight``) for a float32
    kernel ``(K, N)`` and bias ``(N,)`` or None, built as ``nnx.Linear`` -> ``Linear.from_float``
    so every dtype rule of the 2-D module applies unchanged."""
    kernel = jnp.asarray(kernel, jnp.float32)
    check_finite(kernel, path)
    k, n = kernel.shape
    dense = nnx.Linear(int(k), int(n), use_bias=bias is not None, rngs=nnx.Rngs(0))
    dense.kernel.set_value(kernel)
    if bias is not None:
        dense.bias.set_value(jnp.asarray(bias, jnp.float32).reshape(n))
    return Linear.from_float(dense, qconfig, path, reduce_range=reduce_range, per_token=per_token)


def is_int8_linear(linear: nnx.Module) -> bool:
    return isinstance(linear, Linear)


def _canonical_tuple(x: Any) -> tuple:
    return tuple(x) if isinstance(x, Sequence) else (x,)


class LinearGeneral(nnx.Module):
    """Dynamically quantized ``nnx.LinearGeneral`` (no ``batch_axis``).

    float ``x`` whose axes ``axis`` have sizes ``in_features`` -> float32 of shape
    ``(remaining axes of x in order..., *out_features)``, as ``nnx.LinearGeneral``. ``linear`` is
    the 2-D dynamic linear ``(prod(in_features), prod(out_features))``.
    """

    def __init__(self, linear: nnx.Module, in_features: tuple[int, ...], out_features: tuple[int, ...],
                 axis: tuple[int, ...], name: str = ""):
        if len(in_features) != len(axis):
            raise ValueError(f"dynamic LinearGeneral '{name}': in_features {in_features} and axis {axis} "
                             "must have the same length")
        self.linear = linear
        self.in_features = tuple(int(d) for d in in_features)
        self.out_features = tuple(int(d) for d in out_features)
        self.axis = tuple(int(a) for a in axis)
        self.name = name

    @classmethod
    def from_float(cls, module: nnx.Module, qconfig: Any, path: str = "", *,
                   reduce_range: bool = True, per_token: Optional[bool] = None) -> "LinearGeneral":
        """From an ``nnx.LinearGeneral`` with ``qconfig.weight()`` (qint8 per tensor / per channel,
        float16 or bfloat16). ``per_token=None`` takes it from the qconfig's activation placeholder."""
        if not isinstance(module, nnx.LinearGeneral):
            raise TypeError(f"'{path}': expected an nnx.LinearGeneral, got {type(module).__name__}")
        if module.batch_axis:
            raise ValueError(
                f"'{path}': nnx.LinearGeneral with batch_axis={dict(module.batch_axis)} is a batched dot "
                "(one kernel per batch index), which the 2-D dynamic linear kernel cannot run; exclude it "
                f"from quantize_dynamic with qconfig_spec={{'{path}': None}}")
        in_f, out_f = _canonical_tuple(module.in_features), _canonical_tuple(module.out_features)
        kernel = jnp.asarray(module.kernel.get_value(), jnp.float32)
        k, n = math.prod(in_f), math.prod(out_f)
        if kernel.shape != (*in_f, *out_f):
            raise ValueError(f"'{path}': kernel shape {kernel.shape} does not match in_features {in_f} and "
                             f"out_features {out_f}")
        bias = None if module.bias is None else jnp.asarray(module.bias.get_value(), jnp.float32).reshape(n)
        linear = matrix_linear(kernel.reshape(k, n), bias, qconfig, path,
                               reduce_range=reduce_range, per_token=per_token)
        return cls(linear, in_f, out_f, _canonical_tuple(module.axis), name=path)

    def __call__(self, x: jax.Array, out_sharding: Any = None) -> jax.Array:
        """float ``x`` -> float32 ``(x without axes self.axis, *out_features)``.

        ``out_sharding`` is accepted for ``nnx.MultiHeadAttention``'s call convention; only None
        is supported."""
        if out_sharding is not None:
            raise NotImplementedError(f"dynamic LinearGeneral '{self.name}': out_sharding is not supported")
        x = jnp.asarray(x)
        if is_int8_linear(self.linear):  # float16/bfloat16 weights keep their (meaningful) gradients
            x = refuse_gradient(x, f"dynamic LinearGeneral '{self.name}'")
        ndim = x.ndim
        axes = tuple(a % ndim if -ndim <= a < ndim else a for a in self.axis)
        if any(not 0 <= a < ndim for a in axes) or len(set(axes)) != len(axes):
            raise ValueError(f"dynamic LinearGeneral '{self.name}': axis {self.axis} invalid for an input of "
                             f"shape {x.shape}")
        got = tuple(x.shape[a] for a in axes)
        if got != self.in_features:
            raise ValueError(f"dynamic LinearGeneral '{self.name}': input axes {self.axis} have sizes {got}, "
                             f"expected {self.in_features}")
        n = len(axes)
        # Contracted axes last, in the kernel's order: a no-op for MultiHeadAttention's layouts.
        x = jnp.moveaxis(x, axes, tuple(range(ndim - n, ndim)))
        lead = x.shape[:ndim - n]
        y = self.linear(x.reshape(*lead, math.prod(self.in_features)))
        return y.reshape(*lead, *self.out_features)

    def __repr__(self) -> str:
        return (f"DynamicLinearGeneral(in_features={self.in_features}, out_features={self.out_features}, "
                f"axis={self.axis}, linear={self.linear!r})")
