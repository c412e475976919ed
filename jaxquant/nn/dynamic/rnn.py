"""Dynamic LSTM / GRU cells for ``nnx.RNN``: the input and hidden projections run as dynamic
int8 (or float16/bfloat16-weight) linears, the gates and nonlinearities stay float32, as in
PyTorch's ``torch.ao.nn.quantized.dynamic.LSTM``/``GRU``.

Each cell keeps the interface ``nnx.RNN`` relies on: ``__call__(carry, inputs) -> (carry, y)``,
``initialize_carry(input_shape, rngs=None, carry_init=None)`` and ``num_feature_axes``; so a model
``nnx.RNN(nnx.LSTMCell(...))`` keeps working after ``quantize_dynamic`` swaps the cell.

``nnx.LSTMCell`` has one ``Linear`` per gate; the dynamic cell concatenates the four input kernels
into one ``(in, 4*hidden)`` weight (and the four hidden kernels into one ``(hidden, 4*hidden)``),
which is PyTorch's ``weight_ih_l0``/``weight_hh_l0`` in flax layout: one dot per projection per step,
and a per-tensor weight scale shared by the four gates, exactly as PyTorch quantizes them.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import rnglib
from flax.nnx.nn import initializers
from flax.nnx.nn.recurrent import _select_last_carry as select_last_carry
from flax.nnx.nn.recurrent import flip_sequences
from jaxquant.module_paths import named_modules, set_submodule
from jaxquant.nn.dynamic.linear import Linear

ProjectionFactory = Callable[[nnx.Linear, Any, str], nnx.Module]


def _fused_linear(parts: list[nnx.Linear], use_bias: bool) -> nnx.Linear:
    """One float ``nnx.Linear`` whose output is the concatenation of ``parts``' outputs."""
    kernel = jnp.concatenate([jnp.asarray(p.kernel.get_value(), jnp.float32) for p in parts], axis=-1)
    fused = nnx.Linear(kernel.shape[0], kernel.shape[1], use_bias=use_bias, rngs=nnx.Rngs(0))
    fused.kernel.set_value(kernel)
    if use_bias:
        fused.bias.set_value(jnp.concatenate([
            jnp.asarray(p.bias.get_value(), jnp.float32) if p.bias is not None
            else jnp.zeros((p.kernel.shape[1],), jnp.float32) for p in parts]))
    return fused


class _DynamicCell(nnx.RNNCellBase):
    """Shared carry initialisation (same as flax's cells: zeros unless a ``carry_init`` is given)."""

    _carry_parts: int = 2

    def __init__(self, dense_i: nnx.Module, dense_h: nnx.Module, *, in_features: int, hidden_features: int,
                 gate_fn: Callable = nnx.sigmoid, activation_fn: Callable = nnx.tanh,
                 param_dtype: Any = jnp.float32, carry_init: Any = None, name: str = ""):
        self.dense_i = dense_i
        self.dense_h = dense_h
        self.in_features = int(in_features)
        self.hidden_features = int(hidden_features)
        self.gate_fn = gate_fn
        self.activation_fn = activation_fn
        self.param_dtype = param_dtype
        self.carry_init = carry_init
        self.name = name

    @classmethod
    def _from_parts(cls, cell: nnx.Module, dense_i: nnx.Linear, dense_h: nnx.Linear, qconfig: Any, path: str,
                    make_projection: Optional[ProjectionFactory], linear_kwargs: dict) -> "_DynamicCell":
        if make_projection is None:
            make_projection = functools.partial(Linear.from_float, **linear_kwargs)
        return cls(make_projection(dense_i, qconfig, f"{path}.dense_i"),
                   make_projection(dense_h, qconfig, f"{path}.dense_h"),
                   in_features=cell.in_features, hidden_features=cell.hidden_features,
                   gate_fn=cell.gate_fn, activation_fn=cell.activation_fn, param_dtype=cell.param_dtype,
                   carry_init=getattr(cell, "carry_init", None), name=path)

    def initialize_carry(self, input_shape: tuple[int, ...], rngs: Any = None, carry_init: Any = None):
        """Zeros (or ``carry_init``) of shape ``input_shape[:-1] + (hidden_features,)``; a tuple
        ``(c, h)`` for LSTM cells, one array for GRU."""
        mem_shape = tuple(input_shape[:-1]) + (self.hidden_features,)
        init = carry_init if carry_init is not None else self.carry_init
        if init is None:
            init = initializers.zeros_init()
        if isinstance(rngs, rnglib.Rngs):
            rngs = rngs.carry
        # zeros need no randomness; flax's cells still demand an rng, we only do for custom inits
        key = (lambda: rngs()) if rngs is not None else (lambda: jax.random.key(0))
        parts = tuple(init(key(), mem_shape, self.param_dtype) for _ in range(self._carry_parts))
        return parts if self._carry_parts > 1 else parts[0]

    @property
    def num_feature_axes(self) -> int:
        return 1


class LSTMCell(_DynamicCell):
    """Dynamic LSTM cell: ``((c, h), x) -> ((c', h'), h')``, all float32 ``(..., hidden)``.

    ``dense_i``: ``in -> 4*hidden`` (no bias); ``dense_h``: ``hidden -> 4*hidden`` (bias), gates
    in flax's (and PyTorch's) order i, f, g, o. Replaces ``nnx.LSTMCell`` and ``nnx.OptimizedLSTMCell``.
    """

    _carry_parts = 2

    @classmethod
    def from_float(cls, cell: nnx.Module, qconfig: Any, path: str = "", *,
                   make_projection: Optional[ProjectionFactory] = None, **linear_kwargs: Any) -> "LSTMCell":
        """From an ``nnx.LSTMCell`` (per-gate Linears are concatenated first) or ``nnx.OptimizedLSTMCell``."""
        if isinstance(cell, nnx.OptimizedLSTMCell):
            dense_i, dense_h = cell.dense_i, cell.dense_h
        elif isinstance(cell, nnx.LSTMCell):
            dense_i = _fused_linear([cell.ii, cell.if_, cell.ig, cell.io], use_bias=False)
            dense_h = _fused_linear([cell.hi, cell.hf, cell.hg, cell.ho], use_bias=True)
        else:
            raise TypeError(f"'{path}': expected nnx.LSTMCell or nnx.OptimizedLSTMCell, got {type(cell).__name__}")
        return cls._from_parts(cell, dense_i, dense_h, qconfig, path, make_projection, linear_kwargs)

    def __call__(self, carry: tuple[jax.Array, jax.Array], inputs: jax.Array):
        """``carry = (c, h)`` float32 ``(..., hidden)``, ``inputs`` float ``(..., in)``."""
        return self.step_projected(carry, self.dense_i(inputs))

    def step_projected(self, carry: tuple[jax.Array, jax.Array], projected: jax.Array):
        """One step given the input projection ``dense_i(x_t)`` float32 ``(..., 4*hidden)``."""
        c, h = carry
        y = projected + self.dense_h(h)
        i, f, g, o = jnp.split(y, 4, axis=-1)
        i, f, g, o = self.gate_fn(i), self.gate_fn(f), self.activation_fn(g), self.gate_fn(o)
        new_c = f * c + i * g
        new_h = o * self.activation_fn(new_c)
        return (new_c, new_h), new_h


class GRUCell(_DynamicCell):
    """Dynamic GRU cell (flax's formulation): ``(h, x) -> (h', h')``, float32 ``(..., hidden)``.

    ``dense_i``: ``in -> 3*hidden`` with bias; ``dense_h``: ``hidden -> 3*hidden``, gates r, z, n;
    ``n = tanh(x_n + r * h_n)``, ``h' = (1 - z) n + z h``.
    """

    _carry_parts = 1

    @classmethod
    def from_float(cls, cell: nnx.Module, qconfig: Any, path: str = "", *,
                   make_projection: Optional[ProjectionFactory] = None, **linear_kwargs: Any) -> "GRUCell":
        """From an ``nnx.GRUCell``; projections are made by ``make_projection(linear, qconfig, path)``
        (default: dynamic ``Linear.from_float``, int8/float16/bfloat16 by the qconfig)."""
        if not isinstance(cell, nnx.GRUCell):
            raise TypeError(f"'{path}': expected nnx.GRUCell, got {type(cell).__name__}")
        return cls._from_parts(cell, cell.dense_i, cell.dense_h, qconfig, path, make_projection, linear_kwargs)

    def __call__(self, carry: jax.Array, inputs: jax.Array):
        """``carry`` float32 ``(..., hidden)``, ``inputs`` float ``(..., in)``."""
        return self.step_projected(carry, self.dense_i(inputs))

    def step_projected(self, carry: jax.Array, projected: jax.Array):
        """One step given the input projection ``dense_i(x_t)`` float32 ``(..., 3*hidden)``."""
        h = carry
        xi_r, xi_z, xi_n = jnp.split(projected, 3, axis=-1)
        hh_r, hh_z, hh_n = jnp.split(self.dense_h(h), 3, axis=-1)
        r = self.gate_fn(xi_r + hh_r)
        z = self.gate_fn(xi_z + hh_z)
        n = self.activation_fn(xi_n + r * hh_n)
        new_h = (1.0 - z) * n + z * h
        return new_h, new_h


OptimizedLSTMCell = LSTMCell


class RNN(nnx.RNN):
    """``nnx.RNN`` over a dynamic LSTM/GRU cell that projects the whole input sequence at once.

    As PyTorch's CPU ``torch.ao.nn.quantized.dynamic.LSTM``/``GRU`` do, the input projection
    ``dense_i`` runs once over all ``T`` steps: the activation is quantized with one scale over the
    whole sequence and the dot is one ``(T*B, in) x (in, G*hidden)`` product instead of ``T`` small
    ones. Only the hidden projection and the gates run per step (``cell.step_projected`` in a
    ``lax.scan``). Same call signature and options as ``nnx.RNN`` (``initial_carry``,
    ``seq_lengths``, ``return_carry``, ``time_major``, ``reverse``, ``keep_order``).

    Input float ``(*batch, T, in)`` (``(T, *batch, in)`` with ``time_major``); output float32
    ``(*batch, T, hidden)`` (and the final carry with ``return_carry``).
    """

    @classmethod
    def from_rnn(cls, rnn: nnx.RNN) -> "RNN":
        """The same loop as ``rnn`` (whose cell is a dynamic ``LSTMCell``/``GRUCell``)."""
        if not isinstance(rnn.cell, (LSTMCell, GRUCell)):
            raise TypeError(f"RNN.from_rnn: the cell must be a dynamic LSTMCell or GRUCell, got "
                            f"{type(rnn.cell).__qualname__}; run quantize_dynamic first")
        new = cls(rnn.cell, time_major=rnn.time_major, return_carry=rnn.return_carry,
                  reverse=rnn.reverse, keep_order=rnn.keep_order, unroll=rnn.unroll,
                  broadcast_rngs=rnn.broadcast_rngs, rngs=False)
        new.rngs, new.state_axes = rnn.rngs, rnn.state_axes
        return new

    def __call__(self, inputs: jax.Array, *, initial_carry: Any = None, seq_lengths: Any = None,
                 return_carry: Optional[bool] = None, time_major: Optional[bool] = None,
                 reverse: Optional[bool] = None, keep_order: Optional[bool] = None, rngs: Any = None):
        return_carry = self.return_carry if return_carry is None else return_carry
        time_major = self.time_major if time_major is None else time_major
        reverse = self.reverse if reverse is None else reverse
        keep_order = self.keep_order if keep_order is None else keep_order
        time_axis = 0 if time_major else inputs.ndim - 2
        batch_dims = inputs.shape[1:-1] if time_major else inputs.shape[:time_axis]
        flip = functools.partial(flip_sequences, seq_lengths=seq_lengths, num_batch_dims=len(batch_dims),
                                 time_major=time_major)
        if reverse:
            inputs = flip(inputs)
        if initial_carry is None:
            # Zeros need no randomness; forking the RNG stream anyway would mutate it on every call
            # (and fail under a plain jax.jit).
            rngs = None if self.cell.carry_init is None else (self.rngs if rngs is None else rngs)
            if isinstance(rngs, rnglib.Rngs):
                rngs = rngs.carry.fork()
            initial_carry = self.cell.initialize_carry(
                inputs.shape[:time_axis] + inputs.shape[time_axis + 1:], rngs)
        # The whole sequence through the input projection: one activation scale, one big dot.
        projected = jnp.moveaxis(self.cell.dense_i(inputs), time_axis, 0)
        slice_carry = seq_lengths is not None and return_carry

        def step(carry: Any, xi: jax.Array):
            carry, y = self.cell.step_projected(carry, xi)
            return carry, ((carry, y) if slice_carry else y)

        carry, out = jax.lax.scan(step, initial_carry, projected, unroll=self.unroll)
        if slice_carry:
            carries, out = out
            carry = select_last_carry(carries, seq_lengths)
        outputs = jnp.moveaxis(out, 0, time_axis)
        if reverse and keep_order:
            outputs = flip(outputs)
        return (carry, outputs) if return_carry else outputs


def whole_sequence_rnns(model: nnx.Module) -> nnx.Module:
    """Replace every ``nnx.RNN`` of ``model`` whose cell is a dynamic LSTM/GRU cell by :class:`RNN`
    (whole-sequence input projection), in place; returns ``model`` (a new :class:`RNN` when
    ``model`` itself is such an ``nnx.RNN``). ``quantize_dynamic`` calls it after swapping cells."""
    paths = [path for path, module in named_modules(model)
             if type(module) is nnx.RNN and isinstance(module.cell, (LSTMCell, GRUCell))]
    for path in paths:
        if path == "":
            return RNN.from_rnn(model)  # an RNN has no RNN inside it
        set_submodule(model, path, RNN.from_rnn(dict(named_modules(model))[path]))
    return model
