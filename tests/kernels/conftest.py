"""Fixtures for the kernel tests (their numpy references and HLO readers are in kernel_refs.py)."""
import numpy as np
import pytest


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(autouse=True)
def pure_xla_kernels():
    """These tests pin the pure-XLA formulations (HLO structure, layouts); tests/native checks that the
    native backend's results equal them."""
    from jaxquant.native import use_native
    with use_native(False):
        yield
