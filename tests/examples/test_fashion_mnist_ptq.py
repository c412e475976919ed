"""The static PTQ example end to end on real Fashion-MNIST (quick mode)."""
import importlib.util
import os

import pytest

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "fashion_mnist_ptq.py")
DATA = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(DATA), reason="needs Debian's dataset-fashion-mnist")
def test_fashion_mnist_ptq_quick(tmp_path):
    spec = importlib.util.spec_from_file_location("fashion_mnist_ptq", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    results = example.main(["--quick", "--json", str(tmp_path / "r.json")])
    assert results["float_accuracy"] > 75.0, results          # it really trained
    assert results["accuracy_drop"] <= 1.0, results            # the bound
    assert results["size_ratio"] <= 0.30, results
    assert (tmp_path / "r.json").exists()
