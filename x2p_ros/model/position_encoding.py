"""2D sine position encoding, shared by the prompt FE and the BrickFormer."""
from __future__ import annotations

import numpy as np
import torch

from .. import geometry


def sine_positions(h: int, w: int, dim: int, device=None, max_cycles: float = 0.0) -> torch.Tensor:
    """(h*w, dim) encodings of an h x w grid over the image.

    max_cycles 0: DETR's doubling frequencies (pi * 2^k, k < dim / 4) on positions from 0 at the
    first cell to 1 at the last, which the `cpu` models were trained with; most of those bands lie
    above the grid's Nyquist frequency (they alias), and grids of two sizes give the same point
    two codes. max_cycles > 0: each cell's centre in the image (a point has one code on every
    grid) and dim / 4 frequencies spaced evenly in log from half a cycle to max_cycles cycles per
    image side (below Nyquist on every grid of at least 2 * max_cycles cells)."""
    if max_cycles > 0:
        # made on the device: a copy from the host would end a CUDA graph's capture (cuda_graph.py)
        y = geometry.cell_to_pixel(torch.arange(h, dtype=torch.float32, device=device), h, 1.0) + 0.5
        x = geometry.cell_to_pixel(torch.arange(w, dtype=torch.float32, device=device), w, 1.0) + 0.5
        cycles = torch.logspace(np.log10(0.5), np.log10(max_cycles), dim // 4, device=device)
        freqs = 2 * torch.pi * cycles
    else:
        y, x = torch.linspace(0, 1, h, device=device), torch.linspace(0, 1, w, device=device)
        freqs = 2.0 ** torch.arange(dim // 4, device=device) * torch.pi
    y, x = torch.meshgrid(y, x, indexing="ij")
    enc = [torch.sin(x[..., None] * freqs), torch.cos(x[..., None] * freqs),
           torch.sin(y[..., None] * freqs), torch.cos(y[..., None] * freqs)]
    return torch.cat(enc, dim=-1).reshape(h * w, -1)  # (h*w, dim)
