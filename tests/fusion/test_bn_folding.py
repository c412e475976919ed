"""BatchNorm folding math against numpy formulas and torch.nn.utils.fusion on the same data."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

RTOL = 1e-6


def _bn_stats(rng, c):
    return dict(
        running_mean=rng.normal(size=c).astype(np.float32),
        running_var=rng.uniform(0.05, 3.0, size=c).astype(np.float32),
        gamma=rng.normal(size=c).astype(np.float32),
        beta=rng.normal(size=c).astype(np.float32),
    )


def _numpy_fold(kernel, bias, st, eps, out_axis):
    """BN folding in float64 numpy: w * g / sqrt(v + eps) per output channel."""
    g = np.float64(st["gamma"]) if st["gamma"] is not None else np.ones(len(st["running_mean"]))
    b = np.float64(st["beta"]) if st["beta"] is not None else np.zeros(len(st["running_mean"]))
    s = g / np.sqrt(np.float64(st["running_var"]) + eps)
    shape = [1] * kernel.ndim
    shape[out_axis] = -1
    w = np.float64(kernel) * s.reshape(shape)
    b0 = np.zeros_like(s) if bias is None else np.float64(bias)
    return w, (b0 - np.float64(st["running_mean"])) * s + b


def _assert_close(actual, expected, rtol=RTOL):
    # relative to the array's scale, so entries near zero don't demand impossible precision
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * np.abs(expected).max())


CONV_CASES = [
    # (spatial kernel, cin, cout, groups, bias)
    ((3,), 4, 6, 1, True),
    ((3,), 4, 6, 2, False),
    ((3, 3), 4, 8, 1, True),
    ((3, 3), 4, 8, 1, False),
    ((3, 3), 4, 8, 2, True),
    ((3, 3), 6, 6, 6, False),  # depthwise
    ((3, 3), 6, 12, 6, True),  # depthwise with channel multiplier 2
    ((2, 3, 3), 4, 6, 1, True),
    ((2, 3, 3), 4, 6, 2, False),
    ((1, 1), 16, 5, 1, False),
]


@pytest.mark.parametrize("ksize,cin,cout,groups,use_bias", CONV_CASES)
def test_conv_fold_matches_torch(ksize, cin, cout, groups, use_bias):
    torch = pytest.importorskip("torch")
    from torch.nn.utils.fusion import fuse_conv_bn_weights as torch_fold

    rng = np.random.default_rng(hash((ksize, cin, cout, groups, use_bias)) % 2**32)
    w_torch = rng.normal(size=(cout, cin // groups) + ksize).astype(np.float32)
    b = rng.normal(size=cout).astype(np.float32) if use_bias else None
    st = _bn_stats(rng, cout)
    eps = 1e-3

    tw, tb = torch_fold(torch.from_numpy(w_torch), None if b is None else torch.from_numpy(b),
                        torch.from_numpy(st["running_mean"]), torch.from_numpy(st["running_var"]),
                        eps, torch.from_numpy(st["gamma"]), torch.from_numpy(st["beta"]))
    nd = len(ksize)
    to_flax = tuple(range(2, 2 + nd)) + (1, 0)  # (out, in/g, *k) -> (*k, in/g, out)
    kernel = np.transpose(w_torch, to_flax)
    fw, fb = fuse_conv_bn_weights(kernel, b, st["running_mean"], st["running_var"], eps,
                                  st["gamma"], st["beta"])
    assert fw.dtype == jnp.float32 and fb.dtype == jnp.float32
    _assert_close(fw, np.transpose(tw.detach().numpy(), to_flax))
    _assert_close(fb, tb.detach().numpy())
    ref_w, ref_b = _numpy_fold(kernel, b, st, eps, out_axis=-1)
    _assert_close(fw, ref_w)
    _assert_close(fb, ref_b)


@pytest.mark.parametrize("transpose_kernel", [False, True])
@pytest.mark.parametrize("use_bias", [False, True])
def test_conv_transpose_fold_matches_torch(transpose_kernel, use_bias):
    torch = pytest.importorskip("torch")
    from torch.nn.utils.fusion import fuse_conv_bn_weights as torch_fold

    rng = np.random.default_rng(7 + transpose_kernel + 2 * use_bias)
    cin, cout = 5, 7
    w_torch = rng.normal(size=(cin, cout, 3, 2)).astype(np.float32)  # ConvTranspose2d layout
    b = rng.normal(size=cout).astype(np.float32) if use_bias else None
    st = _bn_stats(rng, cout)
    tw, tb = torch_fold(torch.from_numpy(w_torch), None if b is None else torch.from_numpy(b),
                        torch.from_numpy(st["running_mean"]), torch.from_numpy(st["running_var"]),
                        1e-5, torch.from_numpy(st["gamma"]), torch.from_numpy(st["beta"]),
                        transpose=True)
    # flax ConvTranspose: (*k, in, out); with transpose_kernel=True: (*k, out, in)
    perm = (2, 3, 1, 0) if transpose_kernel else (2, 3, 0, 1)
    kernel = np.transpose(w_torch, perm)
    fw, fb = fuse_conv_bn_weights(kernel, b, st["running_mean"], st["running_var"], 1e-5,
                                  st["gamma"], st["beta"], transpose=transpose_kernel)
    _assert_close(fw, np.transpose(tw.detach().numpy(), perm))
    _assert_close(fb, tb.detach().numpy())


@pytest.mark.parametrize("use_bias", [False, True])
def test_linear_fold_matches_torch(use_bias):
    torch = pytest.importorskip("torch")
    from torch.nn.utils.fusion import fuse_linear_bn_weights as torch_fold

    rng = np.random.default_rng(3 + use_bias)
    w_torch = rng.normal(size=(9, 13)).astype(np.float32)  # (out, in)
    b = rng.normal(size=9).astype(np.float32) if use_bias else None
    st = _bn_stats(rng, 9)
    tw, tb = torch_fold(torch.from_numpy(w_torch), None if b is None else torch.from_numpy(b),
                        torch.from_numpy(st["running_mean"]), torch.from_numpy(st["running_var"]),
                        1e-5, torch.from_numpy(st["gamma"]), torch.from_numpy(st["beta"]))
    fw, fb = fuse_linear_bn_weights(w_torch.T, b, st["running_mean"], st["running_var"], 1e-5,
                                    st["gamma"], st["beta"])
    _assert_close(fw, tw.detach().numpy().T)
    _assert_close(fb, tb.detach().numpy())


def test_linear_fold_single_bn_feature_broadcasts():
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(6, 4)).astype(np.float32)
    bias = rng.normal(size=4).astype(np.float32)
    st = _bn_stats(rng, 1)
    fw, fb = fuse_linear_bn_weights(kernel, bias, st["running_mean"], st["running_var"], 1e-5,
                                    st["gamma"], st["beta"])
    s = st["gamma"][0] / np.sqrt(np.float64(st["running_var"][0]) + 1e-5)
    _assert_close(fw, np.float64(kernel) * s)
    _assert_close(fb, (np.float64(bias) - st["running_mean"][0]) * s + st["beta"][0])
    assert fb.shape == (4,)


def test_missing_gamma_beta_mean_ones_and_zeros():
    rng = np.random.default_rng(1)
    kernel = rng.normal(size=(3, 3, 2, 5)).astype(np.float32)
    st = _bn_stats(rng, 5)
    fw, fb = fuse_conv_bn_weights(kernel, None, st["running_mean"], st["running_var"], 1e-5,
                                  None, None)
    ref_w, ref_b = _numpy_fold(kernel, None, dict(st, gamma=None, beta=None), 1e-5, -1)
    _assert_close(fw, ref_w)
    _assert_close(fb, ref_b)


def test_low_precision_kernel_keeps_dtype_and_folds_in_float32():
    rng = np.random.default_rng(2)
    kernel32 = rng.normal(size=(3, 3, 4, 8)).astype(np.float32)
    kernel16 = jnp.asarray(kernel32, jnp.bfloat16)
    st = _bn_stats(rng, 8)
    fw, fb = fuse_conv_bn_weights(kernel16, None, st["running_mean"], st["running_var"], 1e-5,
                                  st["gamma"], st["beta"])
    assert fw.dtype == jnp.bfloat16 and fb.dtype == jnp.bfloat16
    ref_w, ref_b = _numpy_fold(np.float32(kernel16), None, st, 1e-5, -1)
    # one bf16 rounding of the float32-exact result: relative error <= 2^-8
    np.testing.assert_allclose(np.float64(np.float32(fw)), ref_w, rtol=2**-8, atol=1e-30)
    np.testing.assert_allclose(np.float64(np.float32(fb)), ref_b, rtol=2**-8, atol=1e-30)


def test_fold_is_jittable():
    rng = np.random.default_rng(4)
    kernel = rng.normal(size=(3, 4, 6)).astype(np.float32)
    bias = rng.normal(size=6).astype(np.float32)
    st = _bn_stats(rng, 6)
    args = (kernel, bias, st["running_mean"], st["running_var"], 1e-5, st["gamma"], st["beta"])
    eager = fuse_conv_bn_weights(*args)
    jitted = jax.jit(fuse_conv_bn_weights, static_argnames="transpose")(*args)
    _assert_close(jitted[0], eager[0])
    _assert_close(jitted[1], eager[1])


def test_channel_mismatch_is_an_error():
    st = _bn_stats(np.random.default_rng(5), 7)
    with pytest.raises(ValueError, match="7 output channels|has 8 output channels"):
        fuse_conv_bn_weights(np.ones((3, 3, 4, 8), np.float32), None, st["running_mean"],
                             st["running_var"], 1e-5, st["gamma"], st["beta"])
    with pytest.raises(ValueError, match="Linear has 8 output features"):
        fuse_linear_bn_weights(np.ones((4, 8), np.float32), None, st["running_mean"],
                               st["running_var"], 1e-5, st["gamma"], st["beta"])
