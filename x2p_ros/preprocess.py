"""Image preparation shared by training, evaluation, the offline command and
the node: intensity normalisation and square windows with the matching P."""
from __future__ import annotations

import cv2
import numpy as np

from . import geometry


def normalize(image: np.ndarray) -> np.ndarray:
    """float32 image, bone bright, windowed between its 1st and 99.5th percentile to [-1, 1]."""
    image = np.asarray(image, dtype=np.float32)
    if not np.all(np.isfinite(image)):
        raise ValueError("image contains NaN or Inf")
    lo, hi = (float(p) for p in np.percentile(image, [1.0, 99.5]))  # Python floats keep float32 (NEP 50)
    return ((image - lo) / max(hi - lo, 1e-6) * 2.0 - 1.0).clip(-1.5, 1.5)


def looks(image: np.ndarray, count: int) -> list[np.ndarray]:
    """A normalised image ([-1, 1], bone bright) and count - 1 more looks of it, each normalised again: edge
    enhancement (unsharp masking), a lighter and a darker gamma, and local histogram equalisation (CLAHE).
    C-arm vendors post-process radiographs in these ways, each differently, and a model localises in some
    looks better than in others; the estimates over several looks vary less with the one a C-arm chose.
    Sizes are for a 256 x 256 image and scale with its side."""
    if not 1 <= count <= len(_LOOKS) + 1:
        raise ValueError(f"looks: 1 (the image as given) to {len(_LOOKS) + 1}, got {count}")
    x = ((np.asarray(image, dtype=np.float32).clip(-1, 1) + 1) / 2).astype(np.float32)  # [0, 1]
    scale = max(x.shape) / 256.0
    return [image] + [normalize(look(x, scale)) for look in _LOOKS[:count - 1]]


def _unsharp(x, scale):
    return x + 1.5 * (x - cv2.GaussianBlur(x, (0, 0), 8.0 * scale))


def _clahe(x, scale):
    u16 = np.round(x * 65535).astype(np.uint16)
    return cv2.createCLAHE(clipLimit=2.0, tileGridSize=(4, 4)).apply(u16).astype(np.float32) / 65535


def _lighter(x, scale):
    return x ** np.float32(0.6)


def _darker(x, scale):
    return x ** np.float32(1.6)


_LOOKS = (_unsharp, _lighter, _darker, _clahe)
MAX_EXTRA_LOOKS = len(_LOOKS)  # looks besides the image as given


def to_display_8bit(image: np.ndarray, low: float = 1.0, high: float = 99.5) -> np.ndarray:
    """uint8 image for display (overlays, contact sheets) of a radiograph of any
    dtype, windowed between two percentiles. The percentiles come from every
    fourth row and column of a large image: as good for display, and the
    node's overlays stay cheap (an exact one over 512 x 512 took 5 ms)."""
    step = 4 if image.size > 128 * 128 else 1
    lo, hi = np.percentile(image[::step, ::step], [low, high])
    x = image.astype(np.float32)  # in place from here: no temporaries of the image's size
    x -= lo
    x *= 255.0 / max(hi - lo, 1.0)
    return np.clip(x, 0, 255, out=x).astype(np.uint8)


def window(image: np.ndarray, P, box, size: int):
    """The square box (x0, y0, side) of an image resampled to size x size, and
    its P. Parts of the box outside the image are filled with the image's edge."""
    x0, y0, side = box
    A = geometry.resize_transform((side, side), (size, size)) @ geometry.crop_transform(x0, y0)
    out = cv2.warpAffine(image, A[:2], (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return out, geometry.apply_pixel_transform(A, P), A


def full_box(width: int, height: int):
    """The square box that holds the whole image, centred."""
    side = max(width, height)
    return ((width - side) / 2.0, (height - side) / 2.0, side)
