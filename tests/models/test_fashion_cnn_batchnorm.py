"""set_batchnorm_statistics: the values drawn, in the documented order, and nothing else changed."""
import numpy as np
from flax import nnx

from jaxquant.models.fashion_cnn import FashionCNN, set_batchnorm_statistics


def _bn_values(model):
    return {name: {k: np.asarray(getattr(block.bn, k).get_value()) for k in ("mean", "var", "scale", "bias")}
            for name, block in (("block1", model.block1), ("block2", model.block2))}


def test_draws_follow_the_documented_order_and_leave_the_rest():
    model = FashionCNN(width=2, rngs=nnx.Rngs(0))
    before = _bn_values(model)
    conv_before = np.asarray(model.block1.conv.kernel.get_value())
    assert set_batchnorm_statistics(model, np.random.default_rng(7), mean_std=0.3) is model
    # the same draws by hand: per block (2 then 4 channels), mean ~ N(0, 0.3) then var ~ U(0.5, 2)
    ref = np.random.default_rng(7)
    got = _bn_values(model)
    for name, c in (("block1", 2), ("block2", 4)):
        np.testing.assert_array_equal(got[name]["mean"], ref.normal(0, 0.3, c).astype(np.float32))
        np.testing.assert_array_equal(got[name]["var"], ref.uniform(0.5, 2.0, c).astype(np.float32))
        np.testing.assert_array_equal(got[name]["scale"], before[name]["scale"])  # affine=False: untouched
        np.testing.assert_array_equal(got[name]["bias"], before[name]["bias"])
    np.testing.assert_array_equal(np.asarray(model.block1.conv.kernel.get_value()), conv_before)
    assert not model.block1.bn.use_running_average  # train/eval mode untouched (a new model trains)


def test_affine_draws_scale_and_bias_after_the_statistics():
    model = set_batchnorm_statistics(FashionCNN(width=2, rngs=nnx.Rngs(0)), np.random.default_rng(3), affine=True)
    ref = np.random.default_rng(3)
    for block, c in ((model.block1, 2), (model.block2, 4)):
        expect = [ref.normal(0, 0.1, c), ref.uniform(0.5, 2.0, c), ref.uniform(0.5, 1.5, c), ref.normal(0, 0.2, c)]
        for key, want in zip(("mean", "var", "scale", "bias"), expect):
            np.testing.assert_array_equal(np.asarray(getattr(block.bn, key).get_value()), want.astype(np.float32))
