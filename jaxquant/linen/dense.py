"""Float and int8 forward passes of ``nn.Dense``, ``nn.DenseGeneral`` and ``nn.Einsum``.

Each ``*Layer`` object says, for one Linen layer type, how to compute the layer's float output from a
(possibly fake-quantized) kernel, how to put the kernel in the stored layout (output channels last),
and how to run the int8 kernels of :mod:`jaxquant.kernels` on a quantized input. The int8 dot is
``jaxquant.kernels.linear`` (u8 x s8 -> s32, fbgemm's requantization), exactly what
:class:`jaxquant.nn.quantized.Linear` and :class:`jaxquant.nn.dynamic.Linear` run.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax import lax

from jaxquant.kernels.linear import (dynamic_linear, int8_matmul_acc, pack_weight, prepack_dynamic_linear,
                                     to_uint8_activation)
from jaxquant.kernels.requantize import output_multiplier, requantize
from jaxquant.qtensor import QTensor


def int8_linear(xq: QTensor, w_int8: jax.Array, w_scale: jax.Array, w_zero_point: jax.Array,
                bias: Optional[jax.Array], out_scale: jax.Array, out_zero_point: jax.Array, out_storage) -> jax.Array:
    """Static int8 linear: per-tensor QTensor ``(..., K)`` (uint8/int8) and int8 ``(K, N)`` -> ``(..., N)``
    of ``out_storage``; the arithmetic of :class:`jaxquant.nn.quantized.Linear`."""
    k, n = w_int8.shape
    if xq.shape[-1] != k:
        raise ValueError(f"input has {xq.shape[-1]} features, the int8 weight expects {k}")
    lead = xq.shape[:-1]
    x_u8, zx = to_uint8_activation(xq.int_data.reshape(-1, k), xq.zero_point)
    acc = int8_matmul_acc(x_u8, zx, pack_weight(w_int8, w_zero_point, "act_lhs"))
    act_times_w, multiplier = output_multiplier(xq.scale, w_scale, out_scale)
    y = requantize(acc, multiplier, out_zero_point,
                   bias_over_scale=None if bias is None else bias / act_times_w, out_dtype=out_storage)
    return y.reshape(*lead, n)


def dynamic_int8_linear(x: jax.Array, w_int8: jax.Array, w_scale: jax.Array, w_zero_point: jax.Array,
                        bias: Optional[jax.Array], *, reduce_range: bool, per_token: bool,
                        x_min_max: Optional[tuple] = None) -> jax.Array:
    """float ``(..., K)`` -> float32 ``(..., N)``: :func:`jaxquant.kernels.linear.dynamic_linear`."""
    params = prepack_dynamic_linear(w_int8, w_scale, w_zero_point, bias, layouts="act_lhs")
    return dynamic_linear(jnp.asarray(x, jnp.float32), params, reduce_range=reduce_range, per_token=per_token,
                          x_min_max=x_min_max)


class DenseLayer:
    """``nn.Dense``: kernel ``(K, N)``, bias ``(N,)``."""

    kernel_name = "kernel"
    supports_dynamic = True

    def float_apply(self, module: Any, x: jax.Array, kernel: jax.Array, bias: Optional[jax.Array]) -> jax.Array:
        y = lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=module.precision)
        return y if bias is None else y + bias

    def stored_kernel(self, module: Any, kernel: jax.Array) -> jax.Array:
        return kernel

    def flat_input(self, module: Any, x: jax.Array, k: int):
        return x, None

    def int8_apply(self, module: Any, path: str, xq: QTensor, qp: dict, out_storage) -> jax.Array:
        return int8_linear(xq, qp["weight_int"], qp["weight_scale"], qp["weight_zero_point"], qp.get("bias"),
                           qp["output_scale"], qp["output_zero_point"], out_storage)

    def dynamic_apply(self, module: Any, path: str, x: jax.Array, qp: dict, *, reduce_range: bool,
                      per_token: bool, x_min_max: Optional[tuple] = None) -> jax.Array:
        return dynamic_int8_linear(x, qp["weight_int"], qp["weight_scale"], qp["weight_zero_point"], qp.get("bias"),
                                   reduce_range=reduce_range, per_token=per_token, x_min_max=x_min_max)


def _dense_general_axes(module: Any, x_ndim: int, path: str) -> tuple[int, ...]:
    if tuple(module.batch_dims):
        raise ValueError(f"'{path}': nn.DenseGeneral with batch_dims={module.batch_dims} has no int8 kernel; keep it "
                         "float (set its qconfig to None)")
    axis = module.axis if isinstance(module.axis, (tuple, list)) else (module.axis,)
    return tuple(a % x_ndim for a in axis)


class DenseGeneralLayer(DenseLayer):
    """``nn.DenseGeneral`` (no ``batch_dims``): contracted axes moved last and flattened to ``K``, the
    kernel ``(*in_dims, *features)`` stored as ``(K, N)`` with ``N = prod(features)``."""

    def _features(self, module: Any) -> tuple[int, ...]:
        return tuple(module.features) if isinstance(module.features, (tuple, list)) else (module.features,)

    def stored_kernel(self, module: Any, kernel: jax.Array) -> jax.Array:
        n = 1
        for f in self._features(module):
            n *= f
        return kernel.reshape(-1, n)

    def _flatten(self, module: Any, x: jax.Array, path: str) -> tuple[jax.Array, tuple[int, ...]]:
        axes = _dense_general_axes(module, x.ndim, path)
        x = jnp.moveaxis(x, axes, tuple(range(x.ndim - len(axes), x.ndim)))
        lead = x.shape[:x.ndim - len(axes)]
        return x.reshape(*lead, -1), lead

    def float_apply(self, module: Any, x: jax.Array, kernel: jax.Array, bias: Optional[jax.Array]) -> jax.Array:
        x2, lead = self._flatten(module, x, "")
        y = lax.dot_general(x2, self.stored_kernel(module, kernel), (((x2.ndim - 1,), (0,)), ((), ())),
                            precision=module.precision)
        if bias is not None:
            y = y + bias.reshape(-1)
        return y.reshape(*lead, *self._features(module))

    def int8_apply(self, module: Any, path: str, xq: QTensor, qp: dict, out_storage) -> jax.Array:
        data, lead = self._flatten(module, xq.int_data, path)
        xq2 = QTensor(data, xq.scale, xq.zero_point, xq.dtype)
        y = super().int8_apply(module, path, xq2, _flat_bias(qp), out_storage)
        return y.reshape(*lead, *self._features(module))

    def dynamic_apply(self, module: Any, path: str, x: jax.Array, qp: dict, *, reduce_range: bool,
                      per_token: bool) -> jax.Array:
        x2, lead = self._flatten(module, x, path)
        y = super().dynamic_apply(module, path, x2, _flat_bias(qp), reduce_range=reduce_range, per_token=per_token)
        return y.reshape(*lead, *self._features(module))


def _flat_bias(qp: dict) -> dict:
    if qp.get("bias") is None:
        return qp
    return {**qp, "bias": qp["bias"].reshape(-1)}


def _einsum_parts(module: Any, path: str) -> tuple[str, str, str]:
    eq = (module.einsum_str or "").replace(" ", "")
    if "->" not in eq or eq.count(",") != 1:
        raise ValueError(f"'{path}': nn.Einsum needs an explicit two-operand einsum_str set on the module "
                         f"(a call-time einsum_str is not supported for quantization), got {module.einsum_str!r}")
    lhs, out = eq.split("->")
    x_spec, w_spec = lhs.split(",")
    return x_spec, w_spec, out


class EinsumLayer:
    """``nn.Einsum`` with the equation set on the module. The int8 contraction is an int32 einsum of
    ``(x_q - zx)`` and ``(w_q - zw)`` (exact); per-channel weights need the kernel's last index to be the
    output's last index, so the per-channel multiplier lines up with the output."""

    kernel_name = "kernel"
    supports_dynamic = False

    def float_apply(self, module: Any, x: jax.Array, kernel: jax.Array, bias: Optional[jax.Array]) -> jax.Array:
        y = jnp.einsum(module.einsum_str, x, kernel, precision=module.precision)
        if bias is not None:
            _, broadcast_shape = module._get_bias_shape(module.einsum_str.replace(" ", ""), x, kernel)
            y = y + jnp.reshape(bias, broadcast_shape)
        return y

    def stored_kernel(self, module: Any, kernel: jax.Array) -> jax.Array:
        return kernel

    def check_weight_scheme(self, module: Any, path: str, per_channel: bool) -> None:
        _, w_spec, out = _einsum_parts(module, path)
        if per_channel and (not out or w_spec[-1] != out[-1]):
            raise ValueError(f"'{path}': per-channel int8 weights for nn.Einsum('{module.einsum_str}') need the kernel's "
                             f"last index to be the output's last index; use a per-tensor weight qconfig "
                             f"(e.g. jaxquant.default_qconfig) for this module")

    def int8_apply(self, module: Any, path: str, xq: QTensor, qp: dict, out_storage) -> jax.Array:
        x_spec, w_spec, out = _einsum_parts(module, path)
        x32 = xq.int_data.astype(jnp.int32) - xq.zero_point
        w32 = qp["weight_int"].astype(jnp.int32) - qp["weight_zero_point"]
        acc = jnp.einsum(f"{x_spec},{w_spec}->{out}", x32, w32, preferred_element_type=jnp.int32)
        act_times_w, multiplier = output_multiplier(xq.scale, qp["weight_scale"], qp["output_scale"])
        bias_over_scale = None
        if qp.get("bias") is not None:
            dummy_x = jnp.zeros(xq.shape, jnp.float32)
            _, broadcast_shape = module._get_bias_shape(f"{x_spec},{w_spec}->{out}", dummy_x, qp["weight_int"])
            bias_over_scale = jnp.reshape(qp["bias"], broadcast_shape) / act_times_w
        return requantize(acc, multiplier, qp["output_zero_point"], bias_over_scale=bias_over_scale,
                          out_dtype=out_storage)
