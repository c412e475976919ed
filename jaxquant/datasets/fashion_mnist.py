"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package (idx files, read with numpy).

``apt-get install dataset-fashion-mnist`` puts the four gzipped idx files under
``/usr/share/datasets/fashion-mnist``; nothing is downloaded here.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot")


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    if data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte idx file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: expected {int(np.prod(shape))} values, found {array.size}")
    return array.reshape(shape)


def load_fashion_mnist(split: str = "train", directory: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of one split.

    Args:
      split: ``"train"`` (60000 images) or ``"test"`` (10000).
      directory: where the idx files are (default: Debian's location).
    Returns:
      ``(images uint8 (N, 28, 28), labels uint8 (N,))``.
    """
    directory = Path(directory) if directory is not None else DEFAULT_DIR
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    images_path = directory / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = directory / f"{prefix}-labels-idx1-ubyte.gz"
    if not images_path.exists():
        raise FileNotFoundError(f"{images_path} not found: install Debian's dataset-fashion-mnist package "
                                "(apt-get install dataset-fashion-mnist)")
    return _read_idx(images_path), _read_idx(labels_path)


def to_float_nhwc(images: np.ndarray) -> np.ndarray:
    """uint8 ``(N, 28, 28)`` -> float32 ``(N, 28, 28, 1)`` normalised with the training mean/std."""
    x = images.astype(np.float32) / 255.0
    return ((x - 0.2860) / 0.3530)[..., None]
