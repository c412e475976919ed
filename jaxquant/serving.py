"""Serving a model: a compiled callable built once, with no per-call graph walk and no state copies.

``serve = jaxquant.compile(model)`` then ``serve(x)``. Works for an NNX module (float or int8), a Linen
module with its variables (``jaxquant.compile(module, variables)``, run through ``module.apply``), and a
plain function of ``(params, *inputs)`` (``jaxquant.compile(fn, params)``, the form graph-mode
functions take).

Why not ``nnx.jit(lambda m, x: m(x))(model, x)``: flax's graph-mode ``nnx.jit`` (flax 0.12) returns the
state of every module passed in as extra outputs of the compiled program, so that mutations made
inside propagate back. XLA cannot hand an input buffer back as an output unless it was donated, so the
program copies every weight, packed cache and scale on each call (a 64 MB float32 4096x4096 kernel is
a 64 MB memcpy per call), and on the host it flattens the module graph before the call and
rebuilds/updates every Variable after it. A new ``nnx.jit(lambda ...)`` per call also retraces and
recompiles each time (the lambda is the cache key). Serving needs none of this: the state is fixed.

What :func:`compile` does instead: split the model once, keep the flat list of its arrays resident on
the device, and call an XLA executable of ``(arrays, *inputs)`` compiled once per input signature
(shapes and dtypes), ahead of time if asked. A call costs one dict lookup keyed by the input shapes and
one executable dispatch; when batch buckets are given, a variable batch is padded (by repeating its
last row, so per-tensor dynamic quantization sees the same value range) to the next bucket and the
outputs are sliced back, so a server compiles one program per bucket instead of one per batch size.
Compiling takes a lock; calls do not (several threads may call the same served model).
"""
from __future__ import annotations

import operator
import threading
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from flax import nnx

__all__ = ["compile", "CompiledModel", "ModelChangedError", "ModelMutatesStateError"]

Signature = tuple  # (input treedef, ((shape, dtype), ...))


def _as_array(x: Any) -> Any:
    if isinstance(x, (jax.Array, jax.ShapeDtypeStruct)):
        return x
    return jax.numpy.asarray(x)


def _describe(signature: Signature) -> str:
    _, specs = signature
    return ", ".join(f"{np.dtype(d).name}{list(s)}" for s, d in specs) or "no inputs"


def _flat_state(model: nnx.Module) -> tuple[Any, Any, list, list[tuple[str, nnx.Variable]]]:
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    # RNG state is not checked for changes: eager calls advance it (nnx.RNN draws its initial carry).
    variables = [(".".join(str(p) for p in path), v) for path, v in nnx.iter_graph(model)
                 if isinstance(v, nnx.Variable) and not isinstance(v, nnx.RngState)]
    return graphdef, treedef, leaves, variables


class CompiledModel:
    """A model compiled for serving: call it like the model, ``serve(*inputs)``.

    Built by :func:`jaxquant.compile`; see its docstring. Holds the model's arrays (as they were when it
    was built) and one XLA executable per input signature.

    Attributes:
      name: what the error messages call the model (its class or function name).
      buckets: sorted batch sizes the leading axis is padded to, or ``None``.
    """

    def __init__(self, run: Callable[..., Any], leaves: list, *, name: str,
                 buckets: Optional[Sequence[int]] = None,
                 variables: Optional[list[tuple[str, nnx.Variable]]] = None):
        self.name = name
        self.buckets = _check_buckets(buckets, name)
        self._jitted = jax.jit(run)
        # Resident on the device once; a numpy leaf would otherwise be transferred on every call.
        self._leaves = jax.device_put(list(leaves))
        self._leaf_specs = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding) for a in self._leaves]
        self._cache: dict[Signature, Any] = {}
        self._rank_dtypes: Optional[tuple] = None  # the input treedef, ranks and dtypes fixed by the first compile
        self._lock = threading.Lock()
        if variables:
            self._var_paths = [p for p, _ in variables]
            self._var_objects = [v for _, v in variables]
            self._var_raws = [v.get_raw_value() for v in self._var_objects]
        else:
            self._var_paths, self._var_objects, self._var_raws = [], [], []
        # The per-call check reads every Variable's raw value: the attribute get_raw_value returns
        # is read ~2.5x faster without the method call, where this flax version has it.
        fast = operator.attrgetter("_raw_value")
        try:
            same = all(fast(v) is r for v, r in zip(self._var_objects, self._var_raws))
        except AttributeError:
            same = False
        self._read_raw = fast if same else _raw_value

    # ---- per call (lock-free) ----
    def __call__(self, *inputs: Any) -> Any:
        """Run the model on ``inputs`` (arrays or pytrees of arrays, as the model takes them).

        Returns what the model returns. The first call with a new input signature compiles (or, with
        ``buckets``, the first call in a new bucket); later calls only dispatch.
        """
        if self._var_objects and not all(map(operator.is_, map(self._read_raw, self._var_objects), self._var_raws)):
            self._recheck_changed()
        flat, treedef = jax.tree.flatten(inputs)
        flat = [x if isinstance(x, jax.Array) else _as_array(x) for x in flat]
        if self.buckets is None:
            signature = (treedef, tuple((x.shape, x.dtype) for x in flat))
            executable = self._cache.get(signature) or self._fill(signature)
            return executable(self._leaves, *jax.tree.unflatten(treedef, flat))
        n, bucket = self._bucket_for(flat)
        if bucket != n:
            flat = [_pad_rows(x, bucket) for x in flat]
        signature = (treedef, tuple((x.shape, x.dtype) for x in flat))
        executable = self._cache.get(signature) or self._fill(signature)
        out = executable(self._leaves, *jax.tree.unflatten(treedef, flat))
        if bucket == n:
            return out
        return jax.tree.map(lambda o: o[:n] if np.ndim(o) >= 1 and o.shape[0] == bucket else o, out)

    # ---- ahead of time ----
    def precompile(self, *example_inputs: Any) -> list[str]:
        """Compile now for inputs shaped like ``example_inputs`` (arrays or ``jax.ShapeDtypeStruct``).

        With ``buckets``, one program per bucket is compiled (the examples' leading axis is replaced by
        each bucket size). Returns the signatures compiled, e.g. ``["float32[1, 28, 28, 1]"]``.
        """
        flat, treedef = jax.tree.flatten(example_inputs)
        flat = [_as_array(x) for x in flat]
        batches = [None] if self.buckets is None else list(self.buckets)
        done = []
        for b in batches:
            shapes = [x.shape if b is None else self._batched_shape(x, b) for x in flat]
            signature = (treedef, tuple((s, x.dtype) for s, x in zip(shapes, flat)))
            if signature not in self._cache:
                self._fill(signature)
            done.append(_describe(signature))
        return done

    def compiled(self, *example_inputs: Any) -> jax.stages.Compiled:
        """The XLA executable that serves inputs shaped like ``example_inputs`` (compiled if needed);
        ``.as_text()`` gives its optimised HLO, e.g. to check that the int8 dots are u8 x s8."""
        flat, treedef = jax.tree.flatten(example_inputs)
        flat = [_as_array(x) for x in flat]
        if self.buckets is not None:
            _, bucket = self._bucket_for(flat)
            flat = [jax.ShapeDtypeStruct(self._batched_shape(x, bucket), x.dtype) for x in flat]
        signature = (treedef, tuple((x.shape, x.dtype) for x in flat))
        return self._cache.get(signature) or self._fill(signature)

    @property
    def signatures(self) -> list[str]:
        """The input signatures compiled so far, e.g. ``["float32[8, 28, 28, 1]"]``."""
        return [_describe(s) for s in list(self._cache)]

    def __repr__(self) -> str:
        return (f"CompiledModel({self.name}, {len(self._leaves)} arrays, buckets={self.buckets}, "
                f"compiled for {self.signatures})")

    # ---- helpers ----
    def _fill(self, signature: Signature) -> Any:
        with self._lock:
            executable = self._cache.get(signature)
            if executable is not None:  # another thread compiled it while this one waited
                return executable
            self._check_signature(signature)
            treedef, specs = signature
            args = jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(s, d) for s, d in specs])
            try:
                executable = self._jitted.lower(self._leaf_specs, *args).compile()
            except Exception as e:
                # Keep the model's own exception (its type and message name the layer); say which
                # served model and which inputs it came from (Python >= 3.11 shows notes).
                if hasattr(e, "add_note") and not isinstance(e, ModelMutatesStateError):
                    e.add_note(f"(raised while jaxquant.compile compiled {self.name} for inputs "
                               f"{_describe(signature)})")
                raise
            self._cache[signature] = executable
            if self._rank_dtypes is None:
                self._rank_dtypes = _rank_dtypes(signature)
            return executable

    def _check_signature(self, signature: Signature) -> None:
        if self._rank_dtypes is None:
            return
        treedef, specs = signature
        want_tree, want = self._rank_dtypes
        compiled_for = "; ".join(self.signatures)
        if treedef != want_tree:
            raise TypeError(
                f"jaxquant.compile: {self.name} was compiled for inputs structured as {want_tree}, "
                f"got {treedef}. Pass the inputs the same way (same number, same nesting)")
        for i, ((shape, dtype), (rank, want_dtype)) in enumerate(zip(specs, want)):
            if len(shape) != rank or np.dtype(dtype) != np.dtype(want_dtype):
                raise TypeError(
                    f"jaxquant.compile: input {i} of {self.name} is {np.dtype(dtype).name} of rank "
                    f"{len(shape)} {list(shape)}, but it was compiled for {np.dtype(want_dtype).name} of "
                    f"rank {rank} (compiled for: {compiled_for}). Convert the input "
                    f"(e.g. x.astype('{np.dtype(want_dtype).name}'), add or drop the batch axis), or build "
                    f"another jaxquant.compile(...) for this kind of input")

    def _bucket_for(self, flat: list) -> tuple[int, int]:
        sizes = {x.shape[0] if len(x.shape) else None for x in flat}
        if None in sizes or len(sizes) != 1:
            raise ValueError(
                f"jaxquant.compile: {self.name} pads a batch to buckets {self.buckets}, which needs every "
                f"input to have the same leading (batch) axis; got shapes {[list(x.shape) for x in flat]}. "
                "Build it without buckets=, or batch the inputs on axis 0")
        (n,) = sizes
        for bucket in self.buckets:
            if n <= bucket:
                if n == 0:
                    raise ValueError(f"jaxquant.compile: {self.name} got an empty batch (0 rows)")
                return n, bucket
        raise ValueError(
            f"jaxquant.compile: a batch of {n} is larger than the largest bucket of {self.name} "
            f"({self.buckets[-1]}). Add a larger bucket (buckets=) or split the batch")

    def _batched_shape(self, x: Any, batch: int) -> tuple[int, ...]:
        if not len(x.shape):
            raise ValueError(f"jaxquant.compile: {self.name} has buckets, so every input needs a batch axis; "
                             "got a scalar example input")
        return (batch, *x.shape[1:])

    def _recheck_changed(self) -> None:
        # Identity differs: either new weights, or the same values in new buffers (nnx.jit over the
        # module writes copies of every array back into it). Compare contents once; adopt equal ones.
        with self._lock:
            raws = list(self._var_raws)
            changed = []
            for i, (path, variable) in enumerate(zip(self._var_paths, self._var_objects)):
                now = variable.get_raw_value()
                if now is raws[i]:
                    continue
                if _same_bits(now, raws[i]):
                    raws[i] = now
                else:
                    changed.append(path)
            self._var_raws = raws
        if not changed:
            return
        shown = ", ".join(repr(p) for p in changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
        raise ModelChangedError(
            f"jaxquant.compile: {self.name} was changed after it was compiled for serving (new values at "
            f"{shown}); the served callable still holds the old ones. Call jaxquant.compile(model) again "
            "after changing the model (loading weights, training, nnx.update), or pass check_changes=False "
            "to serve the arrays captured at compile time")


def _same_bits(a: Any, b: Any) -> bool:
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    if ta != tb or len(la) != len(lb):
        return False
    for x, y in zip(la, lb):
        x, y = (np.asarray(jax.random.key_data(v) if jax.dtypes.issubdtype(v.dtype, jax.dtypes.prng_key) else v)
                for v in (x, y))
        if x.dtype != y.dtype or x.shape != y.shape:
            return False
        if not np.array_equal(x.reshape(-1).view(np.uint8), y.reshape(-1).view(np.uint8)):
            return False
    return True


class ModelChangedError(RuntimeError):
    """An NNX model's arrays were replaced after :func:`jaxquant.compile` captured them."""


class ModelMutatesStateError(ValueError):
    """Calling the model changes its own state (training-mode BatchNorm, observers, dropout RNG)."""


def _raw_value(v: nnx.Variable) -> Any:
    return v.get_raw_value()


def _rank_dtypes(signature: Signature) -> tuple:
    treedef, specs = signature
    return treedef, tuple((len(s), np.dtype(d)) for s, d in specs)


def _check_buckets(buckets: Optional[Sequence[int]], name: str) -> Optional[tuple[int, ...]]:
    if buckets is None:
        return None
    try:
        values = sorted({operator.index(b) for b in buckets})
    except TypeError as e:
        raise TypeError(f"jaxquant.compile({name}): buckets must be positive ints, got {buckets!r}") from e
    if not values or values[0] < 1:
        raise ValueError(f"jaxquant.compile({name}): buckets must be a non-empty list of positive batch "
                         f"sizes, got {buckets!r}")
    return tuple(values)


def _pad_rows(x: Any, rows: int) -> Any:
    # Repeat the last row rather than pad with zeros: every padded row's activations equal a real
    # row's, so per-tensor dynamic quantization (min/max over the whole batch) is unchanged and the
    # real rows' outputs are exactly those of the unpadded batch.
    host = np.asarray(x)
    return np.concatenate([host, np.repeat(host[-1:], rows - host.shape[0], axis=0)], axis=0)


def _nnx_runner(model: nnx.Module, graphdef: Any, treedef: Any, name: str) -> Callable[..., Any]:
    def run(leaves: list, *inputs: Any) -> Any:
        module = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
        out = module(*inputs)
        resident = {id(leaf) for leaf in leaves}
        # RNG counters advance on calls that only draw an initial carry (nnx.RNN); they are not
        # carried between served calls. Dropout, which would draw the same mask each call, is
        # refused before tracing (_check_no_training_dropout).
        changed = [".".join(str(k) for k in path) for path, variable in nnx.to_flat_state(nnx.state(module))
                   if not isinstance(variable, nnx.RngState)
                   and any(id(a) not in resident for a in jax.tree.leaves(variable.get_raw_value()))]
        if changed:
            raise ModelMutatesStateError(
                f"jaxquant.compile: calling {name} changes its state ({', '.join(changed[:5])}): a served "
                "model must be a pure function of its inputs. Call model.eval() first (BatchNorm running "
                "statistics, dropout), serve the converted model rather than the prepared one (observers "
                "record statistics), or use nnx.jit for steps that update state")
        return out
    return run


def _check_no_training_dropout(model: nnx.Module, name: str) -> None:
    active = [".".join(str(p) for p in path) or "(the model)" for path, m in nnx.iter_graph(model)
              if isinstance(m, nnx.Dropout) and not m.deterministic and m.rate > 0]
    if active:
        raise ModelMutatesStateError(
            f"jaxquant.compile: {name} has Dropout in training mode ({', '.join(active[:5])}): served, it "
            "would draw the same mask on every call. Call model.eval() before jaxquant.compile(model)")


def _linen_module_type() -> type:
    import flax.linen  # only when asked: NNX-only users need not import Linen

    return flax.linen.Module


def compile(  # noqa: A001 - the name PyTorch users know (torch.compile); reached as jaxquant.compile
    model: Any,
    params: Any = None,
    *,
    buckets: Optional[Sequence[int]] = None,
    example_inputs: Optional[Sequence[Any]] = None,
    check_changes: bool = True,
) -> CompiledModel:
    """Compile a model for serving (inference): ``serve = jaxquant.compile(model); y = serve(x)``.

    Three forms:

    * ``compile(nnx_module)``: an NNX module, float or converted int8 (``convert``,
      ``quantize_dynamic``); runs ``module(*inputs)``. Put it in eval mode first.
    * ``compile(linen_module, variables)``: anything with Linen's ``apply`` (a ``flax.linen.Module``
      or a ``jaxquant.linen`` model); runs ``module.apply(variables, *inputs)``.
    * ``compile(fn, params)``: a pure function ``fn(params, *inputs)``; ``compile(program)`` for an
      object with ``apply(params, *inputs)`` and ``params`` attributes (a converted graph-mode program).

    The model's arrays are captured once and kept on the device; each new input signature (input
    shapes and dtypes) compiles one XLA program; calls then cost a dict lookup and a dispatch, not a
    walk of the module graph (see ``docs/serving.md`` for why ``nnx.jit`` over the module is slow).

    Args:
      model: an ``nnx.Module``, a Linen module, or a function of ``(params, *inputs)``.
      params: the Linen variables or the function's params (pytree of arrays); ``None`` for NNX.
      buckets: batch sizes to pad the leading axis of every input to (e.g. ``(1, 8, 32)``): a batch of
        ``n`` rows runs in the smallest bucket ``>= n`` (rows padded by repeating the last one) and
        every output whose leading axis is that bucket is sliced back to ``n`` rows. A batch larger
        than the largest bucket is an error.
      example_inputs: inputs (arrays or ``jax.ShapeDtypeStruct``) to compile for now, ahead of time,
        as a tuple with one entry per model input; with ``buckets``, for every bucket.
      check_changes: for NNX models, check on each call (about 0.1 us per Variable) that the model's
        arrays were not replaced since compile, and raise :class:`ModelChangedError` if their values
        changed (arrays replaced by equal copies, as ``nnx.jit`` over the module does, are accepted
        after one comparison).

    Returns:
      A :class:`CompiledModel`: ``serve(*inputs)`` returns what the model returns; ``precompile``,
      ``compiled`` (the executable, for HLO inspection) and ``signatures`` for ahead-of-time use.

    Raises:
      TypeError: for a model of none of the three forms, or (on call) inputs of another rank, dtype or
        structure than the first compiled signature.
      ModelMutatesStateError: the model changes its own state when called (training mode, observers).
      ModelChangedError: (on call) the NNX model's arrays were replaced after compile.
    """
    if isinstance(model, nnx.Module):
        if params is not None:
            raise TypeError(f"jaxquant.compile: {type(model).__name__} is an NNX module, which holds its own "
                            "state; call jaxquant.compile(model) without params")
        name = type(model).__name__
        _check_no_training_dropout(model, name)
        graphdef, treedef, leaves, variables = _flat_state(model)
        served = CompiledModel(_nnx_runner(model, graphdef, treedef, name), leaves, name=name, buckets=buckets,
                               variables=variables if check_changes else None)
    elif hasattr(model, "apply") and callable(model.apply) and not isinstance(model, type):
        if params is None and not isinstance(model, _linen_module_type()):
            params = getattr(model, "params", None)  # a program that carries its params (graph mode)
        if params is None:
            raise TypeError(f"jaxquant.compile: {type(model).__name__} is a Linen-style module; pass its "
                            "variables: jaxquant.compile(module, variables)")
        name = type(model).__name__
        leaves, treedef = jax.tree.flatten(params)
        apply = model.apply
        served = CompiledModel(lambda leaves, *xs: apply(jax.tree.unflatten(treedef, leaves), *xs), leaves,
                               name=name, buckets=buckets)
    elif callable(model):
        if params is None:
            raise TypeError(f"jaxquant.compile: {getattr(model, '__name__', model)!r} is a function; pass its "
                            "params: jaxquant.compile(fn, params) for fn(params, *inputs) (for a function "
                            "without params, jax.jit(fn) is all you need)")
        name = getattr(model, "__name__", type(model).__name__)
        leaves, treedef = jax.tree.flatten(params)
        served = CompiledModel(lambda leaves, *xs: model(jax.tree.unflatten(treedef, leaves), *xs), leaves,
                               name=name, buckets=buckets)
    else:
        raise TypeError(f"jaxquant.compile: cannot serve a {type(model).__name__}; pass an nnx.Module, a Linen "
                        "module with its variables, or a function fn(params, *inputs) with its params")
    if example_inputs is not None:
        if not isinstance(example_inputs, (tuple, list)):
            raise TypeError("jaxquant.compile: example_inputs is a tuple with one entry per model input, "
                            f"e.g. (x,); got a {type(example_inputs).__name__}")
        served.precompile(*example_inputs)
    return served
