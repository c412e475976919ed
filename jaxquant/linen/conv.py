"""Float and int8 forward passes of ``nn.Conv`` (1-D/2-D/3-D, grouped, depthwise) and
``nn.ConvTranspose``, channels last.

The int8 convolution is :func:`jaxquant.kernels.conv.quantized_conv` (im2col / 1x1 dot / depthwise taps /
grouped dot chosen from the static shapes), the arithmetic of :class:`jaxquant.nn.quantized.Conv`.
A transposed convolution is run as JAX's ``lax.conv_transpose`` defines it: the input dilated by the
strides (filled with the input zero point, i.e. real 0), padded, and convolved at stride 1.
"""
from __future__ import annotations

import types
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxquant.core.conv import conv_padding, conv_with_kernel
from jaxquant.core.conv import spatial_tuple as _tuple
from jaxquant.dtypes import QDType
from jaxquant.kernels.conv import pack_conv, quantized_conv
from jaxquant.qtensor import QTensor


def conv_geometry(module: Any) -> types.SimpleNamespace:
    """The attributes of a Linen ``nn.Conv`` in the normalised form the NNX helpers read."""
    ks = module.kernel_size
    ks = (ks,) if isinstance(ks, int) else tuple(ks)
    nd = len(ks)
    return types.SimpleNamespace(
        kernel_size=ks, strides=_tuple(module.strides, nd), input_dilation=_tuple(getattr(module, "input_dilation", 1), nd),
        kernel_dilation=_tuple(module.kernel_dilation, nd), padding=module.padding,
        feature_group_count=getattr(module, "feature_group_count", 1), mask=module.mask, precision=module.precision)


def _batched(x: jax.Array, nd: int) -> tuple[jax.Array, tuple[int, ...]]:
    """``(*batch, *spatial, C)`` -> ``(N, *spatial, C)`` and the batch shape (``()`` if unbatched)."""
    batch = x.shape[:x.ndim - (nd + 1)]
    return x.reshape((-1,) + x.shape[x.ndim - (nd + 1):]), batch


def _batched_int8(xq: QTensor, packed: Any, qp: dict, out_dtype: QDType) -> QTensor:
    """:func:`jaxquant.kernels.conv.quantized_conv` over ``(*batch, *spatial, C)`` (Linen allows any
    number of batch dims, or none)."""
    x, batch = _batched(xq.int_data, len(packed.kernel_size))
    y = quantized_conv(QTensor(x, xq.scale, xq.zero_point, xq.dtype), packed, qp["output_scale"],
                       qp["output_zero_point"], out_dtype=out_dtype)
    return QTensor(y.int_data.reshape(batch + y.shape[1:]), y.scale, y.zero_point, y.dtype)


class ConvLayer:
    """``nn.Conv``: kernel ``(*k, C_in/groups, C_out)``, bias ``(C_out,)``."""

    kernel_name = "kernel"
    supports_dynamic = False

    def float_apply(self, module: Any, x: jax.Array, kernel: jax.Array, bias: Optional[jax.Array]) -> jax.Array:
        y = conv_with_kernel(conv_geometry(module), x, kernel)
        return y if bias is None else y + bias

    def stored_kernel(self, module: Any, kernel: jax.Array) -> jax.Array:
        return kernel

    def check_module(self, module: Any, path: str) -> None:
        g = conv_geometry(module)
        if set(g.input_dilation) != {1}:
            raise ValueError(f"'{path}': input_dilation has no int8 kernel; keep this conv float (qconfig None)")
        if g.mask is not None:
            raise ValueError(f"'{path}': masked convolutions have no int8 kernel; keep this conv float (qconfig None)")
        conv_padding(g, path)

    def int8_apply(self, module: Any, path: str, xq: QTensor, qp: dict, out_dtype: QDType) -> QTensor:
        g = conv_geometry(module)
        self.check_module(module, path)
        packed = pack_conv(qp["weight_int"], qp["weight_scale"], qp["weight_zero_point"], qp.get("bias"),
                           strides=g.strides, padding=conv_padding(g, path), dilation=g.kernel_dilation,
                           groups=g.feature_group_count, act_lhs_kn=True, native_weight=qp.get("native_conv"))
        return _batched_int8(xq, packed, qp, out_dtype)

    def native_packer(self, module: Any) -> Callable[[dict], dict]:
        """``pack(quant_params) -> {"native_conv": blob}`` (or ``{}``), run by ``convert`` on the concrete
        int8 weight: the oneDNN layout that :func:`pack_conv` builds for a symmetric weight when the
        native backend is on (the geometry is read now, while ``module`` is bound)."""
        g = conv_geometry(module)

        def pack(qp: dict) -> dict:
            w = qp["weight_int"]
            if w.ndim != len(g.kernel_size) + 2:  # stacked by nn.scan / nn.vmap: stays on XLA
                return {}
            blob = pack_conv(w, qp["weight_scale"], qp["weight_zero_point"], qp.get("bias"), strides=g.strides,
                             dilation=g.kernel_dilation, groups=g.feature_group_count).native_weight
            return {} if blob is None else {"native_conv": blob}
        return pack


def conv_transpose_padding(k: int, s: int, padding: Any) -> tuple[int, int]:
    """Before/after padding of one spatial dim of ``lax.conv_transpose`` (JAX's rule for 'SAME'/'VALID')."""
    if padding == "SAME":
        pad_len = k + s - 2
        pad_a = k - 1 if s > k - 1 else int(np.ceil(pad_len / 2))
    elif padding == "VALID":
        pad_len = k + s - 2 + max(k - s, 0)
        pad_a = k - 1
    else:
        raise ValueError(f"invalid padding {padding!r}")
    return pad_a, pad_len - pad_a


class ConvTransposeLayer:
    """``nn.ConvTranspose``. The stored kernel is the forward-conv kernel ``(*k, C_in, C_out)`` that
    ``lax.conv_transpose`` convolves the dilated input with (flipped and swapped when
    ``transpose_kernel=True``)."""

    kernel_name = "kernel"
    supports_dynamic = False

    def stored_kernel(self, module: Any, kernel: jax.Array) -> jax.Array:
        if module.transpose_kernel:
            nd = kernel.ndim - 2
            kernel = jnp.swapaxes(jnp.flip(kernel, axis=tuple(range(nd))), -1, -2)
        return kernel

    def _pads(self, module: Any, path: str, ks: tuple[int, ...]):
        from flax.linen.linear import canonicalize_padding

        nd = len(ks)
        padding = canonicalize_padding(module.padding, nd)
        if padding == "CIRCULAR":
            raise ValueError(f"'{path}': CIRCULAR padding has no int8 kernel; keep this ConvTranspose float (qconfig None)")
        dil = _tuple(module.kernel_dilation, nd)
        strides = _tuple(module.strides, nd)
        eff = [(k - 1) * d + 1 for k, d in zip(ks, dil)]
        if isinstance(padding, str):
            pads = tuple(conv_transpose_padding(k, s, padding) for k, s in zip(eff, strides))
        else:
            pads = tuple((int(lo), int(hi)) for lo, hi in padding)
        return pads, strides, dil

    def check_module(self, module: Any, path: str) -> None:
        if module.mask is not None:
            raise ValueError(f"'{path}': masked transposed convolutions have no int8 kernel; keep it float (qconfig None)")
        ks = module.kernel_size
        self._pads(module, path, (ks,) if isinstance(ks, int) else tuple(ks))

    def float_apply(self, module: Any, x: jax.Array, kernel: jax.Array, bias: Optional[jax.Array]) -> jax.Array:
        nd = kernel.ndim - 2
        pads, strides, dil = self._pads(module, "", kernel.shape[:nd])
        xb, batch = _batched(x, nd)
        # ``kernel`` is in the stored (forward-conv) layout, see stored_kernel
        y = lax.conv_transpose(xb, kernel, strides, pads, rhs_dilation=dil, transpose_kernel=False,
                               precision=module.precision)
        y = y.reshape(batch + y.shape[1:])
        return y if bias is None else y + bias

    def int8_apply(self, module: Any, path: str, xq: QTensor, qp: dict, out_dtype: QDType) -> QTensor:
        w = qp["weight_int"]
        pads, strides, dil = self._pads(module, path, w.shape[:w.ndim - 2])
        # lax.conv_transpose: the input dilated by the strides (zero-point pixels), padded, stride-1 conv
        packed = pack_conv(w, qp["weight_scale"], qp["weight_zero_point"], qp.get("bias"), strides=1, padding=pads,
                           dilation=dil, input_dilation=strides, act_lhs_kn=True)
        return _batched_int8(xq, packed, qp, out_dtype)
