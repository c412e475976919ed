"""The frontend-neutral layer between the kernels and the front ends (``nn/``, ``linen/``, ``graph/``):
conv geometry (:mod:`jaxquant.core.conv`). See DESIGN.md's layer table."""
