"""Test-session setup shared by every test.

XLA's LLVM backend at optimisation level 0 compiles several times faster, and this suite is
dominated by compile time (hundreds of small, differently shaped programs). Numerics do not depend
on it: no fast-math at any level, and the code that needs a particular float rounding order
(``jaxquant.torch_numerics``) pins it explicitly. Benchmarks and examples keep XLA's defaults.
"""
import os

if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import tempfile  # noqa: E402

import jax  # noqa: E402

# Many tests compile the same small programs (one model converted several ways, the same kernels at
# the same shapes): a compilation cache shared by the xdist workers compiles each once per run.
jax.config.update("jax_compilation_cache_dir", os.environ.get(
    "JAXQUANT_TEST_XLA_CACHE", os.path.join(tempfile.gettempdir(), f"jaxquant-test-xla-cache-{os.getuid()}")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_collection_modifyitems(config, items):
    """Test files that hold a ``slow`` test run first (each file kept together, so module fixtures are
    built once; otherwise collection order). Under ``pytest -n 2`` the longest tests then start
    early instead of leaving one worker busy alone at the end."""
    def file_of(item):
        return item.nodeid.split("::", 1)[0]

    slow_files = {file_of(item) for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: file_of(item) not in slow_files)
