"""Test-session setup shared by every test.

XLA's LLVM backend at optimisation level 0 compiles several times faster, and this suite is
dominated by compile time (hundreds of small, differently shaped programs). Numerics do not depend
on it: no fast-math at any level, and the code that needs a particular float rounding order
(``jaxquant.torch_numerics``) pins it explicitly. Benchmarks and examples keep XLA's defaults.
"""
import os

if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
