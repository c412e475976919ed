"""Real photographs for evaluating image models, from the images bundled inside scikit-image.

Only images that ship in the scikit-image wheel are used (``skimage.data`` loaders that need
``pooch`` to download are left out), so this works offline. A few hundred distinct inputs are
made from ~20 source images by deterministic random-resized crops, flips and zooms: enough to
calibrate and to compare float against int8 predictions, not a labelled benchmark.
"""

from __future__ import annotations

import functools

import numpy as np

# Colour photographs first: the first len(SOURCES) images are the plain sources, so small n
# gives the most natural images. Grey-level images are replicated to three channels.
SOURCES: tuple[str, ...] = (
    "chelsea", "coffee", "astronaut", "rocket", "motorcycle_left", "motorcycle_right",
    "immunohistochemistry", "hubble_deep_field", "retina", "colorwheel", "logo",
    "camera", "brick", "grass", "gravel", "moon", "coins", "clock", "page", "text", "cell",
)

# Source images are first shrunk so their shorter side is at most this, which keeps
# cropping + resizing a few hundred images to a few seconds.
_WORKING_SIDE = 448


def _load_source(name: str) -> np.ndarray:
    """One bundled image as (H, W, 3) uint8 RGB."""
    from skimage import data

    if name == "motorcycle_left":
        img = data.stereo_motorcycle()[0]
    elif name == "motorcycle_right":
        img = data.stereo_motorcycle()[1]
    else:
        img = getattr(data, name)()
    img = np.asarray(img)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    if img.shape[-1] == 4:
        # Composite RGBA onto white: transparent pixels of the logo otherwise become black
        # noise whose RGB values are arbitrary.
        alpha = img[..., 3:4].astype(np.float32) / 255.0
        img = img[..., :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
        img = np.clip(np.round(img), 0, 255).astype(np.uint8)
    if img.dtype != np.uint8:
        raise TypeError(f"skimage.data.{name} returned dtype {img.dtype}; expected uint8")
    return img


def _resize_uint8(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    from skimage.transform import resize

    out = resize(img, (out_h, out_w), order=1, anti_aliasing=True, preserve_range=True)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=None)
def _working_sources() -> tuple[np.ndarray, ...]:
    imgs = []
    for name in SOURCES:
        img = _load_source(name)
        h, w = img.shape[:2]
        s = _WORKING_SIDE / min(h, w)
        if s < 1.0:
            img = _resize_uint8(img, max(1, round(h * s)), max(1, round(w * s)))
        img.setflags(write=False)
        imgs.append(img)
    return tuple(imgs)


def _center_square(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return img[top:top + side, left:left + side]


def _augmented(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random-resized crop (8-100 % of the area, aspect 3/4-4/3) and a horizontal flip."""
    h, w = img.shape[:2]
    area = rng.uniform(0.08, 1.0) * h * w
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    ch = int(np.clip(round(np.sqrt(area / aspect)), 8, h))
    cw = int(np.clip(round(np.sqrt(area * aspect)), 8, w))
    top = int(rng.integers(0, h - ch + 1))
    left = int(rng.integers(0, w - cw + 1))
    crop = img[top:top + ch, left:left + cw]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return crop


def sample_images(n: int = 300, size: int = 224, seed: int = 0) -> np.ndarray:
    """Return ``n`` real RGB images of shape (n, size, size, 3), dtype uint8, NHWC.

    Images ``0 .. len(SOURCES)-1`` are the bundled sources, centre-cropped to a square; later
    images are deterministic random-resized crops with flips of the sources (cycled in order).
    Image ``i`` depends only on ``(i, size, seed)``, not on ``n``, so ``sample_images(8)`` is a
    prefix of ``sample_images(300)``.
    """
    if n < 0:
        raise ValueError(f"sample_images: n must be >= 0, got {n}")
    if size < 8:
        raise ValueError(f"sample_images: size must be >= 8 pixels, got {size}")
    sources = _working_sources()
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        src = sources[i % len(sources)]
        if i < len(sources):
            img = _center_square(src)
        else:
            img = _augmented(src, np.random.default_rng([seed, i]))
        out[i] = _resize_uint8(img, size, size)
    return out
