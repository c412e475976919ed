"""ONNX export of a static int8 model in QDQ form, for onnxruntime and other ONNX back ends.

Each quantized op becomes ``DequantizeLinear -> float op -> QuantizeLinear`` with int8 weight
initializers (per-channel scales on axis 0), int32 biases in the accumulator's scale
(``x_scale * w_scale``, zero point 0; a bias that int32 cannot hold faithfully there stays float,
see ``_bias_dq``) and the static activation scales/zero points: the pattern onnxruntime fuses into
``QLinearConv``/``QGemm``. jaxquant's activations are NHWC and ONNX's Conv
and pooling are NCHW: the exporter tracks each tensor's layout and inserts ``Transpose`` nodes only
where an op needs the other one (so Conv/Pool chains stay NCHW and a Flatten sees NHWC order).

The graph is recorded by running the model once on ``example_input`` with every module wrapped
(:func:`jaxquant.tools.numeric_debugger.record_calls`), so the model's forward must be a chain of
modules: a value computed between modules in plain ``jnp`` code is reported, not silently dropped.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Optional, Union

import numpy as np
from flax import nnx

from jaxquant.module_paths import copy_model, named_modules
import jaxquant.nn as jqnn
from jaxquant.nn.quantized.conv import Conv
from jaxquant.nn.quantized.dropout import Dropout as QDropout
from jaxquant.nn.quantized.linear import Linear
from jaxquant.nn.quantized.stubs import DeQuantize, Quantize
from jaxquant.optional_deps import require
from jaxquant.qtensor import QTensor
from jaxquant.tools.numeric_debugger import record_calls

OPSET = 17
_NHWC_TO_NCHW = (0, 3, 1, 2)
_NCHW_TO_NHWC = (0, 2, 3, 1)


class _Graph:
    def __init__(self, onnx):
        self.onnx = onnx
        self.nodes, self.initializers = [], []
        self.values: dict[int, dict] = {}  # id(python value) -> {"name", "layout", "qparams"}
        self.keep_alive: list[Any] = []
        self._count = 0

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}".replace(".", "_")

    def const(self, hint: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self.name(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], hint: str, **attrs) -> str:
        out = self.name(hint)
        self.nodes.append(self.onnx.helper.make_node(op, inputs, [out], name=out + "_node", **attrs))
        return out

    def bind(self, value: Any, name: str, layout: str, qparams=None) -> None:
        self.keep_alive.append(value)
        self.values[id(value)] = {"name": name, "layout": layout, "qparams": qparams}

    def lookup(self, value: Any, path: str) -> dict:
        entry = self.values.get(id(value))
        if entry is None:
            raise NotImplementedError(
                f"export_onnx: the input of '{path}' was computed outside any module (plain jnp code in a "
                "forward); ONNX export records module calls only: wrap that computation in a module")
        return entry

    def in_layout(self, value: Any, path: str, layout: str) -> str:
        """The tensor's name in ``layout`` ("nhwc" or "nchw"), adding a Transpose if needed."""
        entry = self.lookup(value, path)
        if entry["layout"] == layout or len(getattr(value, "shape", ())) != 4:
            return entry["name"]
        perm = _NHWC_TO_NCHW if layout == "nchw" else _NCHW_TO_NHWC
        return self.node("Transpose", [entry["name"]], f"{path}_to_{layout}", perm=list(perm))

    def qparams_of(self, q: QTensor, hint: str) -> tuple[str, str]:
        scale = self.const(hint + "_scale", np.asarray(q.scale, np.float32).reshape(()))
        zp = self.const(hint + "_zp", np.asarray(q.zero_point).astype(q.dtype.storage).reshape(()))
        return scale, zp


def _dequantized(g: _Graph, value: Any, path: str, layout: str) -> str:
    name = g.in_layout(value, path, layout)
    if isinstance(value, QTensor):
        scale, zp = g.qparams_of(value, path + "_in")
        return g.node("DequantizeLinear", [name, scale, zp], path + "_dq")
    return name


def _quantize_output(g: _Graph, float_name: str, out: Any, path: str, layout: str) -> None:
    if isinstance(out, QTensor):
        scale, zp = g.qparams_of(out, path + "_out")
        g.bind(out, g.node("QuantizeLinear", [float_name, scale, zp], path + "_q"), layout)
    else:
        g.bind(out, float_name, layout)


def _weight_dq(g: _Graph, module, w: np.ndarray, path: str) -> str:
    """DequantizeLinear of an int8 weight whose output channels are on axis 0."""
    scale = np.asarray(module.weight_scale.get_value(), np.float32)
    zp = np.asarray(module.weight_zero_point.get_value()).astype(np.int8)
    per_channel = module.weight_qscheme.is_per_channel
    if not per_channel:
        scale, zp = scale[:1].reshape(()), zp[:1].reshape(())
    inputs = [g.const(path + "_w", w.astype(np.int8)), g.const(path + "_w_scale", scale), g.const(path + "_w_zp", zp)]
    return g.node("DequantizeLinear", inputs, path + "_w_dq", **({"axis": 0} if per_channel else {}))


_INT32_MAX = 2 ** 31 - 1


def _bias_dq(g: _Graph, module, x: QTensor, path: str, out_channels: int,
             contraction: int) -> tuple[list[str], Optional[np.ndarray]]:
    """The bias of a Conv/Gemm: ``([DequantizeLinear of the int32 bias], None)`` when int32 in the
    accumulator's scale is exact enough, else ``([], float bias)`` for a separate ``Add``.

    onnxruntime fuses DequantizeLinear(int32 bias, x_scale * w_scale) into QLinearConv/QGemm and
    adds it to the int32 accumulator. That is only faithful when ``bias / (x_scale * w_scale)``
    rounds to an int32 that leaves room for the accumulator (at most ``contraction * 255 * 128``
    in magnitude) and whose rounding error is below a hundredth of the output's quantization step.
    With small activations and a large bias it is not (the quotient overflows and would clip
    silently); then the float bias is added by its own ``Add`` node after the Conv/Gemm, which is
    exact (jaxquant adds the float bias too) at the cost of onnxruntime running that layer in float.
    (A float bias given as the Conv/Gemm's own bias input is not enough: onnxruntime 1.2x's QDQ
    fusion then drops it.)
    """
    bias = module.bias.get_value()
    if bias is None:
        return [], None
    bias = np.broadcast_to(np.asarray(bias, np.float32), (out_channels,))
    acc_scale = (np.float32(x.q_scale()) * np.asarray(module.weight_scale.get_value(), np.float32)).astype(np.float32)
    acc_scale = np.broadcast_to(acc_scale, (out_channels,)).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        quotient = np.asarray(bias, np.float64) / acc_scale.astype(np.float64)
        room = _INT32_MAX - contraction * 255 * 128
        fits = bool(np.all(np.isfinite(quotient)) and np.all(acc_scale > 0)
                    and np.all(np.abs(quotient) <= room))
        out_step = float(np.min(np.asarray(module.out_scale.get_value(), np.float64)))
        if fits:
            q = np.round(quotient)
            error = np.abs(q * acc_scale.astype(np.float64) - bias.astype(np.float64))
            fits = bool(np.all(error <= 0.01 * out_step))
    if not fits:
        return [], np.ascontiguousarray(bias, np.float32)
    inputs = [g.const(path + "_b", q.astype(np.int32)), g.const(path + "_b_scale", acc_scale),
              g.const(path + "_b_zp", np.zeros(out_channels, np.int32))]
    return [g.node("DequantizeLinear", inputs, path + "_b_dq", axis=0)], None


def _conv(g, path, module, x, out):
    p = module.params.get_value()
    if len(p.kernel_size) != 2:
        raise NotImplementedError(f"export_onnx: '{path}' is a {len(p.kernel_size)}-D conv; only 2-D is exported")
    h, w = x.shape[1:3]
    if p.padding == "VALID":
        pads = [0, 0, 0, 0]
    elif p.padding == "SAME":
        pads_hw = []
        for size, k, s, d in zip((h, w), p.kernel_size, p.strides, p.dilation):
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads_hw.append((total // 2, total - total // 2))
        pads = [pads_hw[0][0], pads_hw[1][0], pads_hw[0][1], pads_hw[1][1]]
    else:
        (t, b), (l, r) = p.padding
        pads = [t, l, b, r]
    w_int = np.asarray(module.weight_int8.get_value()).transpose(3, 2, 0, 1)  # (cout, cin/g, kh, kw)
    inputs = [_dequantized(g, x, path, "nchw"), _weight_dq(g, module, w_int, path)]
    bias, float_bias = _bias_dq(g, module, x, path, w_int.shape[0], int(np.prod(w_int.shape[1:])))
    y = g.node("Conv", inputs + bias, path + "_conv", kernel_shape=list(p.kernel_size),
               strides=list(p.strides), dilations=list(p.dilation), group=int(p.groups), pads=pads)
    if float_bias is not None:
        y = g.node("Add", [y, g.const(path + "_b", float_bias.reshape(-1, 1, 1))], path + "_bias")
    if module.relu:
        y = g.node("Relu", [y], path + "_relu")
    _quantize_output(g, y, out, path, "nchw")


def _linear(g, path, module, x, out):
    w_t = np.asarray(module.weight_int8.get_value()).T  # (out, in): Gemm transB
    xin = _dequantized(g, x, path, "nhwc")
    bias, float_bias = _bias_dq(g, module, x, path, w_t.shape[0], w_t.shape[1])
    if len(x.shape) == 2:
        y = g.node("Gemm", [xin, _weight_dq(g, module, w_t, path)] + bias, path + "_gemm", transB=1)
    else:
        w_dq = _weight_dq(g, module, w_t, path)
        y = g.node("MatMul", [xin, g.node("Transpose", [w_dq], path + "_wT", perm=[1, 0])], path + "_matmul")
        if bias:
            y = g.node("Add", [y] + bias, path + "_bias")
    if float_bias is not None:
        y = g.node("Add", [y, g.const(path + "_b", float_bias)], path + "_bias")
    if module.relu:
        y = g.node("Relu", [y], path + "_relu")
    _quantize_output(g, y, out, path, "nhwc")


def _pool(op: str):
    def handler(g, path, module, x, out):
        k = module.kernel_size
        k = (k, k) if isinstance(k, int) else tuple(k)
        s = module.stride if module.stride is not None else k
        s = (s, s) if isinstance(s, int) else tuple(s)
        pad = (module.padding, module.padding) if isinstance(module.padding, int) else tuple(module.padding)
        attrs = dict(kernel_shape=list(k), strides=list(s), pads=[pad[0], pad[1], pad[0], pad[1]])
        if op == "AveragePool":
            attrs["count_include_pad"] = 1
        y = g.node(op, [_dequantized(g, x, path, "nchw")], path + "_" + op.lower(), **attrs)
        _quantize_output(g, y, out, path, "nchw")
    return handler


def _elementwise(op: str):
    def handler(g, path, module, x, out):
        entry = g.lookup(x, path)
        layout = entry["layout"]
        y = g.node(op, [_dequantized(g, x, path, layout)], path + "_" + op.lower())
        _quantize_output(g, y, out, path, layout)
    return handler


def _flatten(g, path, module, x, out):
    ndim = len(x.shape)
    if module.end_axis % ndim != ndim - 1:
        raise NotImplementedError(f"export_onnx: '{path}': Flatten with end_axis={module.end_axis} is not exported")
    name = g.in_layout(x, path, "nhwc")  # jaxquant flattens NHWC order
    g.bind(out, g.node("Flatten", [name], path + "_flatten", axis=module.start_axis % ndim), "nhwc")


def _alias(g, path, module, x, out):
    entry = g.lookup(x, path)
    g.bind(out, entry["name"], entry["layout"])


def _quantize(g, path, module, x, out):
    name = g.lookup(x, path)["name"]
    scale, zp = g.qparams_of(out, path)
    g.bind(out, g.node("QuantizeLinear", [name, scale, zp], path + "_q"), g.lookup(x, path)["layout"])


def _dequantize(g, path, module, x, out):
    entry = g.lookup(x, path)
    if isinstance(x, QTensor):
        scale, zp = g.qparams_of(x, path)
        g.bind(out, g.node("DequantizeLinear", [entry["name"], scale, zp], path + "_dq"), entry["layout"])
    else:
        g.bind(out, entry["name"], entry["layout"])


def _handlers() -> dict[type, Callable]:
    return {Quantize: _quantize, DeQuantize: _dequantize, Conv: _conv, Linear: _linear,
            jqnn.MaxPool2d: _pool("MaxPool"), jqnn.AvgPool2d: _pool("AveragePool"),
            jqnn.ReLU: _elementwise("Relu"), jqnn.Flatten: _flatten, jqnn.Identity: _alias,
            nnx.Dropout: _alias, QDropout: _alias}


def export_onnx(model: nnx.Module, example_input: Any, path: Union[str, os.PathLike, None] = None,
                *, opset: int = OPSET, dynamic_batch: bool = True):
    """Export a converted static int8 model to ONNX (QDQ form).

    Args:
      model: an int8 model from ``convert`` whose forward is a chain of jaxquant modules (Quantize,
        quantized Conv/Linear with fused ReLU, MaxPool2d/AvgPool2d, ReLU, Flatten, Identity,
        Dropout, DeQuantize). It is run once on ``example_input`` (in eval mode, on a copy).
      example_input: float32 input, e.g. ``(N, 28, 28, 1)`` NHWC; the ONNX input keeps this layout.
      path: where to write the ``.onnx`` file (optional).
      opset: ONNX opset (>= 13 for per-channel DequantizeLinear).
      dynamic_batch: name the first input/output axis ``N`` instead of fixing it.
    Returns:
      The ``onnx.ModelProto`` (also saved to ``path`` if given).
    Raises:
      NotImplementedError: a module type with no ONNX translation, naming its path.
      ModuleNotFoundError: ``onnx`` is not installed (``pip install 'jaxquant[onnx]'``).
    """
    import jax.numpy as jnp

    onnx = require("onnx", "onnx", "export_onnx")
    handlers = _handlers()
    model = copy_model(model)
    model.eval()
    modules = dict(named_modules(model))
    handled = [p for p, m in modules.items() if p and type(m) in handlers]
    inside_handled = lambda p: any(p.startswith(h + ".") for h in handled)
    # Record handled modules and unhandled leaves (reported below); containers are just routing.
    record = {p for p in modules if p and not inside_handled(p) and
              (p in handled or not any(q.startswith(p + ".") for q in modules))}
    x = np.asarray(example_input, np.float32)
    x_jax = jnp.asarray(x)
    with record_calls(model, include=lambda p, m: p in record) as (recording, log):
        result = recording(x_jax)
    g = _Graph(onnx)
    g.bind(x_jax, "input", "nhwc")
    for call in log.calls:
        handler = handlers.get(type(call.module))
        if handler is None:
            raise NotImplementedError(f"export_onnx: '{call.path}' is a {type(call.module).__qualname__}, which has "
                                      "no ONNX translation; supported: " + ", ".join(sorted(t.__name__ for t in handlers)))
        if len(call.args) != 1 or call.kwargs:
            raise NotImplementedError(f"export_onnx: '{call.path}' was called with {len(call.args)} positional and "
                                      f"{len(call.kwargs)} keyword arguments; only single-input modules are exported")
        handler(g, call.path, call.module, call.args[0], call.output)
    if isinstance(result, QTensor):
        raise TypeError("export_onnx: the model returns a quantized tensor; end it with a DeQuantStub")
    out_name = g.in_layout(result, "output", "nhwc")
    g.nodes.append(onnx.helper.make_node("Identity", [out_name], ["output"], name="output_node"))
    batch = "N" if dynamic_batch else x.shape[0]
    out_shape = [batch, *np.shape(result)[1:]]
    graph = onnx.helper.make_graph(
        g.nodes, "jaxquant_int8",
        [onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [batch, *x.shape[1:]])],
        [onnx.helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, out_shape)],
        initializer=g.initializers)
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)],
                                   producer_name="jaxquant")
    proto.ir_version = min(proto.ir_version, 10)
    onnx.checker.check_model(proto)
    if path is not None:
        onnx.save(proto, os.fspath(path))
    return proto
