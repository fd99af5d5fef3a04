"""Losses (docs/design.md, section 2): per view MSE + Dice between predicted and
Gaussian ground-truth heatmaps, plus the mean squared 3D error over the
vertebrae present; optionally a peaked 3D target for the fusion's volume, a
target for the BrickFormer's routing and the consistency of the outputs over
two looks of each sample (X2PConfig's loss_* fields)."""
from __future__ import annotations

import torch

from .. import geometry

POSITIVE_WEIGHT = 20.0
CENTRE_SIGMA_CELLS = 1.5  # the centre head's Gaussians, in cells of its map (3 px at stride 2)


def gaussian_heatmaps(pixels, present, size: int, image_hw, sigma_px: float):
    """Targets (B, V, N, S, S) from ground-truth pixels (B, V, N, 2): Gaussians
    scaled to a peak of 1 on the grid (so that the presence test "maximum above
    tau" sees the same height wherever the centre falls between cells); all
    zero for vertebrae that are not present (B, N)."""
    H, W = image_hw
    S = size
    cells = torch.arange(S, device=pixels.device, dtype=torch.float32)
    cx = geometry.pixel_to_cell(pixels[..., 0], W, S)  # (B, V, N) heatmap cells
    cy = geometry.pixel_to_cell(pixels[..., 1], H, S)
    sigma = sigma_px * S / W
    g = torch.exp(-((cells[None, :] - cx[..., None, None]) ** 2 + (cells[:, None] - cy[..., None, None]) ** 2)
                  / (2 * sigma ** 2))
    g = g / g.flatten(-2).amax(-1).clamp_min(1e-6)[..., None, None]
    return g * present[:, None, :, None, None]


def centre_loss(maps, centres, inside, image_hw):
    """Weighted MSE of the centre maps (B, V, h, w) against the maximum of Gaussians (peak 1) at every
    vertebra inside each view (centres (B, V, M, 2) px, inside (B, V, M)), weighted as the heatmaps are."""
    h, w = maps.shape[-2:]
    ones = torch.ones(inside.shape[0], inside.shape[2], device=maps.device)
    g = gaussian_heatmaps(torch.where(inside[..., None], centres, 0.0), ones, h, image_hw,
                          CENTRE_SIGMA_CELLS * image_hw[1] / w)  # (B, V, M, h, w)
    target = (g * inside[..., None, None]).amax(2)  # (B, V, h, w)
    return ((1.0 + POSITIVE_WEIGHT * target) * (maps.float() - target) ** 2).mean()


def peak_3d_loss(logits, points, xyz_true, present, sigma_mm: float):
    """Mean over the vertebrae present of KL(target || volume): the target is a Gaussian of
    sigma_mm around the true point over the voxel centres (B, D, Hy, Wx, 3), normalised on
    them (a point outside the volume pulls the mass to its nearest voxels); the volume is the
    softmax of logits (B, N, D, Hy, Wx). 0 when the volume is the target."""
    B, N = logits.shape[:2]
    d2 = torch.cdist(xyz_true.float(), points.reshape(B, -1, 3).float()).square()  # (B, N, X)
    log_q = (-d2 / (2 * sigma_mm ** 2)).log_softmax(-1)
    log_p = logits.reshape(B, N, -1).float().log_softmax(-1)
    kl = (log_q.exp() * (log_q - log_p)).sum(-1)  # (B, N)
    return (kl * present).sum() / present.sum().clamp_min(1.0)


def routing_loss(routing, pixels, present, image_hw):
    """Mean over the vertebrae present, views and layers of the cross-entropy of the
    BrickFormer's routing (B, V, layers, N, P) over its square grid of P bricks against
    the brick under each vertebra's pixels (B, V, N, 2), softened by a Gaussian of half
    a brick so that a vertebra on a brick's edge shares it with its neighbour."""
    side = round(routing.shape[-1] ** 0.5)
    if side * side != routing.shape[-1]:
        raise ValueError(f"the routing grid must be square, got {routing.shape[-1]} bricks")
    target = gaussian_heatmaps(pixels, present, side, image_hw, sigma_px=0.5 * image_hw[1] / side)
    target = target.flatten(-2) / target.flatten(-2).sum(-1, keepdim=True).clamp_min(1e-12)  # (B, V, N, P)
    ce = -(target[:, :, None] * routing.float().clamp_min(1e-8).log()).sum(-1)  # (B, V, layers, N)
    weight = present[:, None, None, :].expand_as(ce)
    return (ce * weight).sum() / weight.sum().clamp_min(1.0)


def look_consistency(out: dict, present, scale_mm: float):
    """For a batch whose second half is its first in other looks: the mean over the vertebrae present of the
    squared 3D difference between the halves' estimates (in units of scale_mm), plus the mean over the present
    vertebrae's heatmaps of their summed squared difference. 0 when both looks give the same outputs."""
    half = present.shape[0] // 2
    own = present[:half]  # (B/2, N)
    xyz = out["xyz"].float() / scale_mm
    term = ((((xyz[:half] - xyz[half:]) ** 2).sum(-1) * own).sum() / own.sum().clamp_min(1.0))
    if "heatmaps" in out:
        maps = out["heatmaps"].float()  # (B, V, N, S, S)
        per_map = ((maps[:half] - maps[half:]) ** 2).sum((-1, -2))  # (B/2, V, N)
        weight = own[:, None].expand_as(per_map)
        term = term + (per_map * weight).sum() / weight.sum().clamp_min(1.0)
    return term


def x2p_losses(out: dict, batch: dict, config) -> dict:
    """Each term and their sum ('total'), weighted as the X2PConfig says.

    The targets of absent vertebrae are zeroed before use: whatever a data set
    holds there (NaN for a vertebra behind a source, say) would survive a
    multiplication by 0 as NaN, in the loss and in its gradient. A batch with "paired_looks" holds each
    sample twice, in two looks (training/data.py): both halves are fitted to the targets, and their outputs'
    difference is the term "looks"."""
    present_mask = batch["present"].bool()  # (B, N)
    present = present_mask.float()
    xyz_true = torch.where(present_mask[..., None], batch["xyz"], 0.0)  # (B, N, 3)
    pixels_true = torch.where(present_mask[:, None, :, None], batch["pixels"], 0.0)  # (B, V, N, 2)
    image_hw = batch["images"].shape[-2:]
    terms = {}
    if "heatmaps" in out:
        maps = out["heatmaps"].float()
        target = gaussian_heatmaps(pixels_true, present, maps.shape[-1], image_hw, config.heatmap_sigma_px)
        # the few cells under a vertebra weigh as much as the many around it, or the
        # maps learn "nothing anywhere" first and the peaks come slowly
        weight = 1.0 + POSITIVE_WEIGHT * target
        terms["mse"] = (weight * (maps - target) ** 2).mean()
        prob = maps.clamp(0, 1)
        inter = (prob * target).sum((-1, -2))
        dice = 1 - (2 * inter + 1.0) / (prob.sum((-1, -2)) + target.sum((-1, -2)) + 1.0)  # (B, V, N)
        terms["dice"] = dice.mean()
    err2 = (((out["xyz"].float() - xyz_true) / config.loss_3d_scale_mm) ** 2).sum(-1)  # (B, N)
    terms["3d"] = (err2 * present).sum() / present.sum().clamp_min(1.0)
    if config.loss_3d_peak_sigma_mm > 0 and "volume_logits" in out:
        terms["peak"] = config.loss_3d_peak_weight * peak_3d_loss(
            out["volume_logits"], out["volume_points"], xyz_true, present, config.loss_3d_peak_sigma_mm)
    if config.loss_routing_weight > 0 and "routing" in out:
        terms["routing"] = config.loss_routing_weight * routing_loss(out["routing"], pixels_true, present, image_hw)
    if "centres" in out and config.loss_centre_weight > 0:
        terms["centres"] = config.loss_centre_weight * centre_loss(out["centres"], batch["centres"],
                                                                   batch["centre_inside"].bool(), image_hw)
    if config.loss_look_consistency_weight > 0 and batch.get("paired_looks"):
        terms["looks"] = config.loss_look_consistency_weight * look_consistency(out, present,
                                                                              config.loss_3d_scale_mm)
    terms["total"] = sum(terms.values())
    return terms
