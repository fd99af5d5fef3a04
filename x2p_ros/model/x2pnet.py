"""X2P-Net: two views and a prompt on each -> N vertebrae in 3D (mm) and N
2D heatmaps per view."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import geometry
from .brickformer import SCE
from .config import X2PConfig
from .fusion import Fusion3D
from .prompt_fe import PromptFE
from .vfe import VFE


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


class LiftingHead(nn.Module):
    """The baseline: per view, N heatmaps at the high resolution from the
    high-resolution and prompt-enhanced features; 2D soft-argmax; two-view
    triangulation with the index as the correspondence."""

    def __init__(self, c_in: int, n_vertebrae: int):
        super().__init__()
        self.head = nn.Sequential(nn.Conv2d(c_in, c_in, 3, padding=1), nn.ReLU(inplace=True),
                                  nn.Conv2d(c_in, n_vertebrae, 1))
        self.sharpness = nn.Parameter(torch.tensor(20.0))  # softmax temperature on the heatmaps

    def forward(self, features, P, image_hw):
        B, V = P.shape[:2]
        maps = self.head(features)  # (B*V, N, h, w), linear heatmaps
        maps = maps.reshape(B, V, *maps.shape[1:])
        pixels = soft_argmax_2d(maps * self.sharpness, image_hw)  # (B, V, N, 2)
        xyz = geometry.triangulate_torch(P.double(), pixels.double()).to(P.dtype)  # (B, N, 3)
        return {"heatmaps": maps, "pixels": pixels, "xyz": xyz, "presence": presence(maps)}


class X2PNet(nn.Module):
    def __init__(self, config: X2PConfig):
        super().__init__()
        self.config = cfg = config
        self.vfe = VFE(cfg.base_channels, cfg.hires_stride)
        self.fe = PromptFE(self.vfe.lowres_channels, cfg.d_model, cfg.heads, cfg.fe_layers, cfg.prompt_radius,
                           cfg.use_prompt)
        if cfg.lifting:
            self.lifting = LiftingHead(self.vfe.hires_channels + cfg.d_model, cfg.n_vertebrae)
            self.sce = self.fusion = None
            return
        self.sce = SCE(cfg.d_model, cfg.heads, cfg.sce_layers, cfg.n_vertebrae, cfg.embed_size, cfg.pool_stride,
                       cfg.top_k, cfg.sce_attention) if cfg.use_sce else None
        # Fusion input: heatmaps (unless no SCE) and the high-resolution features
        # with the masked features upsampled (unless "no fusion": heatmaps alone).
        c_in = (cfg.n_vertebrae if cfg.use_sce else 0)
        if cfg.use_fusion or not cfg.use_sce:
            c_in += self.vfe.hires_channels + cfg.d_model
        self.fusion = Fusion3D(c_in, cfg.fusion_channels, cfg.n_vertebrae, cfg.volume_shape, cfg.volume_width)

    def forward(self, images, P, prompt):
        """images (B, V, 1, H, W) normalised; P (B, V, 3, 4) mm -> px; prompt (B, V, 2) px.

        Returns a dict: xyz (B, N, 3) mm; heatmaps (B, V, N, S, S) (absent without
        SCE); presence (B, N) in [0, 1]; pixels (B, V, N, 2) heatmap peaks."""
        cfg = self.config
        B, V, _, H, W = images.shape
        low, high = self.vfe(images.flatten(0, 1))  # (B*V, 8c, H/8, W/8), (B*V, c_hi, H/s, W/s)
        f_m = self.fe(low, prompt.flatten(0, 1).float(), (H, W))  # (B*V, d, H/8, W/8)
        if cfg.lifting:
            features = torch.cat([high, F.interpolate(f_m, size=high.shape[-2:], mode="bilinear",
                                                      align_corners=False)], dim=1)
            return self.lifting(features, P, (H, W))
        parts, out = [], {}
        if self.sce is not None:
            maps, _ = self.sce(f_m)  # (B*V, N, S, S)
            out["heatmaps"] = maps.reshape(B, V, *maps.shape[1:])
            out["presence"] = presence(out["heatmaps"])  # (B, N)
            out["pixels"] = heatmap_peaks(out["heatmaps"], (H, W))
            parts.append(F.interpolate(maps, size=high.shape[-2:], mode="bilinear", align_corners=False))
        if cfg.use_fusion or self.sce is None:
            parts += [high, F.interpolate(f_m, size=high.shape[-2:], mode="bilinear", align_corners=False)]
        features = torch.cat(parts, dim=1)
        features = features.reshape(B, V, *features.shape[1:])  # (B, V, C, h, w)
        anchor = geometry.triangulate_torch(P.double(), prompt.double()[:, :, None])[:, 0].to(P.dtype)  # (B, 3)
        out["volume_logits"], out["xyz"] = self.fusion(features, P, anchor, (H, W))
        if self.sce is None:
            out["presence"] = torch.ones(out["xyz"].shape[:2], device=images.device)
        return out
