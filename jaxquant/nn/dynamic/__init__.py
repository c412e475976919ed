"""Dynamically quantized modules (``torch.ao.nn.quantized.dynamic`` and the weight-only
``quantized.Embedding``): float32 in, float32 out, weights stored in int8 / float16 / bfloat16."""
from jaxquant.nn.dynamic.einsum import Einsum
from jaxquant.nn.dynamic.embedding import Embedding
from jaxquant.nn.dynamic.float16 import BFloat16Linear, Float16Linear
from jaxquant.nn.dynamic.linear import Linear
from jaxquant.nn.dynamic.linear_general import LinearGeneral
from jaxquant.nn.dynamic.rnn import RNN, GRUCell, LSTMCell, OptimizedLSTMCell

__all__ = ["Linear", "LinearGeneral", "Einsum", "Float16Linear", "BFloat16Linear", "LSTMCell", "OptimizedLSTMCell", "RNN",
           "GRUCell", "Embedding"]
