"""The small model of ``data/qtensor_qparams_v1.jq``: a checkpoint written by jaxquant at f53f071,
when QTensor scales were ``()`` per tensor and ``(C,)`` per channel (now of the data's rank). Its
ConvTranspose stores its per-channel weight as a QTensor, so the file holds a ``(C,)`` scale.

Regenerate (only with the code of that time; it is a fixture of the old format)::

    cd tests && PYTHONPATH=<a checkout of f53f071>:. python -c \
        "from tools.old_format_model import write; write('tools/data/qtensor_qparams_v1.jq')"

(as ``tools.old_format_model``, the module name pytest gives it: the file records each module's type.)
"""
import numpy as np
from flax import nnx

import jaxquant as jq
import jaxquant.nn as jqnn


class Net(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.quant = jqnn.QuantStub()
        self.up = nnx.ConvTranspose(1, 3, (2, 2), strides=(2, 2), rngs=rngs)
        self.dequant = jqnn.DeQuantStub()

    def __call__(self, x):
        return self.dequant(self.up(self.quant(x)))


def example() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(2, 4, 4, 1)).astype(np.float32)


def build(seed: int) -> nnx.Module:
    return jq.prepare(Net(nnx.Rngs(seed)), jq.get_default_qconfig("x86"))


def converted(seed: int = 0) -> nnx.Module:
    return jq.convert(jq.calibrate(build(seed), [example()], progress=False))


def write(path: str) -> None:
    from jaxquant.serialization import save
    model = converted()
    out = np.asarray(model(example()))
    save(path, model, metadata={"output": out.tolist(), "jaxquant_commit": "f53f071"})
