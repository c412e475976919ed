"""jaxquant.nn.quantized.Conv (1-D/2-D/3-D, grouped, depthwise, strided, dilated, padded, ConvReLU)
and ConvTranspose against torch.ao.nn.quantized on the same integers and qparams (x86 engine).

Layouts: torch activations NC..., ours N...C; torch conv weight (out, in/g, k...), ours
(k..., in/g, out); torch transposed-conv weight (in, out/g, k...)."""
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jaxquant.nn.quantized as jqq  # noqa: E402
from jaxquant.dtypes import qint8, quint8  # noqa: E402
from quantized_parity import (assert_within_one_step, channels_first_perm, channels_last_perm,  # noqa: E402
                              output_qparams, ours_weight, random_inputs, seed_of, signed_weight)

pytestmark = pytest.mark.usefixtures("x86_engine")

F = torch.nn.functional
TORCH_CONV = {1: "Conv1d", 2: "Conv2d", 3: "Conv3d"}
TORCH_F = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


# (id, nd, cin, cout, kernel, stride, torch padding, ours padding, dilation, groups, spatial, per_channel)
CASES = [
    ("1d", 1, 4, 6, 3, 1, 1, ((1, 1),), 1, 1, (11,), True),
    ("1d_strided_dilated", 1, 4, 6, 3, 2, 2, ((2, 2),), 2, 1, (13,), False),
    ("2d", 2, 3, 8, 3, 1, 1, ((1, 1), (1, 1)), 1, 1, (7, 6), True),
    ("2d_pointwise", 2, 8, 6, 1, 1, 0, "VALID", 1, 1, (5, 5), True),
    ("2d_strided_valid", 2, 4, 6, 3, 2, 0, "VALID", 1, 1, (9, 8), False),
    ("2d_same", 2, 4, 6, 5, 1, 2, "SAME", 1, 1, (6, 7), True),
    ("2d_dilated", 2, 4, 6, 3, 1, 2, ((2, 2), (2, 2)), 2, 1, (8, 8), True),
    ("2d_grouped", 2, 8, 6, 3, 1, 1, ((1, 1), (1, 1)), 1, 2, (6, 6), True),
    ("2d_depthwise", 2, 8, 8, 3, 2, 1, ((1, 1), (1, 1)), 1, 8, (9, 9), True),
    ("2d_depthwise_multiplier", 2, 4, 8, 3, 1, 1, ((1, 1), (1, 1)), 1, 4, (6, 6), False),
    ("3d", 3, 3, 4, 3, 1, 1, ((1, 1),) * 3, 1, 1, (4, 5, 4), True),
    ("3d_strided", 3, 2, 4, 2, 2, 0, "VALID", 1, 1, (6, 4, 6), False),
]


def _run_case(nd, cin, cout, k, stride, tpad, opad, dilation, groups, spatial, per_channel, relu=False,
              act_dtype="quint8", seed=0):
    rng = np.random.default_rng(seed)
    to_torch = channels_first_perm(nd + 2)
    x_scale, x_zp = 0.05, (121 if act_dtype == "quint8" else -7)
    x, _ = random_inputs(rng, (2, *spatial, cin), x_scale, x_zp, act_dtype)
    # fbgemm convolutions take quint8 only: qint8 is the same values shifted by +128.
    shift = 128 if act_dtype == "qint8" else 0
    x_ints = (np.asarray(x.int_data).astype(np.int64) + shift).transpose(to_torch)
    tx = torch._make_per_tensor_quantized_tensor(torch.from_numpy(np.ascontiguousarray(x_ints.astype(np.uint8))),
                                                 x_scale, x_zp + shift)
    w_shape = (cout, cin // groups, *(k,) * nd)
    tw, w_ints, w_scales = signed_weight(rng, w_shape, per_channel)
    bias = rng.normal(0, 0.3, cout).astype(np.float32)

    w_real = tw.dequantize()
    y_float = TORCH_F[nd](tx.dequantize(), w_real, torch.from_numpy(bias), stride, tpad, dilation, groups)
    if relu:
        y_float = F.relu(y_float)
    out_scale, out_zp = output_qparams(y_float.numpy(), act_dtype)

    if relu:
        tm = torch.ao.nn.intrinsic.quantized.ConvReLU2d(cin, cout, k, stride, tpad, dilation, groups)
    else:
        tm = getattr(torch.ao.nn.quantized, TORCH_CONV[nd])(cin, cout, k, stride, tpad, dilation, groups)
    tm.set_weight_bias(tw, torch.from_numpy(bias))
    tm.scale, tm.zero_point = out_scale, out_zp + shift
    theirs = tm(tx)

    w_ours = w_ints.transpose(*range(2, nd + 2), 1, 0)
    module = jqq.Conv(ours_weight(w_ours, w_scales, per_channel), bias, out_scale, out_zp,
                      qint8 if act_dtype == "qint8" else quint8, strides=(stride,) * nd, padding=opad,
                      dilation=(dilation,) * nd, groups=groups, relu=relu, name="conv")
    ours = jax.jit(lambda m, v: m(v))(module, x)
    assert_within_one_step(ours, theirs, to_ours_perm=channels_last_perm(nd + 2),
                           max_saturated=0.75 if relu else 0.5)



@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_conv_matches_torch(case):
    _run_case(*case[1:], seed=seed_of(case[0]))


@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
def test_conv_relu_2d_matches_torch(per_channel):
    _run_case(2, 4, 6, 3, 1, 1, ((1, 1), (1, 1)), 1, 1, (7, 7), per_channel, relu=True,
              seed=seed_of("relu", per_channel))


def test_conv_int8_activations_match_torch_on_shifted_uint8():
    _run_case(2, 4, 6, 3, 2, 1, ((1, 1), (1, 1)), 1, 1, (8, 8), True, act_dtype="qint8", seed=7)


# Transposed convolution. torch ConvTranspose2d(stride s, padding p, output_padding op, dilation d)
# is lax.conv_transpose over the stride-dilated input padded with (d*(k-1) - p, d*(k-1) - p + op) on
# each spatial axis, with the torch weight flipped spatially as (k, k, in, out) (transpose_kernel=False),
# or unflipped as (k, k, out, in) with transpose_kernel=True (lax flips and swaps it). flax's 'VALID' is
# torch's padding=0, output_padding=0.
#
# The reference engine here is "fbgemm", not "x86": in torch 2.13 the x86 engine sends transposed
# convolutions without output_padding to oneDNN, which returns wrong results (errors of ~200 output
# steps against torch's own float conv_transpose2d) whenever in_channels != out_channels; fbgemm and
# qnnpack agree with the float reference to half a step.
TRANSPOSE_CASES = [
    # id, cin, cout, k, stride, padding, output_padding, dilation, transpose_kernel, use_valid
    ("s2_p1_op1", 4, 6, 3, 2, 1, 1, 1, False, False),
    ("s2_p0_valid", 4, 6, 3, 2, 0, 0, 1, False, True),
    ("s1_p1_transpose_kernel", 6, 4, 3, 1, 1, 0, 1, True, False),
    ("s2_k2_dilated", 4, 4, 2, 2, 0, 0, 2, True, False),
]


@pytest.mark.parametrize("case", TRANSPOSE_CASES, ids=[c[0] for c in TRANSPOSE_CASES])
def test_conv_transpose_2d_matches_torch(case):
    torch.backends.quantized.engine = "fbgemm"
    _, cin, cout, k, stride, pad, out_pad, dil, transpose_kernel, use_valid = case
    rng = np.random.default_rng(seed_of(case[0]))
    x, tx = random_inputs(rng, (2, 5, 6, cin), 0.05, 119, "quint8", to_torch_perm=(0, 3, 1, 2))
    # ConvTranspose in PyTorch eager mode supports per-tensor weights only (per-channel is rejected).
    tw, w_ints, w_scale = signed_weight(rng, (cin, cout, k, k), per_channel=False)
    bias = rng.normal(0, 0.3, cout).astype(np.float32)
    y_float = F.conv_transpose2d(tx.dequantize(), tw.dequantize(), torch.from_numpy(bias), stride, pad,
                                 out_pad, 1, dil)
    out_scale, out_zp = output_qparams(y_float.numpy())

    tm = torch.ao.nn.quantized.ConvTranspose2d(cin, cout, k, stride, pad, out_pad, 1, True, dil)
    tm.set_weight_bias(tw, torch.from_numpy(bias))
    tm.scale, tm.zero_point = out_scale, out_zp
    theirs = tm(tx)

    if transpose_kernel:
        w_ours = w_ints.transpose(2, 3, 1, 0)  # (k, k, out, in)
    else:
        w_ours = w_ints[:, :, ::-1, ::-1].transpose(2, 3, 0, 1)  # (k, k, in, out), flipped
    if use_valid:
        padding = "VALID"
    else:
        lo = dil * (k - 1) - pad
        padding = ((lo, lo + out_pad),) * 2
    module = jqq.ConvTranspose(ours_weight(np.ascontiguousarray(w_ours), w_scale, False), bias, out_scale, out_zp,
                               quint8, strides=(stride, stride), padding=padding, kernel_dilation=(dil, dil),
                               transpose_kernel=transpose_kernel, name="deconv")
    ours = jax.jit(lambda m, v: m(v))(module, x)
    assert_within_one_step(ours, theirs, to_ours_perm=(0, 2, 3, 1))
