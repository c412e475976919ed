"""int8 kernels: per primitive, pack the weight once (at convert), then ONE op per call.

Every front end (NNX modules, ``jaxquant.linen``, graph mode, the sharding helpers) and every
backend plugs in here. What depends only on the weight is packed once; the input's qparams travel
with the input :class:`~jaxquant.qtensor.QTensor` and the O(out_channels) terms that depend on them
are folded per call inside the fused epilogue, in fbgemm's float32 order
(:mod:`jaxquant.kernels.requantize`), which is what PyTorch's x86 engine computes.

Linear (:mod:`jaxquant.kernels.linear`)::

    pack_linear(w_int8 (K, N) int8, w_scale f32 () | (N,), w_zero_point i32 () | (N,),
                bias f32 (N,) | None = None, *, layouts="both", act_lhs_kn=False) -> PackedLinear
    quantized_linear(x: QTensor (..., K) u8/s8 per tensor, packed: PackedLinear,
                     out_scale f32 (), out_zero_point i32 (), *, out_dtype: QDType (quint8 | qint8),
                     relu=False, layout=None, reduce_accumulator=None) -> QTensor (..., N)
    quantized_linear_dynamic(x f32 (..., K), packed: PackedLinear, *, reduce_range=True,
                             per_token=False, relu=False, layout=None) -> f32 (..., N)

Convolution, 1-D/2-D/3-D, channels last, grouped/depthwise (:mod:`jaxquant.kernels.conv`)::

    pack_conv(w_int8 (k..., cin/groups, cout) int8, w_scale, w_zero_point, bias (cout,) | None = None,
              *, strides=1, padding="VALID" | ((lo, hi), ...), dilation=1, groups=1,
              input_dilation=1, act_lhs_kn=False) -> PackedConv
    quantized_conv(x: QTensor (N, *spatial, cin), packed: PackedConv, out_scale, out_zero_point, *,
                   out_dtype: QDType, relu=False) -> QTensor (N, *out_spatial, cout)

Transposed convolution, PyTorch's ``ConvTranspose{1,2,3}d`` semantics (same module)::

    pack_conv_transpose(w_int8 (k..., cin, cout/groups) int8, w_scale, w_zero_point, bias=None, *,
                        strides=1, padding=0, output_padding=0, dilation=1, groups=1) -> PackedConv
    quantized_conv_transpose(x: QTensor, packed, out_scale, out_zero_point, *, out_dtype,
                             relu=False) -> QTensor
    (``lax.conv_transpose``'s explicit form is ``pack_conv(..., strides=1, padding=pads,
    input_dilation=strides)``; ``jaxquant.linen`` uses that.)

Einsum with an int8 kernel (:mod:`jaxquant.kernels.einsum`)::

    pack_einsum(equation "in,kernel->out", w_int8, w_scale () | (C,), w_zero_point, bias=None)
        -> PackedEinsum
    quantized_einsum(x: QTensor, packed: PackedEinsum, out_scale, out_zero_point, *, out_dtype,
                     relu=False) -> QTensor

Max pooling of quantized data (:mod:`jaxquant.kernels.pooling`; the 2-D modules call it)::

    quantized_max_pool2d(data u8/s8 (N, H, W, C), kernel (kh, kw), stride (sh, sw), padding (ph, pw))
        -> (N, OH, OW, C)

Building blocks: :func:`~jaxquant.kernels.mixed_dot.dot_general_u8s8` (the u8 x s8 -> s32 dot
primitive, the only integer dot that reaches XLA:CPU's VNNI kernels),
:func:`~jaxquant.kernels.linear.int8_matmul_acc` (zero-point-corrected int32 accumulator),
:func:`~jaxquant.kernels.requantize.requantize` / ``dequantize_accumulator`` (epilogues).

Packing inside a traced function (Linen's ``apply`` packs its stored ``(K, N)`` kernel per call):
pass ``act_lhs_kn=True`` so the weight is contracted as stored; a transpose there would be folded
into the dot by XLA, which then upcasts both operands to s32 (checked on the compiled HLO in
``tests/linen/test_linen_int8_hlo.py``).
"""
from jaxquant.kernels.conv import (PackedConv, pack_conv, pack_conv_transpose, quantized_conv,
                                   quantized_conv_transpose)
from jaxquant.kernels.einsum import PackedEinsum, pack_einsum, quantized_einsum
from jaxquant.kernels.linear import PackedLinear, pack_linear, quantized_linear, quantized_linear_dynamic

__all__ = [
    "PackedLinear", "pack_linear", "quantized_linear", "quantized_linear_dynamic",
    "PackedConv", "pack_conv", "quantized_conv", "pack_conv_transpose", "quantized_conv_transpose",
    "PackedEinsum", "pack_einsum", "quantized_einsum",
]
