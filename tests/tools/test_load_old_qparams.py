"""A checkpoint written before QTensor scales and zero points took the data's rank (``(C,)`` per
channel then, ``(1, 1, 1, C)`` now) still loads, with bit-identical outputs, and the reshape on load is
limited to qparams of the old rank (any other shape difference is still an error)."""
import dataclasses
import pathlib

import numpy as np
import pytest

from jaxquant.serialization import CheckpointError, check_compatible, converted_template, load, read_checkpoint

from .old_format_model import build, example

FIXTURE = pathlib.Path(__file__).parent / "data" / "qtensor_qparams_v1.jq"


def test_old_checkpoint_loads_with_identical_outputs_and_other_shapes_are_refused():
    checkpoint = read_checkpoint(FIXTURE)
    assert list(checkpoint.arrays["up.weight_q.scale"].shape) == [3]  # really the old format
    template = converted_template(build(1), example())
    model = load(FIXTURE, template, inplace=False)
    w = model.up.weight_q.get_value()
    assert w.scale.shape == (1, 1, 1, 3) and w.q_per_channel_scales().shape == (3,)
    np.testing.assert_array_equal(np.asarray(w.q_per_channel_scales()), checkpoint.arrays["up.weight_q.scale"])
    out = np.asarray(model(example()))
    # bit for bit the output the old code recorded for the model it saved
    np.testing.assert_array_equal(out, np.asarray(checkpoint.header["metadata"]["output"], np.float32))
    # a (6,) scale is not a (3,) one of another rank; nor is a reshaped int8 weight
    for name, shape in (("up.weight_q.scale", (6,)), ("up.weight_q.int_data", (4, 3, 2, 2))):
        arrays = dict(checkpoint.arrays, **{name: np.zeros(shape, checkpoint.arrays[name].dtype)})
        with pytest.raises(CheckpointError, match=f"array '{name}': shape"):
            check_compatible(dataclasses.replace(checkpoint, arrays=arrays), template)
