"""Small converted models shared by the tools tests (built once per session: conversion takes ~1 s)."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxquant as jq
from jaxquant.models.fashion_cnn import FashionCNN, fusion_patterns
from testkit.small_models import minmax_qconfig  # noqa: F401 - the tools tests import it from here


def build_fashion_cnn(seed: int = 0, width: int = 8):
    """A random-init FashionCNN in eval mode, fused (Conv-BN-ReLU, Linear-ReLU)."""
    model = FashionCNN(width=width, rngs=nnx.Rngs(seed))
    model.eval()
    return jq.fuse_modules(model, fusion_patterns(model))


def images(n: int, seed: int = 0) -> jnp.ndarray:
    """``n`` float32 images ``(n, 28, 28, 1)`` in [0, 1], like Fashion-MNIST pixels."""
    return jnp.asarray(np.random.default_rng(seed).uniform(size=(n, 28, 28, 1)).astype(np.float32))


def static_ptq(float_model, calibration, qconfig=None):
    prepared = jq.prepare(float_model, qconfig or minmax_qconfig())
    jq.calibrate(prepared, calibration, progress=False)
    return prepared, jq.convert(prepared)


@pytest.fixture(scope="session")
def cnn_models():
    """``(float fused model, prepared model, int8 model)`` for a width-8 FashionCNN."""
    float_model = build_fashion_cnn(0)
    prepared, int8_model = static_ptq(float_model, [images(16, 1), images(16, 2)])
    return float_model, prepared, int8_model
