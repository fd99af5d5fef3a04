"""Digitally reconstructed radiographs of a CT-like volume for a calibrated
cone-beam view (docs/design.md, section 1 conventions), in PyTorch (CPU or CUDA).

The volume is cut into slices across the axis most parallel to the central
ray. Along a pixel's ray the in-slice coordinates are affine in the slice
index, so every slice's contribution to every pixel is one bilinear lookup
(F.grid_sample) at coordinates made by one multiply-add; the path length in
one slab is 1 / |ray direction along the slicing axis, in voxels per mm|. This
is the shear-warp form of ray casting: a few hundred 2D lookups per pixel
instead of 3D trilinear ones at every sample step.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .. import geometry
from .volume import Volume

MU_WATER_PER_MM = 0.02  # linear attenuation of water at about 70 keV
# CT numbers are measured at a higher effective energy than a C-arm's; at the
# C-arm's, calcium's photoelectric absorption makes bone and metal stand out
# more than HU says. Above water, HU counts this much more.
BONE_CONTRAST = 2.0
LINE_INTEGRAL_FULL_SCALE = 12.0  # line integral stored as 65535 in the 16-bit images


def attenuation(hu: torch.Tensor) -> torch.Tensor:
    """Linear attenuation (1/mm) from Hounsfield units; air and below is 0."""
    hu = torch.where(hu > 0, hu * BONE_CONTRAST, hu)
    return (MU_WATER_PER_MM * (1.0 + hu / 1000.0)).clamp_min(0.0)


def line_integral(volume: Volume, P, size, device="cpu", mu: torch.Tensor | None = None,
                  slices_per_batch: int = 32) -> torch.Tensor:
    """Integral of attenuation along each pixel's ray, (H, W) float32 on `device`.

    P: 3x4 view (mm -> px); size: (W, H) of the image; mu: attenuation(volume.hu)
    on `device`, when the caller renders several views of one volume."""
    P = geometry.validate_projection(P)
    w, h = size
    geometry.project(P, volume.corners_world())  # raises if the volume reaches behind the source
    if mu is None:
        mu = attenuation(torch.as_tensor(volume.hu, device=device, dtype=torch.float32))
    to_voxel = np.linalg.inv(volume.affine)
    v, u = np.mgrid[0:h, 0:w]
    source, rays = geometry.backproject(P, np.stack([u.ravel(), v.ravel()], axis=1))  # (3,), (H*W, 3) world
    c = to_voxel[:3, :3] @ source + to_voxel[:3, 3]  # source in voxel indices (i, j, k)
    d = rays @ to_voxel[:3, :3].T  # ray directions in voxel indices per mm
    a = int(np.argmax(np.abs(d[(h // 2) * w + w // 2])))  # slicing axis: 0 = i, 1 = j, 2 = k
    b, cc = [x for x in range(3) if x != a]  # in-plane axes, b along grid x (the last array dim)
    mu = mu.permute(2 - a, 2 - cc, 2 - b).contiguous()[:, None]  # (S, 1, rows = axis cc, cols = axis b)
    n_slices, rows, cols = mu.shape[0], mu.shape[2], mu.shape[3]
    # In slice s the ray is at (b, cc) = c_bc + (s - c_a) * d_bc / d_a; normalised for
    # grid_sample with align_corners=True (voxel centres at -1 and +1).
    scale = np.array([2.0 / max(cols - 1, 1), 2.0 / max(rows - 1, 1)])
    slope = d[:, [b, cc]] / d[:, a:a + 1] * scale  # (H*W, 2)
    origin = c[[b, cc]] * scale - 1.0 - c[a] * slope  # (H*W, 2): the grid at s = 0
    slope_t = torch.as_tensor(slope, device=device, dtype=torch.float32)
    origin_t = torch.as_tensor(origin, device=device, dtype=torch.float32)
    step = torch.as_tensor(1.0 / np.abs(d[:, a]), device=device, dtype=torch.float32)  # mm per slab
    total = torch.zeros(h * w, device=device)
    for start in range(0, n_slices, slices_per_batch):
        s = torch.arange(start, min(start + slices_per_batch, n_slices), device=device, dtype=torch.float32)
        grid = torch.addcmul(origin_t, s[:, None, None], slope_t)  # (S', H*W, 2)
        samples = F.grid_sample(mu[start:start + len(s)], grid[:, None], mode="bilinear", padding_mode="zeros",
                                align_corners=True)  # (S', 1, 1, H*W)
        total += samples.sum(dim=0).reshape(-1)
    return (total * step).reshape(h, w)


def radiograph(line_int: torch.Tensor, rng: np.random.Generator | None = None, photons: float = 0.0,
               scatter: float = 0.0) -> np.ndarray:
    """16-bit image (bone bright) from a line-integral image.

    Scatter adds a broad blur of the primary intensity (fraction `scatter` of
    it); photons > 0 adds Poisson noise for that many photons per pixel in air."""
    primary = torch.exp(-line_int).cpu().numpy().astype(np.float64)
    intensity = primary
    if scatter > 0:
        import cv2
        # scatter is smooth: blur at an eighth of the resolution and scale back up
        small = cv2.resize(primary, (max(primary.shape[1] // 8, 1), max(primary.shape[0] // 8, 1)),
                           interpolation=cv2.INTER_AREA)
        blurred = cv2.GaussianBlur(small, (0, 0), 0.08 * max(small.shape))
        intensity = primary + scatter * cv2.resize(blurred, primary.shape[::-1], interpolation=cv2.INTER_LINEAR)
    if photons > 0:
        if rng is None:
            raise ValueError("Poisson noise needs a random generator")
        intensity = rng.poisson(intensity * photons) / photons
    observed = -np.log(np.clip(intensity, 1.0 / max(photons, 1e6), None))
    return np.round(np.clip(observed / LINE_INTEGRAL_FULL_SCALE, 0.0, 1.0) * 65535).astype(np.uint16)
