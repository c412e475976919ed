"""``jax.export`` of a (quantized) NNX model's forward pass: a serialized StableHLO artifact.

The model's arrays are baked into the artifact as constants, so the bytes alone run it: anyone with
``jax.export.deserialize(blob).call(x)`` gets the int8 model's outputs, without jaxquant installed.
The int8 kernels lower to plain StableHLO (``dot_general`` with u8 x s8 operands, integer
convolutions, element-wise requantization), so no custom call needs to be allow-listed: the native
backend (:mod:`jaxquant.native`) is switched off while tracing.
"""
from __future__ import annotations

import os
from typing import Any, Sequence, Union

import jax
import jax.numpy as jnp
from flax import nnx

from jaxquant.module_paths import copy_model
from jaxquant.native import use_native
from jaxquant.qtensor import QTensor


def _input_specs(inputs: Sequence[Any], batch_dim: Union[int, None], batch_name: str) -> list:
    arrays = [jnp.asarray(x) for x in inputs]
    if batch_dim is None:
        return [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in arrays]
    dims_per_input = []
    for i, x in enumerate(arrays):
        if not -x.ndim <= batch_dim < x.ndim:
            raise ValueError(f"export: batch_dim={batch_dim} is out of range for input {i} of shape {x.shape}; "
                             "give batch_dim=None to export fixed shapes")
        dims = [str(d) for d in x.shape]
        dims[batch_dim] = batch_name
        dims_per_input.append(dims)
    # Parse all shapes in one call so the inputs' ``b`` is the same symbol.
    flat = jax.export.symbolic_shape(", ".join(d for dims in dims_per_input for d in dims))
    specs, start = [], 0
    for x, dims in zip(arrays, dims_per_input):
        specs.append(jax.ShapeDtypeStruct(tuple(flat[start:start + len(dims)]), x.dtype))
        start += len(dims)
    return specs


def export(model: nnx.Module, example_input: Any, *more_inputs: Any, batch_dim: Union[int, None] = 0,
           platforms: Sequence[str] = ("cpu",), eval_mode: bool = True) -> bytes:
    """Serialize ``model``'s forward on inputs shaped like ``example_input`` (and ``more_inputs``).

    Args:
      model: any NNX model called as ``model(x)`` (or ``model(x, *more)``) with arrays; an int8
        model from ``convert`` or ``quantize_dynamic`` usually. It is not modified (a copy is traced).
      example_input: an array (or ``jax.ShapeDtypeStruct``) giving the input's shape and dtype,
        e.g. float32 ``(N, 28, 28, 1)``; int32 token ids ``(N, T)`` for a language model.
      more_inputs: further positional inputs, e.g. MiniLM's int32 ``attention_mask (N, T)``; they
        share the batch axis ``batch_dim`` and its symbolic size with ``example_input``.
      batch_dim: the axis exported as a symbolic size ``b`` (any batch size runs), or ``None`` for
        the exact shapes of the example inputs.
      platforms: lowering platforms (``("cpu",)``; add ``"cuda"`` etc. to run elsewhere).
      eval_mode: trace the model in eval mode (dropout off, BatchNorm running statistics).
    Returns:
      ``bytes`` from ``jax.export.Exported.serialize()``; run with
      ``jax.export.deserialize(blob).call(x, *more)`` or :func:`load_exported`.
    Raises:
      TypeError: the model's output is not an array (e.g. a QTensor: end the model with a DeQuantStub).
    """
    traced = copy_model(model)
    if eval_mode:
        traced.eval()
    graphdef, state = nnx.split(traced)

    def forward(*xs):
        # Rebuild the Variables inside the trace: merging the closed-over ones would let modules that
        # mutate state while running (nnx.RNN advances its carry RngStream) touch Variables created
        # outside this trace, which flax refuses (TraceContextError).
        fresh = jax.tree_util.tree_map(lambda a: a, state)
        out = nnx.merge(graphdef, fresh)(*xs)
        for leaf in jax.tree_util.tree_leaves(out, is_leaf=lambda v: isinstance(v, QTensor)):
            if isinstance(leaf, QTensor):
                raise TypeError(f"export: the model returns a quantized tensor ({leaf!r}); jax.export artifacts "
                                "carry plain arrays: end the model with a DeQuantStub, or return .int_repr()")
        return out

    inputs = [jnp.zeros(x.shape, x.dtype) if isinstance(x, jax.ShapeDtypeStruct) else x
              for x in (example_input, *more_inputs)]
    # One symbolic scope for all inputs, so they share the batch size ``b``.
    specs = _input_specs(inputs, batch_dim, "b")
    # The native backend's FFI calls would tie the artifact to this build of jaxquant: trace portable.
    with use_native(False):
        exported = jax.export.export(jax.jit(forward), platforms=tuple(platforms))(*specs)
    return bytes(exported.serialize())


def load_exported(path_or_bytes: Union[str, os.PathLike, bytes, bytearray]) -> jax.export.Exported:
    """``jax.export.Exported`` from serialized bytes or a file holding them; call it with ``.call(x)``."""
    if isinstance(path_or_bytes, (bytes, bytearray)):
        blob = bytes(path_or_bytes)
    else:
        with open(os.fspath(path_or_bytes), "rb") as f:
            blob = f.read()
    try:
        return jax.export.deserialize(bytearray(blob))
    except Exception as e:  # flatbuffer errors are not a documented type
        raise ValueError(f"load_exported: not a jax.export artifact, or a damaged one ({type(e).__name__}: {e})") from None
