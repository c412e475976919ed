"""Float and int8 forward passes of ``nn.Dense``, ``nn.DenseGeneral`` and ``nn.Einsum``.

Each ``*Layer`` object says, for one Linen layer type, how to compute the layer's float output from a
(possibly fake-quantized) kernel, how to put the kernel in the stored layout (output channels last),
and how to run the int8 kernels of :mod:`jaxquant.kernels` on a quantized input. The int8 dot is
``jaxquant.kernels.linear`` (u8 x s8 -> s32, fbgemm's requantization), exactly what
:class:`jaxquant.nn.quantized.Linear` and :class:`jaxquant.nn.dynamic.Linear` run.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from jax import lax

from jaxquant.dtypes import QDType
from jaxquant.kernels.einsum import pack_einsum, quantized_einsum
from jaxquant.kernels.linear import PackedLinear, pack_linear, quantized_linear, quantized_linear_dynamic
from jaxquant.native import ops as native_ops
from jaxquant.qtensor import QTensor


def _packed(qp: dict) -> PackedLinear:
    # Packed inside the traced apply: the (K, N) weight is contracted as stored, because a transpose
    # here would be folded into the dot by XLA, which then upcasts both operands to s32.
    return pack_linear(qp["weight_int"], qp["weight_scale"], qp["weight_zero_point"], qp.get("bias"),
                       layouts="act_lhs", act_lhs_kn=True, w_native=qp.get("native_gemv"))


def _pack_native_gemv(qp: dict) -> dict:
    """``{"native_gemv": weight}`` in the native GEMV's layout (``convert`` runs it on the concrete
    int8 weight), or ``{}`` when the backend is off or the layer is stacked by ``nn.scan``."""
    w = qp["weight_int"]
    packed = native_ops.pack_gemv_weight(w) if w.ndim == 2 else None
    return {} if packed is None else {"native_gemv": packed}


class DenseLayer:
    """``nn.Dense``: kernel ``(K, N)``, bias ``(N,)``."""

    kernel_name = "kernel"
    supports_dynamic = True

    def float_apply(self, module: Any, x: jax.Array, kernel: jax.Array, bias: Optional[jax.Array]) -> jax.Array:
        y = lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=module.precision)
        return y if bias is None else y + bias

    def stored_kernel(self, module: Any, kernel: jax.Array) -> jax.Array:
        return kernel

    def native_packer(self, module: Any) -> Callable[[dict], dict]:
        return _pack_native_gemv

    def int8_apply(self, module: Any, path: str, xq: QTensor, qp: dict, out_dtype: QDType) -> QTensor:
        return quantized_linear(xq, _packed(qp), qp["output_scale"], qp["output_zero_point"], out_dtype=out_dtype)

    def dynamic_apply(self, module: Any, path: str, x: jax.Array, qp: dict, *, reduce_range: bool,
                      per_token: bool) -> jax.Array:
        return quantized_linear_dynamic(x, _packed(qp), reduce_range=reduce_range, per_token=per_token)


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

    def int8_apply(self, module: Any, path: str, xq: QTensor, qp: dict, out_dtype: QDType) -> QTensor:
        data, lead = self._flatten(module, xq.int_data, path)
        xq2 = QTensor(data, xq.scale, xq.zero_point, xq.dtype)
        y = super().int8_apply(module, path, xq2, _flat_bias(qp), out_dtype)
        return QTensor(y.int_data.reshape(*lead, *self._features(module)), y.scale, y.zero_point, y.dtype)

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

    def int8_apply(self, module: Any, path: str, xq: QTensor, qp: dict, out_dtype: QDType) -> QTensor:
        x_spec, w_spec, out = _einsum_parts(module, path)
        equation = f"{x_spec},{w_spec}->{out}"
        bias = qp.get("bias")
        if bias is not None:
            _, broadcast_shape = module._get_bias_shape(equation, jnp.zeros(xq.shape, jnp.float32), qp["weight_int"])
            bias = jnp.reshape(bias, broadcast_shape)
        packed = pack_einsum(equation, qp["weight_int"], qp["weight_scale"], qp["weight_zero_point"], bias)
        return quantized_einsum(xq, packed, qp["output_scale"], qp["output_zero_point"], out_dtype=out_dtype)
