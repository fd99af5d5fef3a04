"""The lifting baseline on X2P-Net's encoder: per view N heatmaps at the high
resolution, 2D soft-argmax, closed-form two-view triangulation with the index
as the correspondence."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import geometry
from .config import X2PConfig
from .encoder import BiplanarEncoder
from .heatmaps import presence, soft_argmax_2d


class LiftingHead(nn.Module):
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


class LiftingBaseline(BiplanarEncoder):
    def __init__(self, config: X2PConfig):
        super().__init__(config)
        self.lifting = LiftingHead(self.vfe.hires_channels + config.d_model, config.n_vertebrae)

    def forward(self, images, P, prompt):
        """As X2PNet.forward: xyz (B, N, 3) mm, heatmaps (B, V, N, h, w), presence (B, N), pixels (B, V, N, 2);
        with a centre head, centres (B, V, H/s, W/s)."""
        high, f_m = self.encode(images, prompt)
        features = torch.cat([high, F.interpolate(f_m, size=high.shape[-2:], mode="bilinear", align_corners=False)],
                             dim=1)  # (B*V, c_hi + d, H/s, W/s)
        out = self.lifting(features, P, images.shape[-2:])
        if self.centre_head is not None:
            out["centres"] = self.centres(images)  # (B, V, H/s, W/s)
        return out
