"""Digitally reconstructed radiographs of a CT-like volume for a calibrated
cone-beam view (docs/design.md, section 1 conventions), in PyTorch (CPU or CUDA).

Physics: each voxel is water diluted by air (HU <= 0) or water mixed with
cortical bone (HU > 0), so that one line integral per material gives the
polychromatic intensity of any tube spectrum: bone stands out more at low
energies, and the beam hardens along thick paths (x2p_ros/data/carm.py turns
these integrals into a C-arm image).

Rendering: the volume is cut into slices across the axis most parallel to the
central ray. Along a pixel's ray the in-slice coordinates are affine in the
slice index, so every slice's contribution to every pixel is one bilinear lookup
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

# Mass attenuation coefficients (cm^2/g, coherent scattering included) from the
# NIST XCOM / X-ray mass attenuation tables (Hubbell and Seltzer, NISTIR 5632):
# liquid water, ICRU-44 cortical bone (1.92 g/cm^3) and aluminium (2.699 g/cm^3).
ENERGY_KEV = np.array([20.0, 30.0, 40.0, 50.0, 60.0, 80.0, 100.0, 150.0])
MU_RHO_WATER = np.array([0.8096, 0.3756, 0.2683, 0.2269, 0.2059, 0.1837, 0.1707, 0.1505])
MU_RHO_BONE = np.array([4.001, 1.331, 0.6655, 0.4242, 0.3148, 0.2229, 0.1855, 0.1480])
MU_RHO_AL = np.array([3.441, 1.128, 0.5685, 0.3681, 0.2778, 0.2018, 0.1704, 0.1378])
RHO_BONE, RHO_AL = 1.92, 2.699
CT_ENERGY_KEV = 70.0  # effective energy of a 120 kVp CT, at which HU are measured
MATERIALS = ("water", "bone")


def mass_attenuation(table: np.ndarray, energy_kev) -> np.ndarray:
    """A table's mass attenuation at any energies (log-log interpolation, as the tables are smooth there)."""
    return np.exp(np.interp(np.log(energy_kev), np.log(ENERGY_KEV), np.log(table)))


def mu_per_mm(energy_kev) -> np.ndarray:
    """(2, E): attenuation (1/mm) of one unit of each material at each energy: water at
    1 g/cm^3, and bone as the excess of a voxel of cortical bone over the water it displaces."""
    water = mass_attenuation(MU_RHO_WATER, energy_kev) / 10.0
    bone = mass_attenuation(MU_RHO_BONE, energy_kev) * RHO_BONE / 10.0 - water
    return np.stack([water, bone])


MU_WATER_PER_MM = float(mu_per_mm(CT_ENERGY_KEV)[0])
HU_CORTICAL_BONE = float(1000.0 * mu_per_mm(CT_ENERGY_KEV)[1] / MU_WATER_PER_MM)  # about 1600


def materials(hu: torch.Tensor) -> torch.Tensor:
    """(2, *hu.shape): water density (g/cm^3, 0 in air) and cortical-bone fraction of each voxel.

    Above 0 HU a voxel is water plus the share of cortical bone that gives its HU at
    the CT's energy; metal reads as much bone (its HU over 1600)."""
    out = hu.new_empty((2, *hu.shape))
    water, bone = out[0], out[1]
    torch.clamp(hu, min=-1000.0, max=0.0, out=water)
    water.mul_(1e-3).add_(1.0)
    torch.clamp(hu, min=0.0, out=bone)
    bone.mul_(1.0 / HU_CORTICAL_BONE)
    return out


def line_integral(volume: Volume, P, size, device="cpu", density: torch.Tensor | None = None,
                  slices_per_batch: int = 32, slab: int = 2) -> torch.Tensor:
    """Integral of each material's density along each pixel's ray (mm), (2, H, W) float32 on `device`.

    P: 3x4 view (mm -> px); size: (W, H) of the image; density: materials(volume.hu)
    on `device`, when the caller renders several views of one volume. `slab` slices
    are averaged into one lookup at their middle: within two 1 mm slices a ray
    drifts sideways by a quarter of a voxel at the cone's edge, and the lookups, the
    cost of a DRR, halve."""
    P = geometry.validate_projection(P)
    w, h = size
    geometry.project(P, volume.corners_world())  # raises if the volume reaches behind the source
    if density is None:
        density = materials(torch.as_tensor(volume.hu, device=device, dtype=torch.float32))
    channels = density.shape[0]
    to_voxel = np.linalg.inv(volume.affine)
    v, u = np.mgrid[0:h, 0:w]
    source, rays = geometry.backproject(P, np.stack([u.ravel(), v.ravel()], axis=1))  # (3,), (H*W, 3) world
    c = to_voxel[:3, :3] @ source + to_voxel[:3, 3]  # source in voxel indices (i, j, k)
    d = rays @ to_voxel[:3, :3].T  # ray directions in voxel indices per mm
    a = int(np.argmax(np.abs(d[(h // 2) * w + w // 2])))  # slicing axis: 0 = i, 1 = j, 2 = k
    b, cc = [x for x in range(3) if x != a]  # in-plane axes, b along grid x (the last array dim)
    # slabs: the mean of `slab` neighbouring slices (a missing last one counts as air)
    along = 3 - a  # the slicing axis's dimension in (C, k, j, i)
    pick = [slice(None)] * 4
    pick[along] = slice(0, None, slab)
    slabs = density[tuple(pick)].clone()
    for offset in range(1, slab):
        pick[along] = slice(offset, None, slab)
        part = density[tuple(pick)]
        slabs.narrow(along, 0, part.shape[along]).add_(part)
    slabs.mul_(1.0 / slab)
    # (C, k, j, i) -> (S, C, rows = axis cc, cols = axis b)
    density = slabs.permute(3 - a, 0, 3 - cc, 3 - b).contiguous()
    n_slices, rows, cols = density.shape[0], density.shape[2], density.shape[3]
    # In slice s the ray is at (b, cc) = c_bc + (s - c_a) * d_bc / d_a; normalised for
    # grid_sample with align_corners=True (voxel centres at -1 and +1).
    scale = np.array([2.0 / max(cols - 1, 1), 2.0 / max(rows - 1, 1)])
    slope = d[:, [b, cc]] / d[:, a:a + 1] * scale  # (H*W, 2)
    origin = c[[b, cc]] * scale - 1.0 - c[a] * slope  # (H*W, 2): the grid at s = 0
    slope_t = torch.as_tensor(slope, device=device, dtype=torch.float32)
    origin_t = torch.as_tensor(origin, device=device, dtype=torch.float32)
    step = torch.as_tensor(slab / np.abs(d[:, a]), device=device, dtype=torch.float32)  # mm per slab
    total = torch.zeros(channels, h * w, device=device)
    for start in range(0, n_slices, slices_per_batch):
        s = torch.arange(start, min(start + slices_per_batch, n_slices), device=device, dtype=torch.float32)
        middle = s * slab + (slab - 1) / 2.0  # the slab's middle, in slices
        grid = torch.addcmul(origin_t, middle[:, None, None], slope_t)  # (S', H*W, 2)
        samples = F.grid_sample(density[start:start + len(s)], grid[:, None], mode="bilinear",
                                padding_mode="zeros", align_corners=True)  # (S', C, 1, H*W)
        total += samples.sum(dim=0).reshape(channels, -1)
    return (total * step).reshape(channels, h, w)
