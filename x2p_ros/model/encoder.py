"""The part X2P-Net and the lifting baseline share: the VFE of each view and
the prompt-guided FE."""
from __future__ import annotations

from torch import nn

from .config import X2PConfig
from .prompt_fe import PromptFE
from .vfe import VFE


class BiplanarEncoder(nn.Module):
    """Base of both methods: images (B, V, 1, H, W) and prompts (B, V, 2) px ->
    high-resolution features and masked features f_m of every view."""

    def __init__(self, config: X2PConfig):
        super().__init__()
        self.config = cfg = config
        self.vfe = VFE(cfg.base_channels, cfg.hires_stride)
        self.fe = PromptFE(self.vfe.lowres_channels, cfg.d_model, cfg.heads, cfg.fe_layers, cfg.prompt_radius,
                           cfg.use_prompt, cfg.position_max_cycles)

    def encode(self, images, prompt):
        """-> high (B*V, c_hi, H/s, W/s) and f_m (B*V, d, H/8, W/8), views along the batch."""
        H, W = images.shape[-2:]
        low, high = self.vfe(images.flatten(0, 1))  # (B*V, 8c, H/8, W/8), (B*V, c_hi, H/s, W/s)
        f_m = self.fe(low, prompt.flatten(0, 1).float(), (H, W))  # (B*V, d, H/8, W/8)
        return high, f_m
