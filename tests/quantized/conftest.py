"""Fixtures shared by the tests/quantized parity tests."""
import pytest


@pytest.fixture
def x86_engine():
    """Run the test with PyTorch's x86 quantized engine (the one jaxquant matches), then restore the previous one.

    Use it per module with ``pytestmark = pytest.mark.usefixtures("x86_engine")``.
    """
    torch = pytest.importorskip("torch")
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = "x86"
    yield
    torch.backends.quantized.engine = previous
