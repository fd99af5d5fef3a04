"""Realism measured: how a radiograph's brightness runs along the spine, from one
vertebral body's centre to the next. Bright bodies between dark discs are a cue a
model may learn to step from vertebra to vertebra by; this compares that pattern in
synthetic pairs and in the real CTs' pairs."""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..preprocess import normalize

PHASES = np.linspace(0.0, 1.0, 11)  # 0: a vertebra's centre, 1: the next one's
BODY, DISC = (PHASES <= 0.2) | (PHASES >= 0.8), (PHASES >= 0.4) & (PHASES <= 0.6)


def spine_profile(image: np.ndarray, pixels: np.ndarray, across: float = 0.25, samples: int = 5) -> np.ndarray:
    """(steps, phases): the normalised image (the model's input window) between consecutive vertebrae
    (pixels (N, 2), superior first), averaged over `samples` points across the spine up to `across` of
    the step either side, less each step's mean. Steps that leave the image are left out."""
    img = normalize(image)
    pixels = np.asarray(pixels, dtype=np.float64).reshape(-1, 2)
    a, d = pixels[:-1], np.diff(pixels, axis=0)  # (S, 2)
    length = np.linalg.norm(d, axis=1)
    keep = length > 1.0
    a, d, length = a[keep], d[keep], length[keep]
    normal = np.stack([-d[:, 1], d[:, 0]], axis=1) / length[:, None]
    offsets = np.linspace(-across, across, samples)[None, :] * length[:, None]  # (S, K)
    # (S, P, K, 2) sample points, u then v
    points = (a[:, None, None] + PHASES[None, :, None, None] * d[:, None, None]
              + offsets[:, None, :, None] * normal[:, None, None])
    values = ndimage.map_coordinates(img, [points[..., 1].ravel(), points[..., 0].ravel()], order=1,
                                     cval=np.nan).reshape(points.shape[:3]).mean(axis=2)  # (S, P)
    values = values[np.all(np.isfinite(values), axis=1)]
    return values - values.mean(axis=1, keepdims=True)


def disc_contrast(image: np.ndarray, pixels: np.ndarray) -> float | None:
    """How much brighter the discs are than the bodies along the spine (negative: darker), in the
    normalised input's units (its window spans 2); None when no step between vertebrae lies inside."""
    profile = spine_profile(image, pixels)
    if len(profile) == 0:
        return None
    return float(profile[:, DISC].mean() - profile[:, BODY].mean())
