"""Tools for quantized models: size accounting and array export."""
from jaxquant.tools.size import model_arrays, model_size_bytes, save_arrays_npz
