"""8 host CPU devices for the multi-device cases.

Setting XLA_FLAGS here only helps when this conftest is imported before jax initialises its backend
(e.g. ``pytest tests/distributed/_cases.py`` on its own); in a whole-suite run jax is usually already
up with one device, which is why test_distributed.py runs the cases in a subprocess.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
