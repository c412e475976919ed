"""Test-session setup shared by every test.

XLA's LLVM backend at optimisation level 0 compiles several times faster, and this suite is
dominated by compile time (hundreds of small, differently shaped programs). Numerics do not depend
on it: no fast-math at any level, and the code that needs a particular float rounding order
(``jaxquant.torch_numerics``) pins it explicitly. Benchmarks and examples keep XLA's defaults.
"""
import os

if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
# Not --xla_cpu_use_fusion_emitters=false: XLA:CPU's classic emitters compile a QAT training step in
# about half the CPU time, but they round some float math differently (tests/regression's
# minilm_dynamic recording then differs by up to 4.5e-8), and the test session must compute what
# users' programs compute.

import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

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


# ``JAXQUANT_TEST_CPU_REPORT=PREFIX`` (benchmarks/bench_suite_time.py sets it): each pytest process
# writes PREFIX.<xdist worker>.json, one [node id, CPU seconds, wall seconds] row per test. CPU time
# (every thread of this process and its waited-for subprocesses) is what a test costs the suite's
# cores, and unlike wall time it moves little when other jobs load the machine.
_cpu_rows: list = []


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    if not os.environ.get("JAXQUANT_TEST_CPU_REPORT"):
        yield
        return
    cpu, wall = _cpu_seconds(), time.perf_counter()
    yield
    _cpu_rows.append([item.nodeid, _cpu_seconds() - cpu, time.perf_counter() - wall])


def pytest_sessionfinish(session):
    prefix = os.environ.get("JAXQUANT_TEST_CPU_REPORT")
    if prefix and _cpu_rows:
        with open(f"{prefix}.{os.environ.get('PYTEST_XDIST_WORKER', 'main')}.json", "w") as f:
            json.dump(_cpu_rows, f)
