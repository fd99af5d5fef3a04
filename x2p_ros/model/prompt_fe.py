"""Prompt-guided feature enhancement (FE): every feature attends to the
features under the square prompt mask; the vertical distance to the prompt is
added as the cross-view cue (both views share the vertical axis)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import geometry
from .position_encoding import sine_positions


class AttentionLayer(nn.Module):
    """Pre-norm cross-attention + feed-forward."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.norm_q, self.norm_kv, self.norm_ff = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, q, kv, key_padding_mask=None):
        kv = self.norm_kv(kv)
        q = q + self.attn(self.norm_q(q), kv, kv, key_padding_mask=key_padding_mask, need_weights=False)[0]
        return q + self.ff(self.norm_ff(q))


class PromptFE(nn.Module):
    """(B, C, h, w) stride-8 features and a prompt per image (B, 2) px -> f_m (B, d, h, w)."""

    def __init__(self, c_in: int, d: int, heads: int, layers: int, prompt_radius: int, use_prompt: bool = True,
                 position_max_cycles: float = 0.0):
        super().__init__()
        self.position_max_cycles = position_max_cycles
        self.proj = nn.Conv2d(c_in, d, 1)
        self.use_prompt = use_prompt
        self.radius = prompt_radius
        self.layers = nn.ModuleList([AttentionLayer(d, heads) for _ in range(layers)]) if use_prompt else None

    def forward(self, f, prompt, image_hw):
        B, _, h, w = f.shape
        H, W = image_hw
        f = self.proj(f)  # (B, d, h, w)
        if not self.use_prompt:
            return f
        d = f.shape[1]
        pos = sine_positions(h, w, d, f.device, self.position_max_cycles)  # (h*w, d)
        tokens = f.flatten(2).transpose(1, 2) + pos  # (B, h*w, d)
        # Prompt features f_p: the tokens under the square mask M_p, gathered at
        # fixed size with grid_sample; cells outside the image are padding.
        # The prompt stays float32 under autocast: bf16 holds pixels of a 512 image to 2 px.
        prompt = prompt.float()
        n = max(2 * self.radius // 8, 1)
        offsets = (torch.arange(n, device=f.device, dtype=torch.float32) - (n - 1) / 2) * 8  # px
        gy, gx = torch.meshgrid(offsets, offsets, indexing="ij")
        u = prompt[:, 0, None, None] + gx  # (B, n, n) px
        v = prompt[:, 1, None, None] + gy
        grid = torch.stack([geometry.pixel_to_grid(u, W), geometry.pixel_to_grid(v, H)], dim=-1)
        f_p = F.grid_sample(f + pos.T.reshape(1, d, h, w), grid.to(f.dtype), align_corners=False)  # (B, d, n, n)
        f_p = f_p.flatten(2).transpose(1, 2)  # (B, n*n, d)
        outside = ((grid.abs() > 1).any(-1)).flatten(1)  # (B, n*n)
        # the cell at (or, for even n, just below and right of) the prompt always counts, so
        # that no attention row is left without a key (a softmax over nothing is NaN)
        outside[:, (n // 2) * n + n // 2] = False
        for layer in self.layers:
            tokens = layer(tokens, f_p, key_padding_mask=outside)
        f_e = tokens.transpose(1, 2).reshape(B, d, h, w)
        # f_m = f_e * [M_d > 0] + M_d, M_d = |y - y0| normalised by the image height
        rows = geometry.cell_to_pixel(torch.arange(h, device=f.device, dtype=torch.float32), h, H)  # row centres, px
        m_d = ((rows[None, :] - prompt[:, 1:2]).abs() / H)[:, None, :, None].expand(B, 1, h, w)
        return f_e * (m_d > 0.5 * 8 / H) + m_d.to(f_e.dtype)
