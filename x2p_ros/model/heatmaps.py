"""Reading 2D heatmaps: presence, sub-cell peaks and soft-argmax, in input pixels."""
from __future__ import annotations

import torch

from .. import geometry


def presence(heatmaps):
    """Heatmap maximum in [0, 1], averaged over the views: (B, V, N, h, w) -> (B, N)."""
    return heatmaps.float().flatten(-2).amax(-1).clamp(0, 1).mean(1)


def heatmap_peaks(heatmaps, image_hw):
    """Sub-cell peak (weighted mean around the maximum) of each heatmap, in input pixels.

    heatmaps (..., S, S) -> (..., 2) as (u, v)."""
    S = heatmaps.shape[-1]
    H, W = image_hw
    prob = heatmaps.float().clamp(0, 1)
    flat = prob.flatten(-2)
    peak = flat.argmax(-1)
    r, c = peak // S, peak % S
    rows = torch.arange(S, device=heatmaps.device, dtype=prob.dtype)
    # weights: the 3x3 neighbourhood of the peak
    near = ((rows[:, None] - r[..., None, None]).abs() <= 1) & ((rows[None, :] - c[..., None, None]).abs() <= 1)
    wgt = prob * near
    total = wgt.sum((-1, -2)).clamp_min(1e-9)
    cy = (wgt * rows[:, None]).sum((-1, -2)) / total
    cx = (wgt * rows[None, :]).sum((-1, -2)) / total
    return torch.stack([geometry.cell_to_pixel(cx, S, W), geometry.cell_to_pixel(cy, S, H)], dim=-1)


def soft_argmax_2d(logits, image_hw):
    """Expected pixel (u, v) of each map under a spatial softmax of logits (..., h, w) -> (..., 2)."""
    h, w = logits.shape[-2:]
    H, W = image_hw
    prob = logits.flatten(-2).float().softmax(-1).reshape(logits.shape)
    u = geometry.cell_to_pixel(torch.arange(w, device=logits.device, dtype=prob.dtype), w, W)
    v = geometry.cell_to_pixel(torch.arange(h, device=logits.device, dtype=prob.dtype), h, H)
    return torch.stack([(prob.sum(-2) * u).sum(-1), (prob.sum(-1) * v).sum(-1)], dim=-1)
