"""Reading 2D heatmaps: presence, sub-cell peaks and soft-argmax, in input pixels."""
from __future__ import annotations

import torch

from .. import geometry


def presence(heatmaps):
    """Heatmap maximum in [0, 1], averaged over the views: (B, V, N, h, w) -> (B, N)."""
    return heatmaps.float().flatten(-2).amax(-1).clamp(0, 1).mean(1)


def heatmap_peaks(heatmaps, image_hw, peak=None):
    """Sub-cell peak of each heatmap, in input pixels: the vertex of the parabola through the
    logarithms of the maximum and its two neighbours along each axis, exact for a Gaussian
    of any width (a weighted mean of the 3 x 3 cells pulls the peak towards the middle cell).

    heatmaps (..., S, S) -> (..., 2) as (u, v); peak (...): the flat index of the cell to refine
    instead of the maximum's."""
    S = heatmaps.shape[-1]
    H, W = image_hw
    log = heatmaps.float().clamp(1e-6, 1).log()
    padded = torch.nn.functional.pad(log, (1, 1, 1, 1), value=float("nan"))
    if peak is None:
        peak = log.flatten(-2).argmax(-1)
    r, c = peak // S, peak % S

    def at(dr, dc):  # log value at (r + dr, c + dc); off the map: NaN
        index = ((r + 1 + dr) * (S + 2) + (c + 1 + dc))[..., None]
        return padded.flatten(-2).gather(-1, index)[..., 0]

    def vertex(before, middle, after):
        curvature = before - 2 * middle + after  # NaN at the map's edge: no sub-cell offset there
        offset = 0.5 * (before - after) / torch.where(curvature < 0, curvature, -torch.ones_like(curvature))
        return torch.where(curvature < 0, offset.clamp(-0.5, 0.5), torch.zeros_like(offset))

    centre = at(0, 0)
    cx = c + vertex(at(0, -1), centre, at(0, 1))
    cy = r + vertex(at(-1, 0), centre, at(1, 0))
    return torch.stack([geometry.cell_to_pixel(cx, S, W), geometry.cell_to_pixel(cy, S, H)], dim=-1)


def soft_argmax_2d(logits, image_hw):
    """Expected pixel (u, v) of each map under a spatial softmax of logits (..., h, w) -> (..., 2)."""
    h, w = logits.shape[-2:]
    H, W = image_hw
    prob = logits.flatten(-2).float().softmax(-1).reshape(logits.shape)
    u = geometry.cell_to_pixel(torch.arange(w, device=logits.device, dtype=prob.dtype), w, W)
    v = geometry.cell_to_pixel(torch.arange(h, device=logits.device, dtype=prob.dtype), h, H)
    return torch.stack([(prob.sum(-2) * u).sum(-1), (prob.sum(-1) * v).sum(-1)], dim=-1)
