"""uint8 x int8 -> int32 dot as a JAX primitive.

``lax.dot_general`` cannot express a dot whose operands have different integer
dtypes: JAX promotes both to int32, and XLA:CPU then runs a slow int32 GEMM.
XLA itself accepts ``stablehlo.dot_general(ui8, i8) -> i32`` and hands it to
YNNPACK's VNNI (``vpdpbusd``) kernel, which is the fastest integer path on x86.
This module adds a tiny primitive that emits exactly that op on CPU and an
upcast-to-int32 ``dot_general`` on every other backend.

XLA's constraints (see PERF_NOTES): the uint8 operand must be the LHS; a dot
whose LHS or RHS free size is 1 never reaches YNNPACK (the public wrapper pads
it to 2); a transpose right after the dot can make the simplifier swap the
operands, which fails to compile, so callers that transpose the result should
put ``lax.optimization_barrier`` in between (``matmul_u8s8(..., transpose_out=True)``
does it).
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax._src import dispatch
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir
from jax._src.lib.mlir.dialects import hlo

__all__ = ["dot_general_u8s8", "dot_general_u8s8_p", "matmul_u8s8"]

DimensionNumbers = tuple[tuple[tuple[int, ...], tuple[int, ...]], tuple[tuple[int, ...], tuple[int, ...]]]

dot_general_u8s8_p = Primitive("dot_general_u8s8")


def _canonical_dnums(dimension_numbers) -> DimensionNumbers:
    (lc, rc), (lb, rb) = dimension_numbers
    return ((tuple(int(d) for d in lc), tuple(int(d) for d in rc)),
            (tuple(int(d) for d in lb), tuple(int(d) for d in rb)))


def _free_dims(ndim: int, contracting: Sequence[int], batch: Sequence[int]) -> list[int]:
    return [d for d in range(ndim) if d not in contracting and d not in batch]


def _out_shape(lhs_shape, rhs_shape, dnums: DimensionNumbers) -> tuple[int, ...]:
    (lc, rc), (lb, rb) = dnums
    return (tuple(lhs_shape[d] for d in lb)
            + tuple(lhs_shape[d] for d in _free_dims(len(lhs_shape), lc, lb))
            + tuple(rhs_shape[d] for d in _free_dims(len(rhs_shape), rc, rb)))


def _abstract_eval(lhs, rhs, *, dimension_numbers):
    if lhs.dtype != jnp.uint8 or rhs.dtype != jnp.int8:
        raise TypeError(
            f"dot_general_u8s8 needs lhs uint8 and rhs int8, got lhs {lhs.dtype} and "
            f"rhs {rhs.dtype}; shift an int8 lhs to uint8 with `x ^ 0x80` (zero point + 128).")
    (lc, rc), (lb, rb) = dimension_numbers
    for a, b in zip(lc, rc):
        if lhs.shape[a] != rhs.shape[b]:
            raise TypeError(f"dot_general_u8s8: contracting sizes differ: lhs dim {a} = "
                            f"{lhs.shape[a]}, rhs dim {b} = {rhs.shape[b]}")
    for a, b in zip(lb, rb):
        if lhs.shape[a] != rhs.shape[b]:
            raise TypeError(f"dot_general_u8s8: batch sizes differ: lhs dim {a} = "
                            f"{lhs.shape[a]}, rhs dim {b} = {rhs.shape[b]}")
    return jax.core.ShapedArray(_out_shape(lhs.shape, rhs.shape, dimension_numbers), jnp.int32)


def _reference_impl(lhs, rhs, *, dimension_numbers):
    # Exact for any size: products fit in 16 bits, int32 sums overflow only past K ~ 2**17.
    return lax.dot_general(lhs.astype(jnp.int32), rhs.astype(jnp.int32), dimension_numbers,
                           preferred_element_type=jnp.int32)


def _cpu_lowering(ctx, lhs, rhs, *, dimension_numbers):
    (lc, rc), (lb, rb) = dimension_numbers
    dnums = hlo.DotDimensionNumbers.get(
        lhs_batching_dimensions=list(lb), rhs_batching_dimensions=list(rb),
        lhs_contracting_dimensions=list(lc), rhs_contracting_dimensions=list(rc))
    aval_out, = ctx.avals_out
    return [hlo.dot_general(mlir.aval_to_ir_type(ctx.module_context, aval_out), lhs, rhs, dnums)]


def _batch_rule(args, dims, *, dimension_numbers):
    lhs, rhs = args
    lbd, rbd = dims
    (lc, rc), (lb, rb) = dimension_numbers
    shift = lambda ds: tuple(d + 1 for d in ds)
    if lbd is not None and rbd is not None:
        lhs = jnp.moveaxis(lhs, lbd, 0)
        rhs = jnp.moveaxis(rhs, rbd, 0)
        dn = ((shift(lc), shift(rc)), ((0,) + shift(lb), (0,) + shift(rb)))
        return dot_general_u8s8_p.bind(lhs, rhs, dimension_numbers=dn), 0
    if lbd is not None:
        # The mapped axis becomes lhs's first free dimension.
        lhs = jnp.moveaxis(lhs, lbd, 0)
        dn = ((shift(lc), rc), (shift(lb), rb))
        return dot_general_u8s8_p.bind(lhs, rhs, dimension_numbers=dn), len(lb)
    rhs = jnp.moveaxis(rhs, rbd, 0)
    dn = ((lc, shift(rc)), (lb, shift(rb)))
    n_lhs_free = lhs.ndim - len(lc) - len(lb)
    return dot_general_u8s8_p.bind(lhs, rhs, dimension_numbers=dn), len(lb) + n_lhs_free


dot_general_u8s8_p.def_impl(partial(dispatch.apply_primitive, dot_general_u8s8_p))
dot_general_u8s8_p.def_abstract_eval(_abstract_eval)
batching.primitive_batchers[dot_general_u8s8_p] = _batch_rule
mlir.register_lowering(dot_general_u8s8_p, mlir.lower_fun(_reference_impl, multiple_results=False))
mlir.register_lowering(dot_general_u8s8_p, _cpu_lowering, platform="cpu")


def _is_one(sizes) -> bool:
    """Whether the free sizes multiply to exactly 1; a symbolic size (jax.export) is never known to be 1."""
    if not all(isinstance(d, (int, np.integer)) for d in sizes):
        return False
    return int(np.prod(sizes, dtype=np.int64)) == 1


def _pad_free_to_two(x: jax.Array, contracting, batch):
    """Make x's free size 2 by padding (or inserting) a free dim.

    Returns (x, contracting, batch, out_axis_among_free) where out_axis_among_free is the
    index, among x's free dims, of the padded dim (the result must be sliced there).
    """
    free = _free_dims(x.ndim, contracting, batch)
    if free:
        d = free[0]
        pad = [(0, 0)] * x.ndim
        pad[d] = (0, 1)
        return jnp.pad(x, pad), contracting, batch, 0
    x = x[None]
    return x, tuple(c + 1 for c in contracting), tuple(b + 1 for b in batch), 0


def dot_general_u8s8(lhs_u8: jax.Array, rhs_s8: jax.Array, dimension_numbers) -> jax.Array:
    """uint8 x int8 dot with int32 accumulation, semantics of ``lax.dot_general``.

    Args:
      lhs_u8: uint8 array.
      rhs_s8: int8 array.
      dimension_numbers: ``((lhs_contracting, rhs_contracting), (lhs_batch, rhs_batch))``
        exactly as for ``lax.dot_general``.

    Returns:
      int32 array of shape ``batch + lhs_free + rhs_free``; exact (no overflow while the
      contracting size is below 2**17 = 131072).

    A side whose free size is 1 is padded to 2 (XLA:CPU would otherwise run its slow
    int32 GEMV instead of YNNPACK's VNNI kernel).
    """
    lhs_u8 = jnp.asarray(lhs_u8)
    rhs_s8 = jnp.asarray(rhs_s8)
    (lc, rc), (lb, rb) = _canonical_dnums(dimension_numbers)
    nb = len(lb)
    n_lhs_free0 = len(_free_dims(lhs_u8.ndim, lc, lb))
    slices = []
    if _is_one([lhs_u8.shape[d] for d in _free_dims(lhs_u8.ndim, lc, lb)]):
        had_free = n_lhs_free0 > 0
        lhs_u8, lc, lb, _ = _pad_free_to_two(lhs_u8, lc, lb)
        slices.append(("lhs", had_free))
    n_lhs_free = len(_free_dims(lhs_u8.ndim, lc, lb))
    n_rhs_free0 = len(_free_dims(rhs_s8.ndim, rc, rb))
    if _is_one([rhs_s8.shape[d] for d in _free_dims(rhs_s8.ndim, rc, rb)]):
        had_free = n_rhs_free0 > 0
        rhs_s8, rc, rb, _ = _pad_free_to_two(rhs_s8, rc, rb)
        slices.append(("rhs", had_free))
    out = dot_general_u8s8_p.bind(lhs_u8, rhs_s8, dimension_numbers=((lc, rc), (lb, rb)))
    for side, had_free in reversed(slices):  # rhs axis first: it lies after lhs axes
        axis = nb if side == "lhs" else nb + n_lhs_free
        out = lax.slice_in_dim(out, 0, 1, axis=axis)
        if not had_free:
            out = lax.squeeze(out, (axis,))
    return out


def matmul_u8s8(a_u8: jax.Array, b_s8: jax.Array, *, transpose_out: bool = False) -> jax.Array:
    """(M, K) uint8 @ (K, N) int8 -> (M, N) int32, or (N, M) if ``transpose_out``.

    ``transpose_out`` puts an ``optimization_barrier`` before the transpose so XLA's
    simplifier cannot fold the transpose into the dot by swapping its operands (which
    would put the int8 operand on the LHS and fail to compile).
    """
    out = dot_general_u8s8(a_u8, b_s8, (((1,), (0,)), ((), ())))
    if transpose_out:
        out = lax.optimization_barrier(out).T
    return out
