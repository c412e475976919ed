"""The native weight-only GEMV (jaxquant/native/csrc/weight_only_gemv.cc) against a float64 numpy reference
worked from the stored codes, and its dispatch from ``weight_only_matmul``."""
import ctypes
import re

import numpy as np
import pytest
import jax
import jax.numpy as jnp

import jaxquant as jq
from jaxquant.native import _lib
from jaxquant.native.weight_only_ops import weight_only_gemv, weight_only_gemv_supported
from jaxquant.weight_only import WeightOnlyLinear, quantize_blockwise
from jaxquant.weight_only.matmul import int8_activation_matmul, weight_only_matmul

pytestmark = pytest.mark.skipif(not weight_only_gemv_supported(1),
                                reason="native weight-only GEMV unavailable (extension not built or no AVX-512)")


def _np_reference(x, q):
    """float64 ``x @ W`` from the raw codes: unpack nibbles (row r low, row r + ceil(N/2) high), then
    ``scale[n, g] * (code - zero_point[n, g])`` per group."""
    data = np.asarray(q.data).astype(np.int64)
    n, gs = q.out_features, q.group_size
    codes = np.concatenate([data & 15, data >> 4])[:n] if q.bits == 4 else data
    g = np.arange(codes.shape[1]) // gs
    w = (codes - np.asarray(q.zero_point)[:, g]) * np.asarray(q.scale, np.float64)[:, g]  # (N, Kp)
    return x.astype(np.float64) @ w[:, :x.shape[1]].T


def _call(x, q):
    f = jax.jit(lambda x, d, s, z: weight_only_gemv(x, d, s, z, bits=q.bits, group_size=q.group_size,
                                                    out_features=q.out_features))
    return np.asarray(f(jnp.asarray(x), q.data, q.scale, q.zero_point))


# K = 200 is not a multiple of 16; with groups of 64 / 128 its last group is ragged (8 / 72 inputs);
# N = 37 is odd, so int4's last high nibble is padding.
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("gs", [None, 32, 64, 128])
def test_gemv_matches_numpy_reference(bits, sym, gs):
    rng = np.random.default_rng(bits * 10 + (gs or 0) + sym)
    k, n = 200, 37
    w = rng.standard_normal((k, n)).astype(np.float32)
    q = quantize_blockwise(jnp.asarray(w), bits=bits, group_size=gs, symmetric=sym, allow_partial_group=True)
    for m in (1, 3, 8):
        x = rng.standard_normal((m, k)).astype(np.float32)
        x[:, 5] *= 30  # an outlier channel: float activations keep it exactly
        got, ref = _call(x, q), _np_reference(x, q)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4 * np.abs(ref).max())


# K = 600 takes every step of the kernel's code loop in one group (9 unrolled 64-input steps, one
# 16-input step, a masked 8-input tail); with groups of 32 there are 19 groups (the zero-point term
# runs one full 16-group chunk and a masked one). M = 2, 5, 7 take the 2-row pass, and a 4-row pass
# followed by 1- and 3-row passes; N = 45 leaves remainder rows after the row blocks.
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("gs", [None, 32])
def test_gemv_every_loop_path_matches_numpy_reference(bits, gs):
    rng = np.random.default_rng(3 * bits + (gs or 1))
    k, n = 600, 45
    w = rng.standard_normal((k, n)).astype(np.float32)
    q = quantize_blockwise(jnp.asarray(w), bits=bits, group_size=gs, symmetric=False, allow_partial_group=True)
    for m in (2, 5, 7):
        x = rng.standard_normal((m, k)).astype(np.float32)
        got, ref = _call(x, q), _np_reference(x, q)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
        # Each output is computed by one activation row's pass alone: row m equals the M = 1 call on it.
        np.testing.assert_array_equal(got[m - 1:m], _call(x[m - 1:m], q))


def test_gemv_hand_worked_int4():
    # One output channel, 4 inputs, group 2. int4 symmetric codes are stored shifted by 8: codes [9, 6 | 8, 15]
    # are w = 0.5 * [1, -2] and 0.25 * [0, 7]; x = [2, 1, 3, -1] gives 0.5 * (2 - 2) + 0.25 * (0 - 7) = -1.75.
    from jaxquant.weight_only.blockwise import BlockQuantizedWeight
    q = BlockQuantizedWeight(jnp.asarray([[9, 6, 8, 15]], jnp.uint8), jnp.asarray([[0.5, 0.25]], jnp.float32),
                             jnp.asarray([[8, 8]], jnp.int32), bits=4, group_size=2, in_features=4, out_features=1,
                             symmetric=True)
    np.testing.assert_array_equal(_call(np.asarray([[2, 1, 3, -1]], np.float32), q), [[-1.75]])


def test_gemv_threaded_path_equals_single_thread():
    lib = _lib()
    rng = np.random.default_rng(7)
    q = quantize_blockwise(jnp.asarray(rng.standard_normal((96, 300)), jnp.float32), bits=4, group_size=32)
    x = rng.standard_normal((2, 96)).astype(np.float32)
    lib.jq_wo_gemv_parallel_bytes.restype = ctypes.c_int64
    saved = lib.jq_wo_gemv_parallel_bytes()
    try:
        lib.jq_wo_gemv_set_parallel_bytes(ctypes.c_int64(0))  # every call splits its rows over the threads
        threaded = _call(x, q)
    finally:
        lib.jq_wo_gemv_set_parallel_bytes(ctypes.c_int64(saved))
    np.testing.assert_array_equal(threaded, _call(x, q))
    np.testing.assert_allclose(threaded, _np_reference(x, q), rtol=1e-5, atol=1e-4)


def test_gemv_rejects_mismatched_layout():
    q = quantize_blockwise(jnp.ones((64, 8), jnp.float32), bits=8, group_size=32)
    with pytest.raises(ValueError, match="weight_only_gemv: codes .* pass the BlockQuantizedWeight's own"):
        jax.block_until_ready(weight_only_gemv(jnp.ones((1, 64)), q.data, q.scale, q.zero_point, bits=8,
                                               group_size=16, out_features=8))


def test_dispatch_native_weight_only_vs_xla_fallback():
    # Decode rows take the native kernel (float activations: equals the dequantized float product); with
    # jq.use_native(False) they take the pure-XLA int8-activation path, bit for bit.
    rng = np.random.default_rng(3)
    q = quantize_blockwise(jnp.asarray(rng.standard_normal((128, 48)), jnp.float32), bits=4, group_size=64)
    x = jnp.asarray(rng.standard_normal((2, 128)), jnp.float32)
    f = jax.jit(lambda x: weight_only_matmul(x, q))
    hlo = f.lower(x).compile().as_text()
    assert "jaxquant_weight_only_gemv" in hlo
    np.testing.assert_allclose(f(x), _np_reference(np.asarray(x), q), rtol=1e-5, atol=1e-4)
    with jq.use_native(False):
        f_xla = jax.jit(lambda x: weight_only_matmul(x, q))
        assert "jaxquant_weight_only_gemv" not in f_xla.lower(x).compile().as_text()
        np.testing.assert_array_equal(f_xla(x), jax.jit(int8_activation_matmul)(x, q))
    # More rows than decode_rows: the float path, no custom call.
    x9 = jnp.ones((9, 128), jnp.float32)
    assert "jaxquant_weight_only_gemv" not in jax.jit(lambda x: weight_only_matmul(x, q)).lower(x9).as_text()


def test_native_decode_hlo_has_no_float_weight_and_export_is_portable():
    k, n = 256, 384
    q = quantize_blockwise(jnp.asarray(np.random.default_rng(2).standard_normal((k, n)), jnp.float32), bits=4,
                           group_size=64)
    lin = WeightOnlyLinear(q, None)
    hlo = jax.jit(lambda x: lin(x)).lower(jnp.ones((1, k), jnp.float32)).compile().as_text()
    assert "jaxquant_weight_only_gemv" in hlo and "u8[192,256]" in hlo
    for shape in re.findall(r"f32\[(\d+),(\d+)\]", hlo):
        assert int(shape[0]) * int(shape[1]) < k * n // 2, shape
    exp = jq.load_exported(jq.export(lin, jnp.ones((1, k), jnp.float32), batch_dim=None))
    assert "jaxquant_weight_only_gemv" not in exp.mlir_module()  # jq.export traces with native off
    x = jnp.asarray(np.random.default_rng(5).standard_normal((1, k)), jnp.float32)
    np.testing.assert_array_equal(exp.call(x), jax.jit(int8_activation_matmul)(x, q))


def test_fused_projections_equal_separate_calls():
    # Q/K/V-style: three weights of one format on the same input, one custom call; each output equals the
    # single-weight kernel's and the numpy reference; a bias is added per module. With an AWQ input_scale
    # (per-layer divisor of x) project_all falls back to one call per module.
    from jaxquant.weight_only.modules import project_all
    rng = np.random.default_rng(11)
    qs = [quantize_blockwise(jnp.asarray(rng.standard_normal((96, n)), jnp.float32), bits=4, group_size=32)
          for n in (40, 17, 17)]
    bias = jnp.asarray(rng.standard_normal(17), jnp.float32)
    mods = [WeightOnlyLinear(qs[0], None), WeightOnlyLinear(qs[1], bias), WeightOnlyLinear(qs[2], None)]
    x = jnp.asarray(rng.standard_normal((1, 3, 96)), jnp.float32)
    f = jax.jit(lambda x: project_all(x, mods))
    assert f.lower(x).compile().as_text().count("custom_call_target=\"jaxquant_weight_only_gemv\"") == 1
    for y, m, q in zip(f(x), mods, qs):
        ref = _np_reference(np.asarray(x).reshape(3, 96), q).reshape(1, 3, -1)
        if m.bias.get_value() is not None:
            ref = ref + np.asarray(bias)
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-4)
        np.testing.assert_array_equal(y, jax.jit(lambda x, m=m: m(x))(x))
    scaled = [WeightOnlyLinear(q, None, input_scale=jnp.full((96,), 2.0)) for q in qs[:2]]
    g = jax.jit(lambda x: project_all(x, scaled))
    assert g.lower(x).compile().as_text().count("custom_call_target=\"jaxquant_weight_only_gemv\"") == 2
    np.testing.assert_allclose(g(x)[0], 0.5 * f(x)[0], rtol=1e-6)


def test_native_decode_is_differentiable_in_x():
    # y = x @ W is linear in x: the gradient of sum(y * c) is c @ W^T, for one weight and for a fused group.
    from jaxquant.weight_only.modules import project_all
    rng = np.random.default_rng(12)
    qs = [quantize_blockwise(jnp.asarray(rng.standard_normal((64, n)), jnp.float32), bits=8) for n in (8, 5)]
    mods = [WeightOnlyLinear(q, None) for q in qs]
    x = jnp.asarray(rng.standard_normal((1, 64)), jnp.float32)
    c = [jnp.asarray(rng.standard_normal((1, q.out_features)), jnp.float32) for q in qs]
    g1 = jax.grad(lambda x: jnp.sum(mods[0](x) * c[0]))(x)
    np.testing.assert_allclose(g1, np.asarray(c[0]) @ np.asarray(qs[0].dequantize()).T, rtol=1e-5, atol=1e-5)
    g2 = jax.jit(jax.grad(lambda x: sum(jnp.sum(y * ci) for y, ci in zip(project_all(x, mods), c))))(x)
    ref = sum(np.asarray(ci) @ np.asarray(q.dequantize()).T for ci, q in zip(c, qs))
    np.testing.assert_allclose(g2, ref, rtol=1e-5, atol=1e-5)
