"""Tools for quantized models: size accounting, numeric debugging, summaries."""
from jaxquant.tools.size import model_arrays, model_size_bytes
