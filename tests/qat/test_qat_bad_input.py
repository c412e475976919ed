"""Bad input in a QAT run: eval-mode BatchNorm at prepare_qat, convert before any training step, and a
fake-quant scale gone NaN or collapsed (LSQ). Each error names the module and says what to do, and the
user's model is left as it was."""
import numpy as np
import optax
import pytest
import jax.numpy as jnp
from flax import nnx

from jaxquant.dtypes import per_channel_symmetric, qint8
from jaxquant.fake_quant.learnable import LearnableFakeQuantize
from jaxquant.fusion import fuse_modules_qat
from jaxquant.nn import intrinsic
from jaxquant.nn import qat as nnqat
from jaxquant.observers.minmax import MovingAverageMinMaxObserver
from jaxquant.observers.per_channel import MovingAveragePerChannelMinMaxObserver
from jaxquant.qconfig import QConfig, get_default_qat_qconfig
from jaxquant.transforms import convert
from jaxquant.transforms.prepare_qat import check_qat_state, enable_param_learning, prepare_qat

from qat_small_net import C_IN, H, N_OUT, Net  # tests/qat is on sys.path (rootdir conftest layout)


def _fused(train=True):
    model = fuse_modules_qat(Net(nnx.Rngs(0)), [["conv", "bn", "relu"]])
    model.train() if train else model.eval()
    return model


def _x(seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(4, H, H, C_IN)).astype(np.float32))


def _loss(model, x):
    return float(optax.softmax_cross_entropy_with_integer_labels(model(x), jnp.arange(4) % N_OUT).mean())


def _lsq_model():
    qconfig = QConfig(
        activation=LearnableFakeQuantize.with_args(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255),
        weight=LearnableFakeQuantize.with_args(observer=MovingAveragePerChannelMinMaxObserver, quant_min=-128,
                                               quant_max=127, dtype=qint8, qscheme=per_channel_symmetric))
    model = prepare_qat(_fused(), qconfig)
    model(_x())  # the observers' first estimate
    return enable_param_learning(model)


def test_prepare_qat_inplace_on_eval_mode_bn_leaves_the_model_unchanged():
    model = _fused(train=False)
    with pytest.raises(ValueError, match=r"'conv.bn' is in eval mode.*call model.train\(\) before prepare_qat"):
        prepare_qat(model, get_default_qat_qconfig("x86"), inplace=True)
    assert type(model.conv) is intrinsic.ConvBnReLU and type(model.fc) is nnx.Linear


def test_convert_before_any_training_step_names_the_unfed_fake_quant():
    model = prepare_qat(_fused(), get_default_qat_qconfig("x86"))
    model.eval()
    with pytest.raises(ValueError, match=r"at '?(quant|conv|fc)[.\w]*'? has not observed any data.*before convert"):
        convert(model)
    assert type(model.conv) is nnqat.ConvBnReLU  # not half converted


def test_nan_learnable_scale_gives_nan_loss_and_check_qat_state_names_it():
    model = _lsq_model()
    assert np.isfinite(_loss(model, _x(1)))
    model.fc.activation_post_process.scale.set_value(jnp.float32(jnp.nan))
    assert np.isnan(_loss(model, _x(1)))  # what the user sees in the training loop
    with pytest.raises(ValueError, match=r"'fc.activation_post_process': fake-quant state is not finite "
                                         r"\([^)]*param scale\); lower the learning rate"):
        check_qat_state(model)
    model.eval()
    with pytest.raises(ValueError, match=r"'fc'.*scale is not finite and positive.*check_qat_state"):
        convert(model)


def test_collapsed_learnable_scale_is_reported_though_the_loss_stays_finite():
    model = _lsq_model()
    check_qat_state(model)
    scale = model.fc.weight_fake_quant.scale.get_value()
    model.fc.weight_fake_quant.scale.set_value(scale.at[1].set(-0.5))
    # the forward clamps the scale to eps: no NaN to notice, channel 1 of fc is silently saturated
    assert np.isfinite(_loss(model, _x(1)))
    with pytest.raises(ValueError, match=r"'fc.weight_fake_quant': learnable fake-quant scale collapsed to <= eps "
                                         r"\(1 of 3 values, min -0.5\).*enable_static_estimate"):
        check_qat_state(model)


def test_nan_weight_after_training_is_refused_by_convert_naming_the_layer():
    model = prepare_qat(_fused(), get_default_qat_qconfig("x86"))
    model(_x())
    kernel = model.fc.linear.kernel.get_value()
    model.fc.linear.kernel.set_value(kernel.at[0, 0].set(jnp.inf))
    model.eval()
    with pytest.raises(ValueError, match=r"'fc'.*(NaN|Inf).*check_qat_state"):
        convert(model)
    with pytest.raises(ValueError, match=r"'fc.linear': parameter 'kernel' contains NaN/Inf \(1 of"):
        check_qat_state(model)
