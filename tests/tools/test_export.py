"""jax.export of the int8 model: symbolic batch, plain jax.export.deserialize, identical outputs."""
import jax
import numpy as np
import pytest

from jaxquant.export import export, load_exported

from .conftest import images


@pytest.fixture(scope="module")
def artifact(cnn_models):
    """Fixed-batch (N=2) export: works with the kernels as they are."""
    _, _, int8_model = cnn_models
    return export(int8_model, images(2), batch_dim=None)


def test_exported_int8_model_fixed_batch_identical_outputs(cnn_models, artifact):
    _, _, int8_model = cnn_models
    exported = jax.export.deserialize(bytearray(artifact))
    x = images(2, seed=11)
    np.testing.assert_array_equal(np.asarray(exported.call(x)), np.asarray(jax.jit(int8_model)(x)))


def _check_symbolic(int8_model):
    exported = jax.export.deserialize(bytearray(export(int8_model, images(2))))
    assert "b" in str(exported.in_avals[0].shape)
    for n in (1, 3, 8):
        x = images(n, seed=n)
        np.testing.assert_array_equal(np.asarray(exported.call(x)), np.asarray(jax.jit(int8_model)(x)))


def test_exported_int8_model_symbolic_batch(cnn_models):
    _, _, int8_model = cnn_models
    exported = jax.export.deserialize(bytearray(export(int8_model, images(2))))
    assert "b" in str(exported.in_avals[0].shape)
    for n in (1, 3, 8):
        x = images(n, seed=n)
        np.testing.assert_array_equal(np.asarray(exported.call(x)), np.asarray(jax.jit(int8_model)(x)))


def test_exported_module_really_holds_int8_dots(artifact):
    text = load_exported(artifact).mlir_module()
    # u8 x s8 -> s32 dots (the VNNI path) survive into the artifact; no custom calls are needed.
    assert "xui8>" in text and "xi8>" in text and "-> tensor<" in text
    assert "custom_call" not in text


def test_load_exported_from_file_and_bad_bytes(artifact, tmp_path):
    (tmp_path / "m.jaxexport").write_bytes(artifact)
    exported = load_exported(tmp_path / "m.jaxexport")
    x = images(2)
    np.testing.assert_array_equal(np.asarray(exported.call(x)), np.asarray(load_exported(artifact).call(x)))
    with pytest.raises(ValueError, match="not a jax.export artifact"):
        load_exported(b"\x00" * 64)


def test_float_model_exports_too(cnn_models):
    float_model, _, _ = cnn_models
    exported = load_exported(export(float_model, images(2), batch_dim=None))
    x = images(2, seed=5)
    np.testing.assert_allclose(np.asarray(exported.call(x)), np.asarray(float_model(x)), rtol=1e-5, atol=1e-5)


def test_quantized_output_is_refused(cnn_models):
    from flax import nnx

    _, _, int8_model = cnn_models
    headless = nnx.clone(int8_model)
    headless.dequant = nnx.data(_Passthrough())
    with pytest.raises(TypeError, match="DeQuantStub"):
        export(headless, images(2), batch_dim=None)


class _Passthrough(__import__("flax").nnx.Module):
    def __call__(self, x):
        return x
