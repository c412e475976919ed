"""``Dropout`` of a converted model: identity on quantized activations (``torch.ao.nn.quantized.Dropout``)."""
from __future__ import annotations

from typing import Any

from flax import nnx

from jaxquant.qtensor import QTensor


class Dropout(nnx.Dropout):
    """``nnx.Dropout`` that passes a ``QTensor`` through unchanged, in eval *and* training mode.

    ``convert`` puts it in place of every ``nnx.Dropout``, as PyTorch's convert swaps ``nn.Dropout``
    for ``nnq.Dropout``: an int8 model switched back to ``.train()`` (e.g. to fine-tune the float
    head behind a ``DeQuantStub``) keeps running instead of failing inside JAX on the QTensor.
    Masking int8 codes would not be dropout anyway (zero is the zero point, not the integer 0).
    A float input (after a ``DeQuantStub``) gets ordinary dropout.
    """

    @classmethod
    def from_observed(cls, module: nnx.Dropout, path: str = "") -> "Dropout":
        """From an ``nnx.Dropout`` (convert's protocol; nothing was observed)."""
        return cls.from_float(module)

    @classmethod
    def from_float(cls, module: nnx.Dropout) -> "Dropout":
        rngs = module.rngs if isinstance(module.rngs, nnx.RngStream) else None
        return cls(module.rate, broadcast_dims=module.broadcast_dims, deterministic=module.deterministic,
                   rng_collection=module.rng_collection, rngs=rngs)

    def __call__(self, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        """``inputs``: a ``QTensor`` (returned as is) or a float array (``nnx.Dropout``)."""
        if isinstance(inputs, QTensor):
            return inputs
        return super().__call__(inputs, *args, **kwargs)
