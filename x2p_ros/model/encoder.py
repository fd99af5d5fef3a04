"""The part X2P-Net and the lifting baseline share: the VFE of each view and
the prompt-guided FE."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .centres import CentreHead
from .config import X2PConfig
from .prompt_fe import PromptFE
from .vfe import VFE


def flatten_background(images, sigma_px: float):
    """images (N, 1, H, W) minus their Gaussian blur of sigma_px, scaled so that the median absolute value is
    1/4 and clipped to [-1.5, 1.5] as `preprocess.normalize` clips. C-arms compress a radiograph's dynamic range
    this way before display: what is left is the bone's local contrast, without the body's thickness gradient
    or the exposure, which differ more between patients than between vertebrae. The median, not the spread,
    sets the scale, so that a collimator's or a round field's edge does not dim the spine."""
    with torch.autocast(images.device.type, enabled=False):  # in bf16 the detail left is at its rounding step
        x = images.float()
        radius = min(int(3 * sigma_px), max(x.shape[-2:]) - 1)
        t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
        kernel = torch.exp(-0.5 * (t / sigma_px) ** 2)
        kernel = kernel / kernel.sum()
        padded = F.pad(x, (radius,) * 4, mode="replicate")  # (N, 1, H + 2r, W + 2r)
        blurred = F.conv2d(F.conv2d(padded, kernel.view(1, 1, 1, -1)), kernel.view(1, 1, -1, 1))  # (N, 1, H, W)
        detail = x - blurred
        scale = detail.abs().flatten(1).median(dim=1).values.clamp_min(1e-6)  # (N,)
        return (detail / (4 * scale.view(-1, 1, 1, 1))).clamp(-1.5, 1.5).to(images.dtype)


class BiplanarEncoder(nn.Module):
    """Base of both methods: images (B, V, 1, H, W) and prompts (B, V, 2) px ->
    high-resolution features and masked features f_m of every view."""

    def __init__(self, config: X2PConfig):
        super().__init__()
        self.config = cfg = config
        self.vfe = VFE(cfg.base_channels, cfg.hires_stride)
        self.fe = PromptFE(self.vfe.lowres_channels, cfg.d_model, cfg.heads, cfg.fe_layers, cfg.prompt_radius,
                           cfg.use_prompt, cfg.position_max_cycles)
        self.centre_head = CentreHead(cfg.base_channels, cfg.hires_stride) if cfg.centre_head else None

    def encode(self, images, prompt):
        """-> high (B*V, c_hi, H/s, W/s) and f_m (B*V, d, H/8, W/8), views along the batch."""
        H, W = images.shape[-2:]
        views = self._views(images)
        low, high = self.vfe(views)  # (B*V, 8c, H/8, W/8), (B*V, c_hi, H/s, W/s)
        f_m = self.fe(low, prompt.flatten(0, 1).float(), (H, W))  # (B*V, d, H/8, W/8)
        return high, f_m

    def _views(self, images):
        """images (B, V, 1, H, W) -> (B*V, 1, H, W) as the U-Nets take them."""
        views = images.flatten(0, 1)  # (B*V, 1, H, W)
        if self.config.background_sigma > 0:
            views = flatten_background(views, self.config.background_sigma * max(images.shape[-2:]))
        return views

    def centres(self, images):
        """The centre head's maps (B, V, H/s, W/s) of images (B, V, 1, H, W)."""
        maps = self.centre_head(self._views(images))  # (B*V, 1, H/s, W/s)
        return maps.reshape(*images.shape[:2], *maps.shape[-2:])
