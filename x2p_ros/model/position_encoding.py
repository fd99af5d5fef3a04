"""2D sine position encoding (DETR style), shared by the prompt FE and the
BrickFormer."""
from __future__ import annotations

import torch


def sine_positions(h: int, w: int, dim: int, device=None) -> torch.Tensor:
    """(h*w, dim) encodings of an h x w grid, positions in [0, 1]."""
    y, x = torch.meshgrid(torch.linspace(0, 1, h, device=device), torch.linspace(0, 1, w, device=device), indexing="ij")
    freqs = 2.0 ** torch.arange(dim // 4, device=device) * torch.pi
    enc = [torch.sin(x[..., None] * freqs), torch.cos(x[..., None] * freqs),
           torch.sin(y[..., None] * freqs), torch.cos(y[..., None] * freqs)]
    return torch.cat(enc, dim=-1).reshape(h * w, -1)  # (h*w, dim)
