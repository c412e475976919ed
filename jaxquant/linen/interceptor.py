"""The ``nn.intercept_methods`` interceptor that runs quantized versions of supported Linen layers.

For each intercepted ``__call__`` of a supported layer type it reads the layer's dotted path, looks up
its qconfig with :func:`jaxquant.qconfig_mapping.qconfig_for` and, depending on the workflow stage
(``mode``), observes, fake-quantizes or runs the int8 kernels with the layer's variables in jaxquant's
collections (``quant_stats``, ``quant_params``). Nothing global is patched: the interceptor is active
only inside :meth:`jaxquant.linen.QuantizedModel.apply` / ``init``.

Per-layer quantization: activations between layers stay float (the user's ``__call__`` code runs
``nn.relu`` etc. on floats), so a quantized layer quantizes its input with its calibrated input
qparams, runs the int8 dot/conv, requantizes to its output qparams and dequantizes.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxquant.core.grad_guard import refuse_gradient
from jaxquant.core.weights import activation_per_token, weight_dtype
from jaxquant.dtypes import bfloat16, float16, qint8, quint8
from jaxquant.linen import conv as conv_layers, dense as dense_layers, embed as embed_layers, stubs
from jaxquant.linen.names import QUANT_CACHE, QUANT_PARAMS, QUANT_STATS, display_path, module_path
from jaxquant.linen.quant_state import (
    activation_qparams,
    fake_quant,
    observe,
    quantize_gate_group,
    quantize_kernel,
    quantize_kernel_with_fake_quant,
)
from jaxquant.observers.protocols import FakeQuant
from jaxquant.qconfig_mapping import qconfig_for
from jaxquant.qtensor import dequantize, quantize_per_tensor

MODES = ("float", "observe", "qat", "convert_static", "static", "convert_dynamic", "dynamic", "record")

WEIGHTED_LAYERS: dict[type, Any] = {
    nn.Dense: dense_layers.DenseLayer(),
    nn.DenseGeneral: dense_layers.DenseGeneralLayer(),
    nn.Einsum: dense_layers.EinsumLayer(),
    nn.Conv: conv_layers.ConvLayer(),
    nn.ConvTranspose: conv_layers.ConvTransposeLayer(),
}
# Recurrent cells are quantized as a unit (as PyTorch's dynamic LSTM/GRU): the Dense layers inside
# take the cell's qconfig. Their gate Denses (flax's names, PyTorch's gate order) form two groups,
# the input and the hidden projection; dynamic quantization gives each group one weight, as
# PyTorch's weight_ih / weight_hh (one per-tensor scale for all gates). Under ``nn.RNN`` the input
# projection of all steps is one dot over the whole sequence (one activation scale, M = T*B rows),
# as PyTorch's CPU dynamic LSTM/GRU; the hidden projection runs per step.
CELL_GATES = {nn.LSTMCell: (("ii", "if", "ig", "io"), ("hi", "hf", "hg", "ho")),
              nn.GRUCell: (("ir", "iz", "in"), ("hr", "hz", "hn"))}
CELL_TYPES = tuple(CELL_GATES)


def _gate_group(module: Any) -> Optional[tuple[str, ...]]:
    """The names of the gate group ``module`` (a Dense) belongs to, or None outside a cell."""
    for group in CELL_GATES.get(type(module.parent), ()):
        if module.name in group:
            return group
    return None


@dataclasses.dataclass
class Record:
    """What a pass saw (Python side, filled while tracing): ``checks`` are ``(kind, scope_path, name,
    config)`` for observer / fake-quant states to validate after convert; ``qparams`` say how to
    recompute each converted layer's quant_params outside the traced pass (see
    :func:`jaxquant.linen.transforms.convert`); ``converted`` maps scope
    paths to the float param names the converted layer no longer needs; ``modules`` maps dotted paths
    to the bound modules' types and attributes (for fusion); ``native`` holds ``(scope_path, pack)``
    pairs, ``pack(quant_params) -> dict`` building the layer's ``quant_cache`` from its concrete
    int8 weight (the native backend's packed layouts)."""

    checks: list = dataclasses.field(default_factory=list)
    qparams: list = dataclasses.field(default_factory=list)
    converted: dict = dataclasses.field(default_factory=dict)
    modules: dict = dataclasses.field(default_factory=dict)
    native: list = dataclasses.field(default_factory=list)


def _act_dtype(qconfig: Any, path: str, what: str) -> Any:
    dtype = qconfig.activation().dtype
    if dtype not in (quint8, qint8):
        raise ValueError(f"'{display_path(path)}' ({what}): static int8 quantization needs quint8 or qint8 "
                         f"activations, its qconfig's activation uses {dtype!r}; use get_default_qconfig('x86') "
                         "or set this module's qconfig to None")
    return dtype


def _get(module: Any, col: str, name: str) -> Any:
    return module.get_variable(col, name) if module.has_variable(col, name) else None


class QuantInterceptor:
    """Callable for ``nn.intercept_methods``; ``model`` is the :class:`~jaxquant.linen.QuantizedModel`."""

    def __init__(self, model: Any, record: Optional[Record] = None):
        if model.mode not in MODES:
            raise ValueError(f"unknown jaxquant.linen mode {model.mode!r}; one of {MODES}")
        self.model = model
        self.mode = model.mode
        self.record = record if record is not None else Record()
        # Depth of dynamic nn.RNN calls whose input projection already ran over the whole sequence:
        # inside, a cell's input Denses receive their slice of the projected step.
        self._projected_rnns = 0

    # ------------------------------------------------------------------ qconfig
    def _lookup(self, module: Any) -> Any:
        if self.model.qconfig_mapping is None:
            return None
        return qconfig_for(self.model.qconfig_mapping, module_path(module), type(module))

    def qconfig_of(self, module: Any) -> Any:
        ancestor = module.parent
        while isinstance(ancestor, nn.Module):
            if type(ancestor) in CELL_TYPES:
                return self._lookup(ancestor)
            ancestor = ancestor.parent
        return self._lookup(module)

    # --------------------------------------------------------------- dispatch
    def __call__(self, next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
        module = context.module
        method = context.method_name
        if self.mode == "record":
            if method == "__call__":
                self.record.modules[module_path(module)] = module.clone(parent=None)
            return next_fun(*args, **kwargs)
        path = module_path(module)
        if method == "__call__":
            self.record.modules.setdefault(path, type(module))
        if type(module) is nn.BatchNorm and method == "__call__" and path in self.model.fused:
            return args[0]  # folded into the layer before it by fuse_modules
        mtype = type(module)
        if mtype is nn.RNN and method == "__call__" and self.mode in ("dynamic", "convert_dynamic") \
                and type(module.cell) in CELL_TYPES and (args or "inputs" in kwargs):
            return self._rnn_dynamic(module, next_fun, args, kwargs)
        if method == "__call__" and mtype in WEIGHTED_LAYERS:
            return self._weighted(WEIGHTED_LAYERS[mtype], module, path, next_fun, args, kwargs)
        if mtype is nn.Embed and method == "setup" and self.mode in ("static", "dynamic") and \
                embed_layers.is_embedding_qconfig(self.qconfig_of(module)):
            return None  # the float table is gone: nn.Embed.setup would look for it
        if mtype is nn.Embed and method in ("__call__", "attend"):
            return self._embed(module, path, method, next_fun, args, kwargs)
        if mtype is stubs.QuantStub and method == "__call__":
            return self._output_quant(module, path, next_fun(*args, **kwargs), "QuantStub")
        if mtype is stubs.FloatFunctional and method == "__call__":
            y = next_fun(*args, **kwargs)
            if args and args[0] in stubs.UNOBSERVED_OPS:
                return y
            return self._output_quant(module, path, y, "FloatFunctional")
        return next_fun(*args, **kwargs)

    # -------------------------------------------------------- weighted layers
    def _float(self, spec: Any, module: Any, next_fun, args, kwargs) -> jax.Array:
        kernel = _get(module, "params", spec.kernel_name)
        bias = _get(module, "params", "bias")
        if kernel is not None and bias is not None and not getattr(module, "use_bias", True):
            # a BatchNorm was folded in: the bias exists although the layer was built without one
            return spec.float_apply(module, args[0], spec.stored_kernel(module, kernel), bias)
        return next_fun(*args, **kwargs)

    def _weighted(self, spec: Any, module: Any, path: str, next_fun, args, kwargs) -> Any:
        qconfig = self.qconfig_of(module)
        mode = self.mode
        if qconfig is None or mode == "float":
            return self._float(spec, module, next_fun, args, kwargs)
        if mode in ("dynamic", "convert_dynamic") and not spec.supports_dynamic:
            return self._float(spec, module, next_fun, args, kwargs)
        if "inputs" in kwargs and not args:
            args, kwargs = (kwargs["inputs"],), {k: v for k, v in kwargs.items() if k != "inputs"}
        if kwargs or len(args) != 1:
            raise ValueError(f"'{display_path(path)}' ({type(module).__name__}): quantized layers take one input "
                             f"array; got extra arguments {sorted(kwargs) or len(args)} (set the module's attributes "
                             "instead, or set this layer's qconfig to None)")
        x = args[0]
        what = type(module).__name__
        if mode == "observe":
            act = qconfig.activation()
            _act_dtype(qconfig, path, what)
            observe(module, "input_observer", act, x)
            y = self._float(spec, module, next_fun, args, kwargs)
            observe(module, "output_observer", act, y)
            return y
        if mode == "qat":
            return self._qat(spec, module, path, qconfig, next_fun, args, kwargs)
        if mode == "convert_static":
            return self._convert_static(spec, module, path, qconfig, x)
        if mode == "static":
            if hasattr(spec, "native_packer"):  # for pack_native, which rebuilds quant_cache
                self.record.native.append((tuple(module.path), spec.native_packer(module)))
            return self._static_forward(spec, module, path, x, self._quant_params(module, path, static=True),
                                        _act_dtype(qconfig, path, what))
        if mode == "convert_dynamic":
            return self._convert_dynamic(spec, module, path, qconfig, x)
        if mode == "dynamic":
            return self._dynamic_forward(spec, module, path, qconfig, x, self._quant_params(module, path, static=False))
        raise AssertionError(mode)

    def _ensure_params(self, spec: Any, module: Any, next_fun, args, kwargs) -> None:
        if not module.has_variable("params", spec.kernel_name):
            next_fun(*args, **kwargs)  # init: let the layer create its own params

    def _qat(self, spec, module, path, qconfig, next_fun, args, kwargs) -> jax.Array:
        self._ensure_params(spec, module, next_fun, args, kwargs)
        if hasattr(spec, "check_module"):
            spec.check_module(module, path)
        act, wfq = qconfig.activation(), qconfig.weight()
        if act is None or wfq is None or not isinstance(wfq, FakeQuant):
            raise ValueError(f"'{display_path(path)}': QAT needs a qconfig with fake-quantize activation and weight, "
                             "e.g. jaxquant.linen.get_default_qat_qconfig_mapping()")
        if getattr(wfq, "is_per_channel", False) and hasattr(spec, "check_weight_scheme"):
            spec.check_weight_scheme(module, path, True)
        kernel = spec.stored_kernel(module, module.get_variable("params", spec.kernel_name))
        bias = _get(module, "params", "bias")
        x = fake_quant(module, "input_fake_quant", act, args[0])
        w_pt = jnp.moveaxis(kernel, -1, 0)
        kq = jnp.moveaxis(fake_quant(module, "weight_fake_quant", wfq, w_pt, w_pt.shape), 0, -1)
        y = spec.float_apply(module, x, kq, bias)
        return fake_quant(module, "output_fake_quant", act, y)

    def _activation_qparams(self, module: Any, path: str, qconfig: Any, name: str) -> tuple[jax.Array, jax.Array]:
        """Static qparams of ``input``/``output`` from an observer (PTQ) or fake quant (QAT) state."""
        scope = tuple(module.path)
        for kind in ("observer", "fake_quant"):
            state = _get(module, QUANT_STATS, f"{name}_{kind}")
            if state is not None:
                config = qconfig.activation()
                self.record.checks.append((kind, scope, f"{name}_{kind}", config))
                self.record.qparams.append(("act", scope, f"{name}_{kind}", config, name))
                return activation_qparams(config, state)
        raise ValueError(f"'{display_path(path)}' ({type(module).__name__}): no '{QUANT_STATS}' for its {name}: this "
                         "layer never ran while calibrating (or QAT); calibrate with data that reaches it, or set "
                         "its qconfig to None")

    def _weight_qparams(self, spec: Any, module: Any, path: str, qconfig: Any) -> dict:
        self.record.checks.append(("weight", tuple(module.path), spec.kernel_name, None))
        fq_state = _get(module, QUANT_STATS, "weight_fake_quant")
        if fq_state is not None:
            config = qconfig.weight()

            def quantize(raw_kernel, state):
                return quantize_kernel_with_fake_quant(spec.stored_kernel(module, raw_kernel), config, state)
        else:
            observer = qconfig.weight()
            observer = getattr(observer, "observer", observer)
            if observer.dtype != qint8:
                raise ValueError(f"'{display_path(path)}': int8 kernels need qint8 weights, the weight observer "
                                 f"{observer!r} uses {observer.dtype!r}")

            def quantize(raw_kernel, state):
                return quantize_kernel(spec.stored_kernel(module, raw_kernel), observer)
        self.record.qparams.append(("weight", tuple(module.path), spec.kernel_name, quantize))
        qp = quantize(module.get_variable("params", spec.kernel_name), fq_state)
        bias = _get(module, "params", "bias")
        if bias is not None:
            qp["bias"] = jnp.asarray(bias, jnp.float32)
        return qp

    def _write(self, module: Any, qp: dict, drop: tuple[str, ...]) -> None:
        for name, value in qp.items():
            module.put_variable(QUANT_PARAMS, name, value)
        self.record.converted[tuple(module.path)] = drop

    def _convert_static(self, spec, module, path, qconfig, x) -> jax.Array:
        what = type(module).__name__
        dtype = _act_dtype(qconfig, path, what)
        if hasattr(spec, "check_module"):
            spec.check_module(module, path)
        w = qconfig.weight()
        if getattr(getattr(w, "observer", w), "qscheme", None) is not None and hasattr(spec, "check_weight_scheme"):
            spec.check_weight_scheme(module, path, getattr(w, "observer", w).qscheme.is_per_channel)
        if not module.has_variable("params", spec.kernel_name):
            raise ValueError(f"'{display_path(path)}' ({what}): no float params to convert; pass the calibrated "
                             "variables (params and quant_stats)")
        qp = self._weight_qparams(spec, module, path, qconfig)
        qp["input_scale"], qp["input_zero_point"] = self._activation_qparams(module, path, qconfig, "input")
        qp["output_scale"], qp["output_zero_point"] = self._activation_qparams(module, path, qconfig, "output")
        self._write(module, qp, (spec.kernel_name, "bias"))
        if hasattr(spec, "native_packer"):
            self.record.native.append((tuple(module.path), spec.native_packer(module)))
        return self._static_forward(spec, module, path, x, qp, dtype)

    def _quant_params(self, module: Any, path: str, static: bool) -> dict:
        if not module.has_variable(QUANT_PARAMS, "weight_int"):
            raise ValueError(
                f"'{display_path(path)}' ({type(module).__name__}): its qconfig quantizes it but the variables have no "
                f"'{QUANT_PARAMS}' for it; apply the converted model to the variables convert returned (and use the "
                "same qconfig mapping)")
        names = ("weight_int", "weight_scale", "weight_zero_point", "bias")
        if static:
            names += ("input_scale", "input_zero_point", "output_scale", "output_zero_point")
        qp = {n: _get(module, QUANT_PARAMS, n) for n in names}
        # Which blobs exist is static (the variable tree's structure), so this is a trace-time choice.
        cache = module.variables.get(QUANT_CACHE, {}) if static else {}
        return {**qp, **cache}

    def _static_forward(self, spec, module, path, x, qp, dtype) -> jax.Array:
        x = refuse_gradient(x, f"'{display_path(path)}' ({type(module).__name__}, static int8)")
        xq = quantize_per_tensor(jnp.asarray(x, jnp.float32), qp["input_scale"], qp["input_zero_point"], dtype)
        return dequantize(spec.int8_apply(module, display_path(path), xq, qp, dtype))

    def _dynamic_options(self, qconfig: Any) -> tuple[bool, bool]:
        per_token = self.model.per_token if self.model.per_token is not None else activation_per_token(qconfig)
        return self.model.reduce_range, per_token

    @staticmethod
    def _dynamic_weight_observer(qconfig: Any, path: str, what: str) -> Any:
        wdtype = weight_dtype(qconfig, display_path(path))
        if wdtype in (float16, bfloat16):
            raise NotImplementedError(f"'{display_path(path)}': {wdtype!r} dynamic weights are not supported in "
                                      "jaxquant.linen yet; use qint8 (default_dynamic_qconfig)")
        if wdtype != qint8:
            raise ValueError(f"'{display_path(path)}' ({what}) cannot be dynamically quantized with "
                             f"{wdtype!r} weights; use default_dynamic_qconfig or per_channel_dynamic_qconfig")
        observer = qconfig.weight()
        return getattr(observer, "observer", observer)

    def _gate_qparams(self, module: Any, path: str, qconfig: Any, group: tuple[str, ...]) -> dict:
        """convert_dynamic of one gate Dense of a cell: its share of the group's weight (one scale)."""
        observer = self._dynamic_weight_observer(qconfig, path, type(module).__name__)
        cell_params = module.parent.variables.get("params", {})
        missing = [n for n in group if n not in cell_params]
        if missing:
            raise ValueError(f"'{display_path(module_path(module.parent))}' ({type(module.parent).__name__}): no float "
                             f"params for its gates {missing}; pass the model's variables (params)")
        scope, cell_scope = tuple(module.path), tuple(module.parent.path)
        self.record.checks.append(("weight", scope, "kernel", None))
        self.record.qparams.append(("weight_group", scope, cell_scope, group, observer))
        qp = quantize_gate_group([cell_params[n]["kernel"] for n in group], observer)[group.index(module.name)]
        bias = _get(module, "params", "bias")
        if bias is not None:
            qp["bias"] = jnp.asarray(bias, jnp.float32)
        return qp

    def _convert_dynamic(self, spec, module, path, qconfig, x) -> jax.Array:
        group = _gate_group(module)
        if group is not None:
            qp = self._gate_qparams(module, path, qconfig, group)
        else:
            self._dynamic_weight_observer(qconfig, path, type(module).__name__)
            qp = self._weight_qparams(spec, module, path, qconfig)
        self._write(module, qp, (spec.kernel_name, "bias"))
        return self._dynamic_forward(spec, module, path, qconfig, x, qp)

    def _dynamic_forward(self, spec, module, path, qconfig, x, qp) -> jax.Array:
        x = jnp.asarray(x)
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"dynamic '{display_path(path)}' ({type(module).__name__}): expected a float input, "
                            f"got {x.dtype}")
        group = _gate_group(module)
        if self._projected_rnns and group is not None and group == CELL_GATES[type(module.parent)][0]:
            # the input projection already ran over the whole sequence: x is this step's projection
            # of all gates; this gate's columns are its output (bias included)
            width = int(module.features)
            start = group.index(module.name) * width
            return x[..., start:start + width]
        x = refuse_gradient(x, f"'{display_path(path)}' ({type(module).__name__}, dynamic int8)")
        reduce_range, per_token = self._dynamic_options(qconfig)
        return spec.dynamic_apply(module, display_path(path), x, qp, reduce_range=reduce_range, per_token=per_token)

    def _rnn_dynamic(self, rnn: Any, next_fun, args, kwargs) -> Any:
        """A dynamic ``nn.RNN`` over an LSTM/GRU cell: project the whole input sequence with the cell's
        input gates at once (one int8 dot, one activation scale), then run the scan on the projected
        sequence; the cell's input Denses pick their columns (see :meth:`_dynamic_forward`)."""
        cell = rnn.cell
        qconfig = self._lookup(cell)
        if qconfig is None:
            return next_fun(*args, **kwargs)
        cell_path = module_path(cell)
        what = type(cell).__name__
        names = CELL_GATES[type(cell)][0]
        if self.mode == "convert_dynamic":
            observer = self._dynamic_weight_observer(qconfig, cell_path, what)
            params = cell.variables.get("params", {})
            if any(n not in params for n in names):
                raise ValueError(f"'{display_path(cell_path)}' ({what}): no float params for its input gates {names}; "
                                 "pass the model's variables (params)")
            gates = quantize_gate_group([params[n]["kernel"] for n in names], observer)
            biases = [params[n].get("bias") for n in names]
        else:
            stored = cell.variables.get(QUANT_PARAMS, {})
            if any(n not in stored or "weight_int" not in stored[n] for n in names):
                raise ValueError(f"'{display_path(cell_path)}' ({what}): its qconfig quantizes it but the variables "
                                 f"have no '{QUANT_PARAMS}' for its gates {names}; apply the converted model to the "
                                 "variables quantize_dynamic returned, and list "
                                 f"'{QUANT_PARAMS}' in nn.RNN's variable_broadcast")
            gates = [{k: stored[n][k] for k in ("weight_int", "weight_scale", "weight_zero_point")} for n in names]
            biases = [stored[n].get("bias") for n in names]
        qp = {k: jnp.concatenate([g[k] for g in gates], axis=-1) for k in gates[0]}
        if any(b is not None for b in biases):
            qp["bias"] = jnp.concatenate([jnp.asarray(b, jnp.float32) if b is not None else
                                          jnp.zeros(g["weight_int"].shape[-1:], jnp.float32)
                                          for b, g in zip(biases, gates)])
        args = list(args)
        x = jnp.asarray(args[0] if args else kwargs.pop("inputs"))
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"dynamic '{display_path(cell_path)}' ({what}): expected a float input sequence, "
                            f"got {x.dtype}")
        x = refuse_gradient(x, f"'{display_path(cell_path)}' ({what}, dynamic int8)")
        reduce_range, per_token = self._dynamic_options(qconfig)
        projected = dense_layers.DenseLayer().dynamic_apply(None, display_path(cell_path), x, qp,
                                                            reduce_range=reduce_range, per_token=per_token)
        args = [projected] + args[1:]
        self._projected_rnns += 1
        try:
            return next_fun(*args, **kwargs)
        finally:
            self._projected_rnns -= 1

    # ------------------------------------------------------------------ embed
    def _embed(self, module, path, method, next_fun, args, kwargs) -> jax.Array:
        qconfig = self.qconfig_of(module)
        mode = self.mode
        if mode not in ("convert_static", "static", "convert_dynamic", "dynamic") or not \
                embed_layers.is_embedding_qconfig(qconfig):
            return next_fun(*args, **kwargs)
        if mode.startswith("convert"):
            table = _get(module, "params", "embedding")
            if table is None:
                raise ValueError(f"'{display_path(path)}' (Embed): no float 'embedding' param to convert")
            self.record.checks.append(("weight", tuple(module.path), "embedding", None))
            qp = embed_layers.embedding_quant_params(table, qconfig)
            self.record.qparams.append(("weight", tuple(module.path), "embedding",
                                        lambda t, _: embed_layers.embedding_quant_params(t, qconfig)))
            self._write(module, qp, ("embedding",))
        else:
            if not module.has_variable(QUANT_PARAMS, "weight_int"):
                raise ValueError(f"'{display_path(path)}' (Embed): no '{QUANT_PARAMS}' for it; apply the converted "
                                 "model to the variables convert returned")
            qp = {n: module.get_variable(QUANT_PARAMS, n) for n in ("weight_int", "weight_scale", "weight_zero_point")}
        if method == "attend":
            return embed_layers.embed_attend(qp, args[0])
        return embed_layers.embed_lookup(qp, args[0], display_path(path))

    # ---------------------------------------------------- stubs, functional
    def _output_quant(self, module: Any, path: str, y: jax.Array, what: str) -> jax.Array:
        qconfig = self.qconfig_of(module)
        mode = self.mode
        if qconfig is None or mode in ("float", "dynamic", "convert_dynamic") or qconfig.activation is None:
            return y
        act = qconfig.activation()
        if mode == "observe":
            return observe(module, "output_observer", act, y)
        if mode == "qat":
            return fake_quant(module, "output_fake_quant", act, y)
        dtype = _act_dtype(qconfig, path, what)
        if mode == "convert_static":
            scale, zero_point = self._activation_qparams(module, path, qconfig, "output")
            self._write(module, {"output_scale": scale, "output_zero_point": zero_point}, ())
        else:
            if not module.has_variable(QUANT_PARAMS, "output_scale"):
                raise ValueError(f"'{display_path(path)}' ({what}): no '{QUANT_PARAMS}' for it; apply the converted "
                                 "model to the variables convert returned")
            scale = module.get_variable(QUANT_PARAMS, "output_scale")
            zero_point = module.get_variable(QUANT_PARAMS, "output_zero_point")
        y = refuse_gradient(y, f"'{display_path(path)}' ({what}, static int8)")
        return dequantize(quantize_per_tensor(jnp.asarray(y, jnp.float32), scale, zero_point, dtype))
