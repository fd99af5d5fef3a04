"""X2P-Net: two views and a prompt on each -> N vertebrae in 3D (mm) and N
2D heatmaps per view."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import geometry
from .brickformer import SCE
from .config import X2PConfig
from .encoder import BiplanarEncoder
from .fusion import Fusion3D
from .heatmaps import heatmap_peaks, presence


class X2PNet(BiplanarEncoder):
    def __init__(self, config: X2PConfig):
        if config.lifting:
            raise ValueError("a lifting config makes the lifting baseline: use build_model(config)")
        super().__init__(config)
        cfg = config
        self.sce = SCE(cfg.d_model, cfg.heads, cfg.sce_layers, cfg.n_vertebrae, cfg.embed_size, cfg.pool_stride,
                       cfg.top_k, cfg.sce_attention, cfg.sce_ffn_dim, cfg.position_max_cycles) if cfg.use_sce else None
        # Fusion input: heatmaps (unless no SCE) and the high-resolution features
        # with the masked features upsampled (unless "no fusion": heatmaps alone).
        c_in = (cfg.n_vertebrae if cfg.use_sce else 0)
        if cfg.use_fusion or not cfg.use_sce:
            c_in += self.vfe.hires_channels + cfg.d_model
        self.fusion = Fusion3D(c_in, cfg.fusion_channels, cfg.n_vertebrae, cfg.volume_shape, cfg.volume_width,
                               cfg.heatmap_prior)

    def forward(self, images, P, prompt):
        """images (B, V, 1, H, W) normalised; P (B, V, 3, 4) mm -> px; prompt (B, V, 2) px.

        Returns a dict: xyz (B, N, 3) mm; heatmaps (B, V, N, S, S) (absent without
        SCE); presence (B, N) in [0, 1]; pixels (B, V, N, 2) heatmap peaks; the 3D
        volume's logits (B, N, D, Hy, Wx) and voxel centres (B, D, Hy, Wx, 3) mm; the
        BrickFormer's routing (B, V, layers, N, P) over its P bricks (brick attention only); with a centre head,
        its maps of every vertebral centre (B, V, H/s, W/s)."""
        cfg = self.config
        B, V, _, H, W = images.shape
        high, f_m = self.encode(images, prompt)  # (B*V, c_hi, H/s, W/s), (B*V, d, H/8, W/8)
        parts, out = [], {}
        if self.sce is not None:
            maps, _, routing = self.sce(f_m)  # (B*V, N, S, S), (B*V, layers, N, P) or None
            out["heatmaps"] = maps.reshape(B, V, *maps.shape[1:])
            if routing is not None:
                out["routing"] = routing.reshape(B, V, *routing.shape[1:])  # (B, V, layers, N, P)
            out["presence"] = presence(out["heatmaps"])  # (B, N)
            out["pixels"] = heatmap_peaks(out["heatmaps"], (H, W))
            parts.append(F.interpolate(maps, size=high.shape[-2:], mode="bilinear", align_corners=False))
        if cfg.use_fusion or self.sce is None:
            parts += [high, F.interpolate(f_m, size=high.shape[-2:], mode="bilinear", align_corners=False)]
        features = torch.cat(parts, dim=1)
        features = features.reshape(B, V, *features.shape[1:])  # (B, V, C, h, w)
        anchor = geometry.triangulate_torch(P.double(), prompt.double()[:, :, None])[:, 0].to(P.dtype)  # (B, 3)
        out["volume_logits"], out["xyz"], out["volume_points"] = self.fusion(features, P, anchor, (H, W),
                                                                             out.get("heatmaps"))
        if self.centre_head is not None:
            out["centres"] = self.centres(images)  # (B, V, H/s, W/s)
        if self.sce is None:
            out["presence"] = torch.ones(out["xyz"].shape[:2], device=images.device)
        return out
