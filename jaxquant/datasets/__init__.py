"""Readers for real data that ships inside installed packages (nothing is downloaded).

Import the submodules directly (``jaxquant.datasets.fashion_mnist``, ``jaxquant.datasets.pydoc_text``,
``jaxquant.datasets.sample_images``).
"""
