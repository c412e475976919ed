"""NNX Variable types that hold quantization state, so ``nnx.split`` can separate it.

``nnx.split(model, nnx.Param, QuantStats, ...)`` gives trainable parameters, observer/fake-quant state
and everything else as three pytrees; a plain ``jax.jit`` calibration or training loop carries the
second one. Gradients are taken with respect to ``nnx.Param`` only.
"""
from flax import nnx


class QuantStats(nnx.Variable):
    """Observer and fake-quantize state (min/max, histograms, scale, zero point, enable flags)."""


class QuantParams(nnx.Variable):
    """The fixed arrays of a converted model: int8 weights, scales, zero points, folded biases."""


class QuantCache(nnx.Variable):
    """Arrays derived from ``QuantParams`` for speed (packed weight layouts, column sums).

    Not part of what defines the model: serialisation and size accounting leave it out
    (``nnx.state(model, nnx.Not(QuantCache))``).
    """
