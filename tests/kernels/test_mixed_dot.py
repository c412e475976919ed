import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.kernels.mixed_dot import dot_general_u8s8, matmul_u8s8

DN = (((1,), (0,)), ((), ()))


def _ints(rng, shape, dtype):
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max + 1, shape, dtype=dtype)


@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (1, 17, 5), (2, 3, 1), (7, 33, 9), (64, 128, 48), (5, 300, 2)])
def test_matmul_exact(rng, m, k, n):
    a, b = _ints(rng, (m, k), np.uint8), _ints(rng, (k, n), np.int8)
    want = a.astype(np.int64) @ b.astype(np.int64)
    got = jax.jit(matmul_u8s8)(a, b)
    assert got.dtype == jnp.int32 and got.shape == (m, n)
    np.testing.assert_array_equal(np.asarray(got), want)
    np.testing.assert_array_equal(np.asarray(matmul_u8s8(a, b)), want)  # eager path
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda a, b: matmul_u8s8(a, b, transpose_out=True))(a, b)), want.T)


def test_extreme_values_no_overflow():
    k = 4096
    a = np.full((3, k), 255, np.uint8)
    b = np.full((k, 2), -128, np.int8)
    np.testing.assert_array_equal(np.asarray(jax.jit(matmul_u8s8)(a, b)), np.full((3, 2), 255 * -128 * k))


def test_general_dimension_numbers(rng):
    a = _ints(rng, (3, 4, 10), np.uint8)   # batch, m, k
    b = _ints(rng, (3, 6, 10), np.int8)    # batch, n, k
    got = dot_general_u8s8(a, b, (((2,), (2,)), ((0,), (0,))))
    want = np.einsum("bmk,bnk->bmn", a.astype(np.int64), b.astype(np.int64))
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda a, b: dot_general_u8s8(a, b, (((2,), (2,)), ((0,), (0,)))))(a, b)), want)
    np.testing.assert_array_equal(np.asarray(got), want)
    v, u = _ints(rng, (10,), np.uint8), _ints(rng, (10,), np.int8)
    np.testing.assert_array_equal(np.asarray(dot_general_u8s8(v, u, (((0,), (0,)), ((), ())))),
                                  v.astype(np.int64) @ u.astype(np.int64))


def test_vmap(rng):
    a = _ints(rng, (3, 5, 16), np.uint8)
    b = _ints(rng, (3, 16, 7), np.int8)
    ref = lambda x, y: np.einsum("...mk,...kn->...mn", x.astype(np.int64), y.astype(np.int64))
    np.testing.assert_array_equal(np.asarray(jax.vmap(matmul_u8s8, (0, None))(a, b[0])), ref(a, b[0]))
    np.testing.assert_array_equal(np.asarray(jax.vmap(matmul_u8s8, (None, 0))(a[0], b)), ref(a[0], b))
    np.testing.assert_array_equal(np.asarray(jax.jit(jax.vmap(matmul_u8s8))(a, b)), ref(a, b))
    # mapped axis not in front
    at = np.moveaxis(a, 0, 2)
    np.testing.assert_array_equal(np.asarray(jax.vmap(matmul_u8s8, (2, None))(at, b[0])), ref(a, b[0]))


def _compiled(f, *args):
    return jax.jit(f).lower(*args).compile().as_text()


@pytest.mark.parametrize("m", [1, 64])
def test_hlo_is_mixed_ynn_dot(rng, m):
    a, b = _ints(rng, (m, 256), np.uint8), _ints(rng, (256, 128), np.int8)
    lowered = jax.jit(matmul_u8s8).lower(a, b).as_text()
    assert "stablehlo.dot_general" in lowered and "tensor<256x128xi8>" in lowered and "xui8>" in lowered
    hlo = _compiled(matmul_u8s8, a, b)
    assert "__ynn_fusion" in hlo
    dots = [l for l in hlo.splitlines() if " dot(" in l]
    assert dots and all("s32[" in l for l in dots)
    assert "u8[" in hlo and "s8[256,128]" in hlo
    assert "convert" not in "".join(l for l in hlo.splitlines() if "s32[256" in l)  # no int32 weight


def test_hlo_transpose_out_compiles(rng):
    a, b = _ints(rng, (8, 64), np.uint8), _ints(rng, (64, 32), np.int8)
    hlo = _compiled(lambda a, b: matmul_u8s8(a, b, transpose_out=True), a, b)
    assert "__ynn_fusion" in hlo


def test_wrong_dtypes_raise(rng):
    a, b = _ints(rng, (4, 8), np.int8), _ints(rng, (8, 4), np.int8)
    with pytest.raises(TypeError, match="lhs uint8"):
        matmul_u8s8(a, b)
    with pytest.raises(TypeError, match="contracting sizes"):
        matmul_u8s8(_ints(rng, (4, 8), np.uint8), _ints(rng, (9, 4), np.int8))
