"""Float32 building blocks that round exactly like PyTorch's CPU kernels (x86-64 build).

Bit-for-bit parity with PyTorch's observers needs more than the same formula:
- XLA:CPU turns ``a / broadcast(b)`` into ``a * (1/b)``, which is off by an ulp for ~70 % of
  inputs; PyTorch divides. :func:`true_divide` keeps a real division.
- ``torch.linspace`` is compiled with FMA contraction (``start + step * i`` rounded once).
- ``torch.sum`` of float32 uses a cascade of 8-lane vector accumulators; the order of additions
  decides the last bits, and HistogramObserver compares such sums.
- ``torch.cumsum`` of float32 accumulates in double and rounds each prefix once.
- PyTorch's HistogramObserver does its search bookkeeping in Python doubles.
- XLA:CPU contracts ``a + b * c`` inside a fusion into one FMA (one rounding); PyTorch runs
  separate kernels (two roundings). :func:`rounded` pins a product's rounding.
Double precision is emulated with float32 pairs (error-free transformations), exact except in
double-rounding tie cases that need a result within 2**-48 of a float32 rounding boundary.
XLA:CPU does not reassociate float ops (no fast-math), which these rely on.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# PyTorch's CPU capability on the project machines (torch.backends.cpu.get_cpu_capability()).
TORCH_VEC_LANES = 8  # Vectorized<float>::size() in the reduction kernels PyTorch runs here (measured)


def rounded(p: jax.Array) -> jax.Array:
    """``p`` (a product) rounded to float32 before it meets an add, as in a separate kernel.

    Multiplying by an opaque exact 1 (``p * 0 + 1``, which XLA and LLVM cannot fold for floats)
    means any contraction XLA makes is ``fma(p, 1, a) == fl(p + a)``. ``p`` must be finite.
    """
    return p * (p * jnp.float32(0.0) + jnp.float32(1.0))


def true_divide(a: jax.Array, b: jax.Array) -> jax.Array:
    """IEEE float32 ``a / b`` (correctly rounded) even when ``b`` is a scalar broadcast.

    The divisor is made elementwise (``b + a * 0``) so XLA cannot rewrite the division into a
    multiplication by the reciprocal. ``a`` must be finite (``inf * 0`` is NaN).
    """
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    shape = jnp.broadcast_shapes(a.shape, b.shape)
    a = jnp.broadcast_to(a, shape)
    return a / (b + a * jnp.float32(0.0))


def two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``s = fl(a + b)`` and the exact rounding error ``e`` (``a + b == s + e``)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _split(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    c = rounded(jnp.float32(4097.0) * a)  # Veltkamp split into two 12-bit halves
    hi = c - (c - a)
    return hi, a - hi


def two_prod(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``p = fl(a * b)`` and the exact error ``e`` (``a * b == p + e``), Dekker's product."""
    p = rounded(a * b)
    a_hi, a_lo = _split(a)
    b_hi, b_lo = _split(b)
    e = ((a_hi * b_hi - p) + a_hi * b_lo + a_lo * b_hi) + a_lo * b_lo
    return p, e


def fma(a: jax.Array, b: jax.Array, c: jax.Array) -> jax.Array:
    """``fl(a * b + c)`` with one rounding (what a compiler-contracted C++ expression gives)."""
    p, e = two_prod(a, b)
    s, t = two_sum(p, c)
    return s + (t + e)


def fma_u8(q: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
    """``round_f32(q * scale + bias)`` with one rounding, for ``q`` integers in [0, 255].

    ``scale`` is split into two 12-bit halves (Veltkamp), so both partial products with an 8-bit
    ``q`` are exact in float32; ``two_sum`` then carries the rounding error of the first addition.
    """
    c = jnp.float32(4097.0) * scale
    s_hi = c - (c - scale)
    s_lo = scale - s_hi
    p_hi = q * s_hi
    p_lo = q * s_lo
    t = p_hi + bias
    bb = t - p_hi
    err = (p_hi - (t - bb)) + (bias - bb)
    return t + (err + p_lo)


def linspace(start: jax.Array, end: jax.Array, steps: int) -> jax.Array:
    """``torch.linspace(start, end, steps)`` for float32 on CPU, bit for bit.

    PyTorch computes ``step = (end - start) / (steps - 1)`` in float32, then
    ``start + step * i`` for the first half and ``end - step * (steps - i - 1)`` for the rest,
    each contracted into one FMA.
    """
    start = jnp.asarray(start, jnp.float32)
    end = jnp.asarray(end, jnp.float32)
    step = true_divide(end - start, jnp.float32(steps - 1))
    idx = np.arange(steps)
    first = jnp.asarray(idx < steps // 2)
    lo = fma(step, jnp.asarray(idx, jnp.float32), start)
    hi = fma(-step, jnp.asarray(steps - idx - 1, jnp.float32), end)
    return jnp.where(first, lo, hi)


def floor_divide(a: jax.Array, b: jax.Array) -> jax.Array:
    """``torch.div(a, b, rounding_mode="floor")`` for float32 (``div_floor_floating_vec``)."""
    a = jnp.asarray(a, jnp.float32)
    b = jnp.broadcast_to(jnp.asarray(b, jnp.float32), a.shape)
    basic = true_divide(a, b)
    mod = jnp.fmod(a, b)
    floor_ = jnp.where((jnp.abs(basic) == jnp.inf) & (jnp.abs(a) != jnp.inf), a, a - mod)
    div = true_divide(floor_, b)
    div = jnp.where((mod != 0) & ((b < 0) ^ (mod < 0)), div - 1.0, div)
    fd = jnp.floor(div)
    fd = jnp.where(div - fd > 0.5, fd + 1.0, fd)
    fd = jnp.where(div == 0, jnp.copysign(jnp.float32(0.0), basic), fd)
    return jnp.where(b == 0, basic, fd)


def _sequential_rows(rows: jax.Array) -> jax.Array:
    """``((0 + r0) + r1) + ...`` over the leading axis, in order (a scan keeps compile time flat)."""
    def add(acc: jax.Array, row: jax.Array) -> tuple[jax.Array, None]:
        return acc + row, None

    # zeros_like, not zeros: inside shard_map the carry must be as device-varying as the rows
    init = jnp.zeros_like(rows[0]) if rows.shape[0] else jnp.zeros(rows.shape[1:], jnp.float32)
    return jax.lax.scan(add, init, rows)[0]


def _multi_row_sum(rows: jax.Array) -> jax.Array:
    """PyTorch's ``multi_row_sum`` (4-level cascade, level step 16) over axis 0 of ``rows``."""
    size = rows.shape[0]
    level_power = max(4, (int(np.ceil(np.log2(size))) if size > 2 else 1) // 4)
    step = 1 << level_power
    mask = step - 1
    zero = jnp.zeros(rows.shape[1:], jnp.float32)
    acc = [zero, zero, zero, zero]
    i = 0
    while i + step <= size:
        # acc[0] is zero at the start of every block, so the block is a plain sequential sum
        acc[0] = _sequential_rows(rows[i:i + step])
        i += step
        for j in range(1, 4):
            acc[j] = acc[j] + acc[j - 1]
            acc[j - 1] = zero
            if i & (mask << (j * level_power)):
                break
    if i < size:
        acc[0] = _sequential_rows(rows[i:])
    for j in range(1, 4):
        acc[0] = acc[0] + acc[j]
    return acc[0]


def _row_sum(v: jax.Array) -> jax.Array:
    """PyTorch's ``row_sum``: rows of ``v`` (shape ``(size, lanes)``) summed with 4 interleaved
    accumulators through ``multi_row_sum``, the leftover rows into the first, then combined."""
    size, lanes = v.shape
    ilp = 4
    size_ilp = size // ilp
    if size_ilp > 0:
        part = _multi_row_sum(v[: size_ilp * ilp].reshape(size_ilp, ilp, lanes))
        partials = [part[k] for k in range(ilp)]
    else:
        partials = [jnp.zeros((lanes,), jnp.float32) for _ in range(ilp)]
    for i in range(size_ilp * ilp, size):
        partials[0] = partials[0] + v[i]
    acc = partials[0]
    for k in range(1, ilp):
        acc = acc + partials[k]
    return acc


def torch_sum(x: jax.Array) -> jax.Array:
    """``torch.sum`` of a contiguous 1-D float32 tensor (single-threaded, < 32768 elements),
    in PyTorch's cascade order: vectors of ``TORCH_VEC_LANES`` through ``row_sum``, the scalar
    tail, then the lanes one by one (inputs shorter than a vector take the scalar ``row_sum``)."""
    x = jnp.asarray(x, jnp.float32).reshape(-1)
    n = x.shape[0]
    lanes = TORCH_VEC_LANES
    if n < lanes:
        return jnp.float32(0.0) + _row_sum(x.reshape(n, 1))[0]
    nvec = n // lanes
    vec_acc = _row_sum(x[: nvec * lanes].reshape(nvec, lanes))
    total = jnp.float32(0.0)
    for k in range(nvec * lanes, n):
        total = total + x[k]
    for k in range(lanes):
        total = total + vec_acc[k]
    return total


def cumsum_via_double(x: jax.Array) -> jax.Array:
    """``torch.cumsum`` of a 1-D float32 array on CPU: prefix sums accumulated in double, each
    rounded to float32. The double accumulator is emulated by a float32 pair in a scan."""
    x = jnp.asarray(x, jnp.float32).reshape(-1)

    def add(acc: tuple[jax.Array, jax.Array], v: jax.Array) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
        s, e = two_sum(acc[0], v)
        hi, lo = two_sum(s, e + acc[1])
        return (hi, lo), hi

    zero = jnp.zeros_like(x[0]) if x.size else jnp.zeros((), jnp.float32)  # varying like x in shard_map
    return jax.lax.scan(add, (zero, zero), x)[1]


def histc(x: jax.Array, bins: int, lo: jax.Array, hi: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """``torch.histc(x, bins, min=lo, max=hi)`` for float32 on CPU: :func:`histc_counts` as float32."""
    return histc_counts(x, bins, lo, hi, valid).astype(jnp.float32)


def histc_counts(x: jax.Array, bins: int, lo: jax.Array, hi: jax.Array,
                 valid: jax.Array | None = None) -> jax.Array:
    """The bin counts of ``torch.histc(x, bins, min=lo, max=hi)`` (linear-interpolation binning), int32.

    Args:
      x: float32 array, any shape; entries where ``valid`` is False (and NaN) are not counted.
      bins: number of bins (static).
      lo, hi: float32 scalars; when equal the range is widened to ``[lo - 1, hi + 1]`` as PyTorch does.
    Returns:
      int32 ``(bins,)`` counts, exact (up to 2**31 - 1 values per call).
    """
    x = jnp.asarray(x, jnp.float32).reshape(-1)
    if x.size >= 2 ** 31:
        raise ValueError(f"histc: {x.size} values in one call overflow the int32 bin counts; "
                         "observe the batch in chunks of fewer than 2**31 values")
    same = lo == hi
    left = jnp.where(same, lo - 1.0, lo)
    right = jnp.where(same, hi + 1.0, hi)
    inside = (x >= left) & (x <= right)
    if valid is not None:
        inside = inside & valid.reshape(-1)
    xs = jnp.where(inside, x, left)
    pos = true_divide((xs - left) * jnp.float32(bins), right - left)
    pos = jnp.clip(pos.astype(jnp.int32), 0, bins - 1)  # truncation; the right edge goes to the last bin
    # With x sharded over an Explicit-axis mesh (jax.make_mesh) the scatter's output sharding is
    # ambiguous; the counts are wanted replicated (XLA adds the cross-device sum). Other meshes and
    # no mesh need nothing, and there a PartitionSpec would be an error.
    mesh = getattr(jax.typeof(x).sharding, "mesh", None)
    explicit = {"out_sharding": jax.sharding.PartitionSpec()} if getattr(mesh, "explicit_axes", ()) else {}
    # Counted in int32, exactly: a float32 scatter-add of ones stops at 2**24 per bin (x + 1 == x),
    # which one post-ReLU calibration batch can reach in its zero bin.
    return jnp.zeros((bins,), jnp.int32).at[pos].add(inside.astype(jnp.int32), **explicit)
