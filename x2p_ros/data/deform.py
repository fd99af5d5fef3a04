"""What happens to a patient between the preoperative CT and the operating
table: a supine CT, a prone patient on the table. The spine bends a little
differently at every segment (lordosis and kyphosis change, some lateral
bending), each vertebra turns and shifts by a few degrees and millimetres
against its neighbours, and the soft tissue moves more than the bone.

Each vertebra moves rigidly (T_i: CT -> table). The volume is resampled by a
backward map that blends the vertebrae's inverse motions with Gaussian
weights around their moved body centroids, so that bone near a centroid moves
with its own vertebra and the discs between bend smoothly; on top, soft tissue
away from the spine gets a smooth random displacement. The ground truth of
vertebra i is T_i applied to its centroid: the weights at a moved centroid are
its own vertebra's to within 1e-3 (the neighbours are 3-4 widths away)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.spatial.transform import Rotation

from .volume import Volume

GRID_MM = 4.0  # spacing of the grid the deformation is worked out on

@dataclass
class DeformConfig:
    """Ranges per segment (uniform in +-value), chained down the spine."""
    sagittal_deg: float = 2.0  # flexion-extension between neighbours: lordosis and kyphosis change
    coronal_deg: float = 1.5  # lateral bending
    axial_deg: float = 2.0  # axial rotation
    shift_mm: float = 1.0  # translation of a vertebra against the one above
    soft_tissue_mm: float = 6.0  # amplitude of the smooth displacement of tissue away from the spine
    blend_mm: float = 8.0  # width of the Gaussian weights around each vertebra

    def __post_init__(self):
        for name, value in vars(self).items():
            if not (np.isfinite(value) and value >= 0):
                raise ValueError(f"deformation {name} must be finite and >= 0, got {value}")
        if self.blend_mm <= 0:
            raise ValueError(f"deformation blend_mm must be > 0, got {self.blend_mm}")


def _about(R: np.ndarray, point: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """4x4: rotation R about `point`, then a translation."""
    T = np.eye(4)
    T[:3, :3] = R
    T[:3, 3] = point - R @ point + shift
    return T


def segment_motions(centroids_mm: np.ndarray, rng: np.random.Generator, config: DeformConfig) -> np.ndarray:
    """(K, 4, 4) rigid motions of K vertebrae ordered top to bottom (patient frame:
    x left, y posterior, z superior). Each joint between neighbours turns about
    the middle of their disc; the chain starts at the middle vertebra, which stays
    where it is, so the spine bends without drifting as a whole."""
    c = np.asarray(centroids_mm, dtype=np.float64).reshape(-1, 3)
    motions = np.repeat(np.eye(4)[None], len(c), axis=0)
    middle = len(c) // 2
    for direction in (-1, 1):  # up the chain from the middle, then down
        i = middle
        while 0 <= i + direction < len(c):
            j = i + direction
            joint = (c[i] + c[j]) / 2
            angles = rng.uniform(-1, 1, size=3) * [config.coronal_deg, config.sagittal_deg, config.axial_deg]
            local = _about(Rotation.from_rotvec(angles, degrees=True).as_matrix(), joint, rng.uniform(-1, 1, size=3) * config.shift_mm)
            motions[j] = motions[i] @ local  # the joint moves with the vertebra before it
            i = j
    return motions


def deform(volume: Volume, centroids_mm: np.ndarray, rng: np.random.Generator,
           config: DeformConfig = DeformConfig()) -> tuple[Volume, np.ndarray]:
    """(the volume on its own grid as it lies on the table, the moved centroids)."""
    c = np.asarray(centroids_mm, dtype=np.float64).reshape(-1, 3)
    if len(c) == 0:
        raise ValueError("a deformation needs at least one vertebra")
    motions = segment_motions(c, rng, config)
    moved = np.einsum("kab,kb->ka", motions[:, :3, :3], c) + motions[:, :3, 3]
    inverse = np.linalg.inv(motions)

    # The map is smooth (blend_mm wide): it is worked out on a grid of about GRID_MM and
    # interpolated to every voxel, exactly where it is one vertebra's rigid motion (linear in space)
    shape = np.array(volume.hu.shape)  # (k, j, i)
    spacing = np.linalg.norm(volume.affine[:3, :3], axis=0)[::-1]  # mm per voxel along k, j, i
    coarse = np.maximum(np.ceil((shape - 1) * spacing / GRID_MM).astype(int) + 1, 2)
    k, j, i = torch.meshgrid(*(torch.linspace(0, n - 1, c) for n, c in zip(shape, coarse)), indexing="ij")
    ijk = torch.stack([i, j, k], dim=-1).reshape(-1, 3)  # (M, 3) voxel indices of the coarse grid
    A = torch.as_tensor(volume.affine, dtype=torch.float32)
    y = ijk @ A[:3, :3].T + A[:3, 3]  # (M, 3) world mm on the table
    d2 = torch.cdist(y, torch.as_tensor(moved, dtype=torch.float32)) ** 2  # (M, K)
    weights = torch.softmax(-d2 / (2 * config.blend_mm ** 2), dim=1)  # (M, K)
    x = torch.zeros_like(y)  # (M, 3) where each point was in the CT, mm
    for k_, T in enumerate(torch.as_tensor(inverse, dtype=torch.float32)):
        x += weights[:, k_:k_ + 1] * (y @ T[:3, :3].T + T[:3, 3])

    if config.soft_tissue_mm > 0:
        # a random field on 4 x 4 x 4 knots, smooth once interpolated; zero at the spine, full 60 mm from it
        knots = torch.as_tensor(rng.uniform(-1, 1, size=(1, 3, 4, 4, 4)), dtype=torch.float32)
        field = F.interpolate(knots, size=tuple(coarse), mode="trilinear", align_corners=True)
        field = field[0].permute(1, 2, 3, 0).reshape(-1, 3)  # (M, 3)
        nearest = d2.min(dim=1).values
        x = x + config.soft_tissue_mm * field * (1 - torch.exp(-nearest / (2 * 30.0 ** 2)))[:, None]

    # world mm -> grid_sample coordinates (align_corners=True: voxel centres at -1 and +1)
    to_voxel = torch.as_tensor(np.linalg.inv(volume.affine), dtype=torch.float32)
    src = x @ to_voxel[:3, :3].T + to_voxel[:3, 3]  # (M, 3) as (i, j, k)
    extent = torch.as_tensor(shape[::-1] - 1, dtype=torch.float32).clamp_min(1)
    grid = (2 * src / extent - 1).reshape(1, *coarse, 3).permute(0, 4, 1, 2, 3)  # (1, 3, k', j', i')
    grid = F.interpolate(grid, size=tuple(shape), mode="trilinear", align_corners=True)
    grid = grid.permute(0, 2, 3, 4, 1)  # (1, k, j, i, 3)
    hu = torch.as_tensor(volume.hu, dtype=torch.float32)[None, None]  # (1, 1, k, j, i)
    # past the CT's edge the body goes on: the edge slices are repeated rather than air put there
    out = F.grid_sample(hu, grid, mode="bilinear", padding_mode="border", align_corners=True)[0, 0]
    return Volume(out.numpy(), volume.affine.copy()), moved
