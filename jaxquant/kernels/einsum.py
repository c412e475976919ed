"""Static int8 two-operand einsum ``input,kernel->output`` with an int8 kernel.

The contraction is an exact int32 einsum of ``(x_q - zx)`` and ``(w_q - zw)``, requantized with
fbgemm's output pipeline. Per-channel weights need the kernel's last label to be the output's last
label, so the per-channel multiplier lines up with the output's last axis.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from jaxquant.dtypes import QDType
from jaxquant.kernels.requantize import output_multiplier, requantize
from jaxquant.qtensor import QTensor

__all__ = ["PackedEinsum", "pack_einsum", "quantized_einsum"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedEinsum:
    """``w_centered``: int32 kernel minus its zero point (zero points along the last axis);
    ``w_scale``: float32 ``()`` or ``(C,)``; ``bias``: float32 already shaped to broadcast against the
    output, or None; ``equation`` (static): ``"input,kernel->output"`` without spaces."""

    w_centered: jax.Array
    w_scale: jax.Array
    bias: Optional[jax.Array]
    equation: str = dataclasses.field(metadata={"static": True})


def pack_einsum(equation: str, w_int8: jax.Array, w_scale: jax.Array, w_zero_point: jax.Array,
                bias: Optional[jax.Array] = None) -> PackedEinsum:
    """Pack an int8 einsum kernel once.

    Args:
      equation: explicit two-operand ``"input,kernel->output"``.
      w_int8: int8 kernel, any rank; w_scale / w_zero_point: float32 / int32 ``()`` or ``(C,)`` along
        the kernel's last axis (which must then be the output's last label).
      bias: float32 in the shape that broadcasts against the output, or None.
    """
    eq = equation.replace(" ", "")
    if "->" not in eq or eq.count(",") != 1:
        raise ValueError(f"pack_einsum: expected an explicit two-operand 'input,kernel->output' equation, "
                         f"got {equation!r}")
    return PackedEinsum(w_centered=jnp.asarray(w_int8).astype(jnp.int32) - w_zero_point,
                        w_scale=jnp.asarray(w_scale, jnp.float32),
                        bias=None if bias is None else jnp.asarray(bias, jnp.float32), equation=eq)


def quantized_einsum(x: QTensor, packed: PackedEinsum, out_scale: jax.Array, out_zero_point: jax.Array, *,
                     out_dtype: QDType, relu: bool = False) -> QTensor:
    """Static int8 einsum: per-tensor QTensor ``x`` (uint8/int8) -> QTensor of ``out_dtype`` with the
    shape ``jnp.einsum(equation, x, kernel)`` gives, requantized to ``(out_scale, out_zero_point)``."""
    if x.axis is not None:
        raise ValueError("quantized_einsum: activations must be quantized per tensor, got a per-channel QTensor")
    x32 = x.int_data.astype(jnp.int32) - x.q_zero_point()
    acc = jnp.einsum(packed.equation, x32, packed.w_centered, preferred_element_type=jnp.int32)
    act_times_w, multiplier = output_multiplier(x.q_scale(), packed.w_scale, out_scale)
    y = requantize(acc, multiplier, out_zero_point,
                   bias_over_scale=None if packed.bias is None else packed.bias / act_times_w,
                   relu=relu, out_dtype=out_dtype.storage)
    return QTensor(y, out_scale, out_zero_point, out_dtype)
