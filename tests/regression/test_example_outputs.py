"""Structural changes keep every example model's int8 outputs bit-identical.

``example_outputs.npz`` was recorded by ``record_example_outputs.py`` on the tree before the core
renovation (issue #13); each builder here recomputes its outputs and compares them bit for bit.
"""
import importlib.util
import os
import sys

import numpy as np
import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("record_example_outputs",
                                               os.path.join(_HERE, "record_example_outputs.py"))
record = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = record  # the Linen models are dataclasses: their module must be importable
_spec.loader.exec_module(record)


@pytest.fixture(scope="module")
def recorded():
    with np.load(record.OUT, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(record.BUILDERS))
def test_outputs_bit_identical_to_recording(name, recorded):
    got = record.compute([name])
    expected = {k: v for k, v in recorded.items() if k == name or k.startswith(name + "/")}
    assert sorted(got) == sorted(expected), "the builder's outputs changed names; re-check the recording"
    for key, want in expected.items():
        assert np.all(np.isfinite(want)) and np.ptp(want) > 0, f"{key}: recorded output is degenerate"
        assert got[key].dtype == want.dtype and got[key].shape == want.shape, key
        np.testing.assert_array_equal(got[key], want, err_msg=f"{key} is no longer bit-identical")
