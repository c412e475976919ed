"""The QAT example runs end to end (--quick) and QAT int8 is not worse than the float model by much."""
import importlib.util
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fashion_mnist_qat.py"


@pytest.mark.slow
def test_example_quick(tmp_path):
    if not Path("/usr/share/datasets/fashion-mnist").exists():
        pytest.skip("Fashion-MNIST not installed")
    spec = importlib.util.spec_from_file_location("fashion_mnist_qat", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    acc = mod.main(["--quick", "--out", str(tmp_path)])
    assert (tmp_path / "qat_curves.png").exists()
    assert acc["QAT int8"] >= acc["float"] - 2.0
    assert acc["QAT 4-bit weights"] >= acc["PTQ 4-bit weights"] - 1.0
