"""Dynamic ``nnx.Einsum``: an einsum whose contraction is a matrix product runs as one 2-D dynamic
linear (``jaxquant.nn.dynamic.Linear``).

An equation ``input,kernel->output`` reduces to ``(M, K) @ (K, N)`` when every kernel label is
either *contracted* (in the input, not in the output) or an *output feature* (in the output, not in
the input), and every other input label is carried to the output. ``'...k,kn->...n'`` and
``'BTNH,NHD->BTD'`` are of that kind; ``'BTNH,NHD->BTND'`` (``N`` is a batch label shared by input,
kernel and output) is a batched dot and is refused at conversion with the reason.

At conversion the kernel is permuted to ``(contracted labels in input order, feature labels in
output order)`` and flattened to ``(K, N)``; per call the contracted input axes are moved last (a
no-op when they already are) and the result is transposed to the output order if the equation
interleaves input and feature labels.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from jaxquant.core.grad_guard import refuse_gradient
from jaxquant.nn.dynamic.linear_general import is_int8_linear, matrix_linear

_ELLIPSIS = "..."


def _labels(term: str, equation: str) -> tuple[str, ...]:
    """``'...bk'`` -> ``('...', 'b', 'k')``."""
    if term.count(_ELLIPSIS) > 1:
        raise ValueError(f"einsum '{equation}': more than one '...' in '{term}'")
    head, _, tail = term.partition(_ELLIPSIS)
    out = [*head] + ([_ELLIPSIS] if _ELLIPSIS in term else []) + [*tail]
    for c in out:
        if c != _ELLIPSIS and not c.isalpha():
            raise ValueError(f"einsum '{equation}': '{c}' is not a valid label")
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class MatmulEinsum:
    """How ``input,kernel->output`` maps to ``(M, K) @ (K, N)``; all fields are label tuples
    (``'...'`` stands for the input's leading unnamed axes).

    ``contracted``: in input order; ``features``: in output order; ``kernel``: the kernel's labels.
    """

    equation: str
    inputs: tuple[str, ...]
    kernel: tuple[str, ...]
    output: tuple[str, ...]
    contracted: tuple[str, ...]
    features: tuple[str, ...]

    @classmethod
    def parse(cls, equation: str) -> "MatmulEinsum":
        """Parse and check; raises ``ValueError`` saying why an equation is not a matrix product."""
        eq = equation.replace(" ", "")
        if "->" not in eq or eq.count(",") != 1:
            raise ValueError(f"einsum '{equation}': expected an explicit 'input,kernel->output' equation")
        lhs, out = eq.split("->")
        a, b = lhs.split(",")
        inputs, kernel, output = _labels(a, equation), _labels(b, equation), _labels(out, equation)
        for name, labels in (("input", inputs), ("kernel", kernel), ("output", output)):
            if len(set(labels)) != len(labels):
                raise ValueError(f"einsum '{equation}': repeated label in the {name} term (diagonals are not "
                                 "a matrix product)")
        if _ELLIPSIS in kernel:
            raise ValueError(f"einsum '{equation}': '...' in the kernel term is not supported")
        if (_ELLIPSIS in inputs) != (_ELLIPSIS in output):
            raise ValueError(f"einsum '{equation}': '...' must appear in both the input and the output")
        unknown = set(output) - set(inputs) - set(kernel)
        if unknown:
            raise ValueError(f"einsum '{equation}': output labels {sorted(unknown)} appear in no operand")
        batched = [c for c in kernel if c in inputs and c in output]
        if batched:
            raise ValueError(
                f"einsum '{equation}': labels {batched} are shared by input, kernel and output (a batched "
                "dot, one kernel slice per index), which the 2-D dynamic linear kernel cannot run; exclude "
                "this module from quantize_dynamic (qconfig_spec={path: None})")
        kernel_only = [c for c in kernel if c not in inputs and c not in output]
        input_only = [c for c in inputs if c not in kernel and c not in output]
        if kernel_only or input_only:
            raise ValueError(f"einsum '{equation}': labels {kernel_only + input_only} are summed within one "
                             "operand, which is not a matrix product")
        contracted = tuple(c for c in inputs if c in kernel)
        features = tuple(c for c in output if c in kernel)
        return cls(eq, inputs, kernel, output, contracted, features)


class Einsum(nnx.Module):
    """Dynamically quantized ``nnx.Einsum`` whose equation is a matrix product (see the module doc).

    float input -> float32 output with the shapes ``jnp.einsum(equation, input, kernel)`` gives.
    ``linear`` is the 2-D dynamic linear ``(K, N)``; ``feature_shape`` the sizes of the output
    feature labels in output order.
    """

    def __init__(self, linear: nnx.Module, spec: MatmulEinsum, label_sizes: dict[str, int], name: str = ""):
        self.linear = linear
        self.spec = spec
        self.einsum_str = spec.equation
        self.contracted_shape = tuple(int(label_sizes[c]) for c in spec.contracted)
        self.feature_shape = tuple(int(label_sizes[c]) for c in spec.features)
        self.name = name

    @classmethod
    def from_float(cls, module: nnx.Module, qconfig: Any, path: str = "", *,
                   reduce_range: bool = True, per_token: Optional[bool] = None) -> "Einsum":
        """From an ``nnx.Einsum`` built with its ``einsum_str`` (an equation passed only at call time
        is not known at conversion and is refused)."""
        if not isinstance(module, nnx.Einsum):
            raise TypeError(f"'{path}': expected an nnx.Einsum, got {type(module).__name__}")
        if module.einsum_str is None:
            raise ValueError(f"'{path}': this nnx.Einsum has no einsum_str (it is given per call), so its "
                             "contraction is unknown at conversion; construct it with einsum_str")
        try:
            spec = MatmulEinsum.parse(module.einsum_str)
        except ValueError as e:
            raise ValueError(f"'{path}': cannot dynamically quantize: {e}") from None
        kernel = jnp.asarray(module.kernel.get_value(), jnp.float32)
        if kernel.ndim != len(spec.kernel):
            raise ValueError(f"'{path}': kernel of shape {kernel.shape} does not match the equation's kernel "
                             f"term '{''.join(spec.kernel)}'")
        sizes = dict(zip(spec.kernel, kernel.shape))
        perm = [spec.kernel.index(c) for c in spec.contracted + spec.features]
        k = math.prod(sizes[c] for c in spec.contracted)
        n = math.prod(sizes[c] for c in spec.features)
        kernel2 = jnp.transpose(kernel, perm).reshape(k, n)
        bias = None
        if module.bias is not None:
            # flax broadcasts the bias over the output with the feature labels in output order
            b = jnp.asarray(module.bias.get_value(), jnp.float32)
            if b.size != n:
                raise ValueError(f"'{path}': bias of shape {b.shape} has {b.size} elements, the output "
                                 f"features {spec.features} have {n}")
            bias = b.reshape(n)
        linear = matrix_linear(kernel2, bias, qconfig, path, reduce_range=reduce_range, per_token=per_token)
        return cls(linear, spec, sizes, name=path)

    def __call__(self, x: jax.Array, einsum_str: Optional[str] = None, out_sharding: Any = None) -> jax.Array:
        """float ``x`` (labels of the equation's input term) -> float32 (its output term)."""
        spec = self.spec
        if einsum_str is not None and einsum_str.replace(" ", "") != spec.equation:
            raise ValueError(f"dynamic Einsum '{self.name}': was quantized for '{spec.equation}', called with "
                             f"'{einsum_str}'; the kernel layout is fixed at conversion")
        if out_sharding is not None:
            raise NotImplementedError(f"dynamic Einsum '{self.name}': out_sharding is not supported")
        x = jnp.asarray(x)
        if is_int8_linear(self.linear):  # float16/bfloat16 weights keep their (meaningful) gradients
            x = refuse_gradient(x, f"dynamic Einsum '{self.name}'")
        named = len(spec.inputs) - (_ELLIPSIS in spec.inputs)
        if x.ndim < named or (_ELLIPSIS not in spec.inputs and x.ndim != named):
            raise ValueError(f"dynamic Einsum '{self.name}': input of shape {x.shape} does not match "
                             f"'{''.join(spec.inputs)}' in '{spec.equation}'")
        # expand '...' into concrete placeholder labels for this rank
        extra = tuple(f"...{i}" for i in range(x.ndim - named))

        def expand(labels):
            out = []
            for c in labels:
                out.extend(extra if c == _ELLIPSIS else (c,))
            return tuple(out)

        inputs, output = expand(spec.inputs), expand(spec.output)
        got = tuple(x.shape[inputs.index(c)] for c in spec.contracted)
        if got != self.contracted_shape:
            raise ValueError(f"dynamic Einsum '{self.name}': contracted labels {spec.contracted} have sizes "
                             f"{got}, the kernel expects {self.contracted_shape}")
        free = tuple(c for c in inputs if c not in spec.contracted)
        order = [inputs.index(c) for c in free + spec.contracted]
        if order != list(range(x.ndim)):
            x = jnp.transpose(x, order)
        lead = x.shape[:len(free)]
        y = self.linear(x.reshape(*lead, math.prod(self.contracted_shape)))
        y = y.reshape(*lead, *self.feature_shape)
        have = free + spec.features
        perm = [have.index(c) for c in output]
        return y if perm == list(range(y.ndim)) else jnp.transpose(y, perm)

    def __repr__(self) -> str:
        return f"DynamicEinsum('{self.spec.equation}', linear={self.linear!r})"
