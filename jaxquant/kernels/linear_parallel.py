"""Tensor-parallel int8 linear: :func:`~jaxquant.kernels.linear.quantized_linear` with its weight split
over a mesh axis, bit-identical to one device.

* Column parallel (output features split): each device holds ``N / n`` columns of the int8 weight
  with their scales, zero points and bias and runs the same float32 epilogue on its columns.
* Row parallel (input features, the contraction, split): each device's int32 partial accumulator
  (zero-point terms included: they are linear in the split) is summed with ``psum``, exact in
  integers, and the epilogue runs on the full sum.

``jaxquant.distributed.column_parallel_linear`` / ``row_parallel_linear`` call these with a
converted ``jaxquant.nn.quantized.Linear``'s parts.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Hashable, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxquant.dtypes import QDType
from jaxquant.kernels.linear import pack_linear, quantized_linear
from jaxquant.qtensor import QTensor

__all__ = ["column_parallel_quantized_linear", "row_parallel_quantized_linear"]


def _check_divisible(size: int, mesh: Mesh, axis_name: Hashable, what: str) -> None:
    n = mesh.shape[axis_name]
    if size % n:
        raise ValueError(f"{what} ({size}) is not divisible by the {n} devices of mesh axis {axis_name!r}")


def _placed(mesh: Mesh, specs: tuple, args: tuple) -> tuple:
    # shard_map wants its inputs already laid out as in_specs say; device_put is a no-op for arrays
    # that are (shard_qtensor), and a sharding constraint under jit
    def put(spec: Any, arg: Any) -> Any:
        if arg is None:
            return None
        return jax.tree.map(lambda s, a: jax.device_put(a, NamedSharding(mesh, s)), spec, arg,
                            is_leaf=lambda v: isinstance(v, P))

    return tuple(put(s, a) for s, a in zip(specs, args))


def _parallel(x: QTensor, w: QTensor, bias: Optional[jax.Array], out_scale: jax.Array, out_zero_point: jax.Array,
              mesh: Mesh, axis_name: Hashable, *, out_dtype: QDType, relu: bool, name: str, rows: bool) -> QTensor:
    k, n = w.shape
    what = "row_parallel_quantized_linear" if rows else "column_parallel_quantized_linear"
    _check_divisible(k if rows else n, mesh, axis_name, f"{'in' if rows else 'out'}_features of {name}")
    if x.shape[-1] != k:
        raise ValueError(f"{what}: input has {x.shape[-1]} features, '{name}' expects {k}")
    w_scale, w_zp = (jnp.broadcast_to(a, (n,)) for a in w.channel_qparams())
    lead = x.shape[:-1]
    x2 = QTensor(x.int_data.reshape(-1, k), x.scale, x.zero_point, x.dtype, x.qscheme, None)
    if rows:
        # the spec tree must carry x2's static metadata (its block size) to match it
        x_spec = dataclasses.replace(x2, int_data=P(None, axis_name), scale=P(), zero_point=P())
        in_specs = (x_spec, P(axis_name, None), P(), P(), None if bias is None else P(), P(), P())
        out_spec = P()
        # the int32 partial accumulators (zero-point terms included) are summed before the epilogue
        reduce = lambda acc: lax.psum(acc, axis_name)  # noqa: E731
    else:
        col = P(axis_name)
        in_specs = (P(), P(None, axis_name), col, col, None if bias is None else col, P(), P())
        out_spec, reduce = P(None, axis_name), None

    def body(x2: QTensor, w_data, w_scale, w_zp, bias, out_scale, out_zp):
        return quantized_linear(x2, pack_linear(w_data, w_scale, w_zp, bias), out_scale, out_zp,
                                out_dtype=out_dtype, relu=relu, reduce_accumulator=reduce).int_data

    args = _placed(mesh, in_specs, (x2, w.int_data, w_scale, w_zp, bias, out_scale, out_zero_point))
    y = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_spec)(*args)
    return QTensor(y.reshape(*lead, n), out_scale, out_zero_point, out_dtype)


def column_parallel_quantized_linear(x: QTensor, w: QTensor, bias: Optional[jax.Array], out_scale: jax.Array,
                                     out_zero_point: jax.Array, mesh: Mesh, axis_name: Hashable, *,
                                     out_dtype: QDType, relu: bool = False, name: str = "Linear") -> QTensor:
    """``quantized_linear`` with the output features split over mesh axis ``axis_name``.

    Args:
      x: per-tensor QTensor ``(..., K)`` (uint8 or int8), replicated.
      w: int8 weight QTensor ``(K, N)``, per tensor or per output channel; ``N`` divisible by the axis size.
      bias: float32 ``(N,)`` or None. out_scale, out_zero_point: the output's qparams (``()``).
      out_dtype, relu: as :func:`~jaxquant.kernels.linear.quantized_linear`; ``name`` names the layer in errors.
    Returns:
      QTensor ``(..., N)`` of ``out_dtype``, data sharded as ``P(..., axis_name)``.
    """
    return _parallel(x, w, bias, out_scale, out_zero_point, mesh, axis_name, out_dtype=out_dtype, relu=relu,
                     name=name, rows=False)


def row_parallel_quantized_linear(x: QTensor, w: QTensor, bias: Optional[jax.Array], out_scale: jax.Array,
                                  out_zero_point: jax.Array, mesh: Mesh, axis_name: Hashable, *,
                                  out_dtype: QDType, relu: bool = False, name: str = "Linear") -> QTensor:
    """``quantized_linear`` with the input features (the contraction) split over ``axis_name``: int32
    partial accumulators summed with ``psum`` (exact) before the epilogue. Arguments as
    :func:`column_parallel_quantized_linear`; ``x``'s last axis may already be sharded over
    ``axis_name``, ``K`` must be divisible by the axis size. Returns a replicated QTensor ``(..., N)``."""
    return _parallel(x, w, bias, out_scale, out_zero_point, mesh, axis_name, out_dtype=out_dtype, relu=relu,
                     name=name, rows=True)
