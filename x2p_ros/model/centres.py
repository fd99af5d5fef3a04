"""Vertebral centres without an index, and the chain snapped onto them.

Both models read the step from one vertebra to the next from the whole window
(which vertebra is the k-th below the prompt), and on DRRs of real CTs that
step is off by 4-5 mm a vertebra, so the error grows down the chain (README,
"Centre snapping"). Where a vertebral body's centre lies is a local question:
a head without the prompt, the same for every vertebra, marks every centre in
a view. The chain is then walked down: each vertebra starts one model step
below the previous vertebra's snapped place and moves to the strongest centre
within a share of that step, so that an error in one step is not carried into
the next. A peak near enough in one view may be another vertebra's or none's
(under rule 8d4f558 the AP view jumped a whole vertebra while the LAT view did
not): where the two views' snaps do not meet in one 3D point, neither is taken.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import geometry
from .heatmaps import heatmap_peaks
from .vfe import VFE

FLOOR = 0.3  # a centre map's least height to snap to (its targets peak at 1)


class CentreHead(nn.Module):
    """Images (B, 1, H, W) -> one linear heatmap of every vertebral centre (B, 1, H/s, W/s): a U-Net of its own
    (the VFE's architecture), so that it can be trained on a model whose weights stay as they are; on the
    frozen high-resolution features of the shipped models a head placed the centres worse than the models
    placed the prompted vertebra (README, "Centre snapping")."""

    def __init__(self, base: int, hires_stride: int):
        super().__init__()
        self.vfe = VFE(base, hires_stride)
        c = self.vfe.hires_channels
        self.head = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(c, 1, 1))

    def forward(self, images):
        return self.head(self.vfe(images)[1])


def snap_chain(centres, chain, image_hw, radius_share: float, floor: float, P=None, agree_share: float = 0.0):
    """The chain's pixels moved onto the centre map, walking down from the prompted vertebra.

    centres (B, V, h, w) heatmaps of every centre (square, peak 1); chain (B, V, N, 2) the model's pixels.
    Vertebra k starts at the previous one's snapped place plus the model's own step k-1 -> k (k = 0 at
    its own place), and moves to the sub-cell place of the strongest of the map's peaks at least floor high
    within radius_share of that step (of the step 0 -> 1 for k = 0); without one it stays where it
    started. With agree_share > 0 and the views' P (B, V, 3, 4), a vertebra whose snapped pixels,
    triangulated, reproject farther than agree_share of its step from either view's snap stays where it
    started in every view. -> (B, V, N, 2)."""
    H, W = image_hw
    h, w = centres.shape[-2:]
    if h != w:
        raise ValueError(f"the centre map must be square, got {h} x {w}")
    chain = chain.float()
    u = geometry.cell_to_pixel(torch.arange(w, device=chain.device, dtype=chain.dtype), w, W)  # (w,)
    v = geometry.cell_to_pixel(torch.arange(h, device=chain.device, dtype=chain.dtype), h, H)  # (h,)
    steps = chain[..., 1:, :] - chain[..., :-1, :]  # (B, V, N-1, 2)
    maps = centres.float()
    # the maps' own peaks (no higher neighbour), at least floor high: a Gaussian's flank inside the radius is not
    # a centre
    peaks = torch.where((maps == F.max_pool2d(maps, 3, 1, 1)) & (maps >= floor), maps, torch.zeros_like(maps))
    snapped = []
    for k in range(chain.shape[-2]):
        start = chain[..., 0, :] if k == 0 else snapped[-1] + steps[..., k - 1, :]  # (B, V, 2)
        step = steps[..., max(k - 1, 0), :] if steps.shape[-2] else torch.zeros_like(start)
        radius = radius_share * step.norm(dim=-1)  # (B, V)
        d2 = (u - start[..., :1, None]) ** 2 + (v[:, None] - start[..., 1:, None]) ** 2  # (B, V, h, w)
        near = torch.where(d2 <= radius[..., None, None] ** 2, peaks, torch.zeros_like(d2)).flatten(-2)
        best, cell = near.max(-1)  # (B, V): the strongest peak within the radius
        moved = torch.where((best > 0)[..., None], heatmap_peaks(maps, image_hw, cell), start)  # (B, V, 2)
        if agree_share:
            point = geometry.triangulate_torch(P, moved[..., None, :])  # (B, 1, 3)
            seen, _ = geometry.project_torch(P, point[:, None].expand(-1, P.shape[1], -1, -1))  # (B, V, 1, 2)
            apart = (seen[..., 0, :] - moved).norm(dim=-1)  # (B, V)
            agree = (apart <= agree_share * step.norm(dim=-1)).all(-1)  # (B,)
            moved = torch.where(agree[:, None, None], moved, start)
        snapped.append(moved)
    return torch.stack(snapped, dim=-2)


def snapped_estimates(out: dict, P, image_hw, radius_share: float, agree_share: float = 0.0, floor: float = FLOOR):
    """3D estimates (B, N, 3) triangulated from the chain snapped in every view: the model's own estimates
    (out["xyz"]) projected into each view (P (B, V, 3, 4)), snapped onto out["centres"] (B, V, h, w) where the
    views agree within agree_share of the step (0: no check; snap_chain)."""
    B, N = out["xyz"].shape[:2]
    V = P.shape[1]
    points = out["xyz"].double()[:, None].expand(B, V, N, 3)
    chain, _ = geometry.project_torch(P.double(), points)  # (B, V, N, 2)
    pixels = snap_chain(out["centres"], chain, image_hw, radius_share, floor, P.double(), agree_share)
    return geometry.triangulate_torch(P.double(), pixels.double()).to(out["xyz"].dtype)
