import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.kernels.requantize import dequantize_accumulator, output_multiplier, requantize


def test_hand_worked_values():
    # multiplier 0.5: 3*0.5=1.5 -> 2 (even), 5*0.5=2.5 -> 2 (even), -3*0.5=-1.5 -> -2
    acc = jnp.array([3, 5, -3, 1000, -1000, 0], jnp.int32)
    got = requantize(acc, jnp.float32(0.5), 10)
    np.testing.assert_array_equal(np.asarray(got), [12, 12, 8, 255, 0, 10])
    got = requantize(acc, jnp.float32(0.5), 10, relu=True)
    np.testing.assert_array_equal(np.asarray(got), [12, 12, 10, 255, 10, 10])
    got = requantize(acc, jnp.float32(0.5), -5, out_dtype=jnp.int8)
    np.testing.assert_array_equal(np.asarray(got), [-3, -3, -7, 127, -128, -5])
    assert got.dtype == jnp.int8


def test_float_bias_is_added_before_rounding():
    # acc 1 + bias 0.4/ (0.1*2) = 1 + 2 = 3 -> * (0.2/0.4)=0.5 -> 1.5 -> 2
    atw, mult = output_multiplier(0.1, 2.0, 0.4)
    got = requantize(jnp.array([1], jnp.int32), mult, 0, bias_over_scale=jnp.float32(0.4) / atw)
    assert int(got[0]) == 2


def test_per_channel_and_huge_accumulators():
    acc = jnp.array([[2**31 - 1, -(2**31)], [7, 7]], jnp.int32)
    got = requantize(acc, jnp.array([1.0, 0.25], jnp.float32), 128)
    np.testing.assert_array_equal(np.asarray(got), [[255, 0], [135, 130]])


def test_dequantize_accumulator():
    got = dequantize_accumulator(jnp.array([[4, -2]], jnp.int32), jnp.array([0.5, 2.0]), jnp.array([1.0, 1.0]))
    np.testing.assert_allclose(np.asarray(got), [[3.0, -3.0]])
    got = dequantize_accumulator(jnp.array([[4, -2]], jnp.int32), jnp.float32(1.0), relu=True)
    np.testing.assert_allclose(np.asarray(got), [[4.0, 0.0]])


def test_bad_dtypes():
    with pytest.raises(TypeError, match="uint8 or int8"):
        requantize(jnp.zeros(3, jnp.int32), 1.0, 0, out_dtype=jnp.int16)
    with pytest.raises(TypeError, match="int32 accumulator"):
        requantize(jnp.zeros(3, jnp.float32), 1.0, 0)
