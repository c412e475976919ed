"""jaxquant.nn.quantized.Linear (and LinearReLU) against torch.ao.nn.quantized.Linear on the same
integers and qparams (x86 engine)."""
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jaxquant.nn.quantized as jqq  # noqa: E402
from jaxquant.dtypes import qint8, quint8  # noqa: E402
from quantized_parity import (assert_within_one_step, output_qparams, ours_weight,  # noqa: E402
                              random_inputs, seed_of, signed_weight)

pytestmark = pytest.mark.usefixtures("x86_engine")

K, N, M = 48, 24, 16


# Every value of each option appears with every value of each other option at least once
# (pairwise coverage), instead of the 16-case cross product.
CASES = [
    # per_channel, with_bias, relu, act_dtype
    (False, True, False, "quint8"),
    (True, True, True, "quint8"),
    (True, False, False, "quint8"),
    (False, False, True, "quint8"),
    (True, True, False, "qint8"),
    (False, True, True, "qint8"),
    (False, False, False, "qint8"),
    (True, False, True, "qint8"),
]


@pytest.mark.parametrize("per_channel,with_bias,relu,act_dtype", CASES,
                         ids=["-".join(("pc" if c[0] else "pt", "bias" if c[1] else "nobias",
                                        "relu" if c[2] else "linear", c[3])) for c in CASES])
def test_linear_matches_torch(per_channel, with_bias, relu, act_dtype):
    rng = np.random.default_rng(seed_of(per_channel, with_bias, relu, act_dtype))
    x_scale, x_zp = 0.04, (117 if act_dtype == "quint8" else -9)
    x, _ = random_inputs(rng, (2, M // 2, K), x_scale, x_zp, act_dtype)
    # fbgemm takes quint8 activations only: a qint8 tensor is the same real values as the quint8 tensor
    # with every integer and the zero point shifted by +128, which is what torch gets.
    x_ints = np.asarray(x.int_data).astype(np.int64) + (128 if act_dtype == "qint8" else 0)
    tx = torch._make_per_tensor_quantized_tensor(torch.from_numpy(x_ints.astype(np.uint8)), x_scale,
                                                 x_zp + (128 if act_dtype == "qint8" else 0))
    tw, w_ints, w_scales = signed_weight(rng, (N, K), per_channel)
    bias = rng.normal(0, 0.5, N).astype(np.float32) if with_bias else None

    w_real = w_ints * (w_scales[:, None] if per_channel else w_scales)
    y_float = (np.asarray(x.dequantize()) @ w_real.T) + (0 if bias is None else bias)
    out_scale, out_zp = output_qparams(y_float, act_dtype)

    if relu:
        tm = torch.ao.nn.intrinsic.quantized.LinearReLU(K, N, bias=with_bias)
    else:
        tm = torch.ao.nn.quantized.Linear(K, N, bias_=with_bias)
    tm.set_weight_bias(tw, None if bias is None else torch.from_numpy(bias))
    tm.scale, tm.zero_point = out_scale, out_zp + (128 if act_dtype == "qint8" else 0)
    theirs = tm(tx)

    ours_module = jqq.Linear(ours_weight(w_ints.T, w_scales, per_channel), bias, out_scale, out_zp,
                             qint8 if act_dtype == "qint8" else quint8, relu=relu, name="fc")
    ours = jax.jit(lambda m, v: m(v))(ours_module, x)
    assert ours.dtype == (qint8 if act_dtype == "qint8" else quint8)
    assert_within_one_step(ours, theirs, max_saturated=0.75 if relu else 0.5)


def test_linear_rejects_float_input_naming_the_module():
    rng = np.random.default_rng(0)
    _, w_ints, w_scales = signed_weight(rng, (N, K), False)
    m = jqq.Linear(ours_weight(w_ints.T, w_scales, False), None, 0.1, 128, quint8, name="head.fc")
    with pytest.raises(TypeError, match="head.fc"):
        m(np.zeros((2, K), np.float32))
