"""The small eager-mode model and the qconfig many tests quantize it with."""
import flax.nnx as nnx

import jaxquant as jq
import jaxquant.nn as jqnn


def minmax_qconfig() -> jq.QConfig:
    """PyTorch's x86 recipe with MinMax activations (HistogramObserver is slower to calibrate):
    ``reduce_range`` quint8 activations, per-channel symmetric qint8 weights."""
    return jq.QConfig(activation=jq.MinMaxObserver.with_args(reduce_range=True),
                      weight=jq.default_per_channel_weight_observer)


class SmallMLP(nnx.Module):
    """``quant -> fc1 (d_in -> 16) -> relu -> head (16 -> 3) -> dequant``; float32 ``(N, d_in)`` in,
    ``(N, 3)`` out. ``with_stub=False`` puts an Identity where the QuantStub was."""

    def __init__(self, rngs: nnx.Rngs, d_in: int = 6, with_stub: bool = True):
        self.quant = jqnn.QuantStub() if with_stub else jqnn.Identity()
        self.fc1 = nnx.Linear(d_in, 16, rngs=rngs)
        self.relu = jqnn.ReLU()
        self.head = nnx.Linear(16, 3, rngs=rngs)
        self.dequant = jqnn.DeQuantStub()

    def __call__(self, x):
        return self.dequant(self.head(self.relu(self.fc1(self.quant(x)))))
