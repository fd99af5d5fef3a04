"""A CT-like volume: Hounsfield-like values on a voxel grid with its affine."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Volume:
    """hu[k, j, i] is the voxel whose index (i, j, k) maps to affine @ (i, j, k, 1) in mm.

    labels, when present, holds the VerSe label number of the vertebra each
    voxel belongs to (0: none)."""
    hu: np.ndarray
    affine: np.ndarray
    labels: np.ndarray | None = None

    @property
    def shape_ijk(self) -> tuple[int, int, int]:
        return self.hu.shape[::-1]

    def voxel_to_world(self, ijk) -> np.ndarray:
        ijk = np.asarray(ijk, dtype=np.float64).reshape(-1, 3)
        return ijk @ self.affine[:3, :3].T + self.affine[:3, 3]

    def world_to_voxel(self, xyz) -> np.ndarray:
        inv = np.linalg.inv(self.affine)
        xyz = np.asarray(xyz, dtype=np.float64).reshape(-1, 3)
        return xyz @ inv[:3, :3].T + inv[:3, 3]

    def corners_world(self) -> np.ndarray:
        n = np.array(self.shape_ijk) - 1
        ijk = np.array([[a, b, c] for a in (0, n[0]) for b in (0, n[1]) for c in (0, n[2])], dtype=np.float64)
        return self.voxel_to_world(ijk)

    def transformed(self, T: np.ndarray) -> "Volume":
        """The same volume moved by the rigid 4x4 transform T (mm)."""
        return Volume(self.hu, T @ self.affine, self.labels)
