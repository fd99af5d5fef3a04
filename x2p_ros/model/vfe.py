"""Visual feature extraction (VFE): a 4-level 2D U-Net with spatial pyramid
pooling at the bottleneck, shared by both views."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    groups = min(8, c_out // 2)
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.GroupNorm(groups, c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.GroupNorm(groups, c_out), nn.ReLU(inplace=True))


class SpatialPyramidPooling(nn.Module):
    """Max pools of growing windows at stride 1, concatenated: context at several scales."""

    def __init__(self, channels: int, windows=(5, 9, 13)):
        super().__init__()
        self.windows = windows
        self.fuse = nn.Conv2d(channels * (len(windows) + 1), channels, 1)

    def forward(self, x):
        pooled = [F.max_pool2d(x, w, stride=1, padding=w // 2) for w in self.windows]
        return F.relu(self.fuse(torch.cat([x, *pooled], dim=1)))


class VFE(nn.Module):
    """(B, 1, H, W) -> low-resolution features (B, 8c, H/8, W/8) and
    high-resolution features (B, c_hi, H/hires_stride, W/hires_stride)."""

    def __init__(self, base: int, hires_stride: int = 2):
        super().__init__()
        c = [base, 2 * base, 4 * base, 8 * base]
        self.down = nn.ModuleList([conv_block(1, c[0]), conv_block(c[0], c[1]), conv_block(c[1], c[2]),
                                   conv_block(c[2], c[3])])
        self.spp = SpatialPyramidPooling(c[3])
        levels = {8: 0, 4: 1, 2: 2, 1: 3}[hires_stride]  # decoder steps up from stride 8
        self.up = nn.ModuleList([nn.ConvTranspose2d(c[3 - i], c[2 - i], 2, stride=2) for i in range(levels)])
        self.dec = nn.ModuleList([conv_block(2 * c[2 - i], c[2 - i]) for i in range(levels)])
        self.hires_channels = c[3 - levels]
        self.lowres_channels = c[3]

    def forward(self, x):
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        low = self.spp(x)  # (B, 8c, H/8, W/8)
        x = low
        for up, dec, skip in zip(self.up, self.dec, reversed(skips[:-1])):
            x = dec(torch.cat([up(x), skip], dim=1))
        return low, x
