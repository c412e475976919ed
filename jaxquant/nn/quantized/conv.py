"""Static int8 ``Conv`` (1-D/2-D/3-D, grouped, depthwise; and ``ConvReLU``) over NHWC QTensors.

The kernel formulation (1x1 dot, im2col + u8 x s8 dot, depthwise tap loop, grouped dot) is chosen
from the static shapes at convert time by :func:`jaxquant.kernels.conv.pack_conv`; the few
per-channel terms that depend on the input's qparams are folded per call (O(out_channels)) by
:func:`jaxquant.kernels.conv.quantized_conv`.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from jaxquant.core.conv import conv_padding, spatial_tuple as _spatial_tuple
from jaxquant.dtypes import QDType
from jaxquant.kernels.conv import clamp_codes, pack_conv, quantized_conv
from jaxquant.nn.intrinsic import ConvReLU
from jaxquant.nn.quantized.common import Int8WeightLayer, require_qtensor, weight_layer_source
from jaxquant.nn.variables import QuantCache, refresh_cache, seal_cache
from jaxquant.qtensor import QTensor


class Conv(Int8WeightLayer):
    """Quantized ``nnx.Conv``: NHWC QTensor ``(N, *spatial, C_in)`` -> QTensor ``(N, *out_spatial, C_out)``."""

    def __init__(self, weight: QTensor, bias: Optional[jax.Array], out_scale: jax.Array,
                 out_zero_point: jax.Array, out_dtype: QDType, *, strides, padding, dilation,
                 groups: int, relu: bool = False, name: str = "", clamp: Optional[tuple[float, float]] = None):
        nd = weight.ndim - 2
        out_channels = weight.shape[-1]
        w_scale, w_zero_point = weight.channel_qparams()
        self.params = QuantCache(pack_conv(
            weight.int_data, jnp.broadcast_to(w_scale, (out_channels,)).astype(jnp.float32), w_zero_point, None if bias is None else jnp.asarray(bias, jnp.float32),
            strides=_spatial_tuple(strides, nd), padding=padding, dilation=_spatial_tuple(dilation, nd),
            groups=groups))
        self._set_weight_and_output(weight, bias, out_scale, out_zero_point, out_dtype, relu, name)
        # Real bounds of a clip that follows this conv (a ReLU6 folded in by
        # jq.fuse_quantized_activations), applied to the output codes; None: no clip.
        self.clamp = None if clamp is None else (float(clamp[0]), float(clamp[1]))
        seal_cache(self)

    @classmethod
    def from_observed(cls, observed, path: str) -> "Conv":
        """From an ``Observed`` ``nnx.Conv`` / ``ConvReLU`` or a QAT ``Conv`` / ``ConvReLU`` / ``ConvBn`` /
        ``ConvBnReLU`` (BatchNorm folded with its running statistics, as PyTorch's convert does)."""
        conv, weight, bias, (out_scale, out_zp, out_dtype), relu = weight_layer_source(observed, path, "conv",
                                                                                      ConvReLU)
        if conv.input_dilation not in (None, 1) and set(_spatial_tuple(conv.input_dilation, 1)) != {1}:
            raise ValueError(f"'{path}': input_dilation has no int8 kernel; keep this conv float (qconfig=None)")
        if getattr(conv, "mask", None) is not None:
            raise ValueError(f"'{path}': masked convolutions have no int8 kernel; keep this conv float")
        return cls(weight, bias, out_scale, out_zp, out_dtype, strides=conv.strides,
                   padding=conv_padding(conv, path), dilation=conv.kernel_dilation,
                   groups=conv.feature_group_count, relu=relu, name=path)

    def rebuild_cache(self) -> "Conv":
        """A new module built from this one's defining arrays (recomputes the packed kernel)."""
        p = self.params.get_value()
        return Conv(self.weight(), self.bias.get_value(), self.out_scale.get_value(),
                    self.out_zero_point.get_value(), self.out_dtype, strides=p.strides, padding=p.padding,
                    dilation=p.dilation, groups=p.groups, relu=self.relu, name=self.name,
                    clamp=getattr(self, "clamp", None))

    def __call__(self, x) -> QTensor:
        x = require_qtensor(x, self.name, "quantized Conv")
        refresh_cache(self, self.name)  # loaded QuantParams (nnx.update): repack, or say why not
        out_scale, out_zero_point = self.out_scale.get_value(), self.out_zero_point.get_value()
        bounds = getattr(self, "clamp", None)
        clamp = None if bounds is None else clamp_codes(*bounds, out_scale, out_zero_point)
        return quantized_conv(x, self.params.get_value(), out_scale, out_zero_point, out_dtype=self.out_dtype,
                              relu=self.relu, clamp=clamp)
