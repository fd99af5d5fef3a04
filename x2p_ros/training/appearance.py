"""Appearance randomisation of training images.

A model trained on rendered radiographs learns their look along with the
anatomy, and fails where a real image looks different. SyntheX (Gao et al.,
"Synthetic data accelerates the development of generalizable learning-based
algorithms for X-ray image analysis", Nat Mach Intell 5:294-308, 2023) closed
most of that gap for X-ray landmark detection by randomising the look of the
training images far beyond what the simulator produces ("strong domain
randomisation": noise, blur, sharpening, contrast, box corruption). `strong`
does the same in the terms of a radiograph, each operation drawn independently
for each view:

- gamma, contrast and brightness;
- a smooth random field added to the log image: patients differ in soft-tissue
  thickness, and the heel effect and tables tilt the background;
- soft blobs, bright or dark: organs, contrast agent and gas over the spine;
- blur or unsharp masking, and local histogram equalisation (CLAHE): C-arm
  vendors' dynamic-range compression and edge enhancement differ;
- boxes filled with a constant or noise: what hides part of a vertebra;
- noise.

Only intensities change: P and the targets stay exact. The result is windowed
as `preprocess.normalize` windows every image at inference, so the model sees
one intensity range in training and in use.
"""
from __future__ import annotations

import cv2
import numpy as np

from .. import preprocess


def mild(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gamma, contrast, brightness and noise of a normalised image ([-1, 1])."""
    x = (image.clip(-1, 1) + 1) / 2
    x = x ** rng.uniform(0.7, 1.4)  # gamma
    x = x * rng.uniform(0.8, 1.2) + rng.uniform(-0.1, 0.1)  # contrast, brightness
    x = x + rng.normal(0, rng.uniform(0, 0.03), size=x.shape)  # detector noise
    return (x * 2 - 1).astype(np.float32)


def strong(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The operations of the module's docstring on a normalised image (bone bright,
    [-1, 1]); returns it normalised again."""
    x = ((image.clip(-1, 1) + 1) / 2).astype(np.float32)
    h, w = x.shape
    scale = max(h, w) / 256.0  # sizes below are drawn for a 256 x 256 input
    x = x ** np.float32(np.exp(rng.uniform(-0.7, 0.7)))
    if rng.random() < 0.5:
        x = x + _smooth_field(rng, (h, w), int(rng.integers(2, 7))) * rng.uniform(0.05, 0.3)
    if rng.random() < 0.5:
        x = x + _blobs(rng, (h, w), int(rng.integers(1, 7)))
    r = rng.random()
    if r < 0.3:
        x = cv2.GaussianBlur(x, (0, 0), rng.uniform(0.5, 2.0) * scale)
    elif r < 0.6:
        x = x + rng.uniform(0.5, 3.0) * (x - cv2.GaussianBlur(x, (0, 0), rng.uniform(2.0, 12.0) * scale))
    if rng.random() < 0.25:
        x = _clahe(x, rng.uniform(1.0, 4.0), int(rng.integers(2, 9)))
    if rng.random() < 0.3:
        x = _boxes(x, rng, int(rng.integers(1, 5)))
    x = x + rng.normal(0.0, rng.uniform(0.0, 0.06), size=x.shape).astype(np.float32)
    return preprocess.normalize(x)


def _smooth_field(rng, shape, cells: int) -> np.ndarray:
    """Unit-spread random field varying over `cells` cells across the image."""
    coarse = rng.normal(size=(cells + 1, cells + 1)).astype(np.float32)
    return cv2.resize(coarse, shape[::-1], interpolation=cv2.INTER_CUBIC)


def _blobs(rng, shape, count: int) -> np.ndarray:
    """`count` soft-edged ellipses of 5-35 % of the side, each bright or dark."""
    h, w = shape
    side = max(h, w)
    out = np.zeros(shape, dtype=np.float32)
    for _ in range(count):
        mask = np.zeros(shape, dtype=np.float32)
        axes = tuple(int(a) for a in rng.uniform(0.025, 0.175, size=2) * side)
        cv2.ellipse(mask, (int(rng.integers(0, w)), int(rng.integers(0, h))), axes, rng.uniform(0, 180), 0, 360,
                    1.0, -1)
        out += cv2.GaussianBlur(mask, (0, 0), max(1.0, 0.3 * min(axes))) * rng.choice([-1, 1]) \
            * rng.uniform(0.05, 0.3)
    return out


def _clahe(x, clip_limit: float, tiles: int) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    u16 = np.round((x - lo) / max(hi - lo, 1e-6) * 65535).astype(np.uint16)
    equalised = cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=(tiles, tiles)).apply(u16)
    return equalised.astype(np.float32) / 65535


def _boxes(x, rng, count: int) -> np.ndarray:
    """`count` boxes of 5-20 % of the side, each filled with a constant or noise."""
    h, w = x.shape
    x = x.copy()
    lo, hi = np.percentile(x, [1, 99])
    for _ in range(count):
        bh, bw = (rng.uniform(0.05, 0.2, size=2) * (h, w)).astype(int) + 1
        top, left = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
        region = x[top:top + bh, left:left + bw]
        region[:] = rng.uniform(lo, hi) if rng.random() < 0.5 else rng.uniform(lo, hi, size=region.shape)
    return x


KINDS = {"mild": mild, "strong": strong}


def randomiser(kind: str):
    """The randomisation called `kind`: a function (normalised image, generator) -> image."""
    if kind not in KINDS:
        raise ValueError(f"augmentation must be one of {', '.join(KINDS)}, got {kind!r}")
    return KINDS[kind]
