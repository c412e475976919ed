"""Helpers shared by tests in several directories (tests/ is on sys.path through tests/conftest.py).

Test directories import their own helpers from uniquely named modules (``graph_hlo``, ``qat_small_net``,
``linen_models``, ``kernel_refs``), never ``from conftest import``: two directories' conftest modules would
share the name ``conftest`` in one session.
"""
