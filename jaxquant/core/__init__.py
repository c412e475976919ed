"""The frontend-neutral layer between the kernels and the front ends (``nn/``, ``linen/``, ``graph/``):
conv geometry (:mod:`jaxquant.core.conv`) and the gradient guard of int8 models
(:mod:`jaxquant.core.grad_guard`). See DESIGN.md's layer table."""
