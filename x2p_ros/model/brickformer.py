"""Semantic context extraction (SCE) with BrickFormer.

N learnable vertebral embeddings, each an S x S map of d-dimensional tokens,
look at the masked features f_m (B, d, h, w) through two attentions per layer:

  Attn1: embeddings -> f_m max-pooled with stride s ((h/s)(w/s) "bricks");
  top-k: the k bricks each embedding attends to most;
  Attn2: embeddings -> the k s^2 full-resolution tokens under those bricks,
         with log Attn1 of each token's brick added to the logits, so the fine
         attention is conditioned on the coarse one (and Attn1 learns through it).

Each layer's routing, Attn1 averaged over heads and queries (the distribution
its top-k is taken from), is returned for an auxiliary loss that teaches it
to find the vertebra (training/losses.py): learned through Attn2 alone, the
routing of the shipped model picked the true vertebra's brick little more
often than chance (issue 12).

Cost per layer O(hw M d / s^2 + k s^2 M d) for M = N S^2 query tokens, instead
of O(hw M d) for attention over all tokens ("vanilla"). "sparse" attends to a
fixed strided subset of tokens instead. Linear heads turn each embedding into
an S x S heatmap (linear: regressed to Gaussians of peak 1, as in pose
estimation; a sigmoid would saturate under the MSE towards the mostly-zero
targets and stop learning).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .position_encoding import sine_positions


def brick_token_indices(cells: torch.Tensor, w: int, s: int) -> torch.Tensor:
    """Full-resolution token indices (row-major over (h, w)) under pooled cells.

    cells: (..., k) indices into the (h/s, w/s) pooled grid -> (..., k, s*s)."""
    wc = w // s
    r0, c0 = (cells // wc) * s, (cells % wc) * s  # (..., k) top-left token of each brick
    dr, dc = torch.meshgrid(torch.arange(s, device=cells.device), torch.arange(s, device=cells.device), indexing="ij")
    return (r0[..., None] + dr.reshape(-1)) * w + c0[..., None] + dc.reshape(-1)


class BrickLayer(nn.Module):
    def __init__(self, d: int, heads: int, s: int, k: int, mode: str, ffn_dim: int):
        super().__init__()
        self.d, self.heads, self.s, self.k, self.mode = d, heads, s, k, mode
        self.norm_q, self.norm_kv, self.norm_ff = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        if mode == "brick":
            self.q1, self.k1 = nn.Linear(d, d), nn.Linear(d, d)
        self.q2, self.k2, self.v2, self.out = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.ff = nn.Sequential(nn.Linear(d, ffn_dim), nn.GELU(), nn.Linear(ffn_dim, d))

    def _split(self, x):  # (B, N, T, d) -> (B, N, heads, T, d/heads)
        B, N, T, _ = x.shape
        return x.reshape(B, N, T, self.heads, -1).transpose(2, 3)

    def forward(self, e, f_m, pos):
        """e: (B, N, Q, d) embeddings; f_m: (B, d, h, w); pos: (h*w, d). Returns e and the
        routing (B, N, (h/s)(w/s)) over the bricks, or None without bricks."""
        B, N, Q, d = e.shape
        q = self.norm_q(e)
        tokens = self.norm_kv(f_m.flatten(2).transpose(1, 2) + pos)  # (B, h*w, d)
        select = {"brick": self._brick_keys, "sparse": self._sparse_keys, "vanilla": self._all_keys}[self.mode]
        # (B, N, T, d), additive logits (B, N, heads, Q, T) or None, routing (B, N, P) or None
        keys, bias, routing = select(q, tokens, f_m, pos)
        out = F.scaled_dot_product_attention(self._split(self.q2(q)), self._split(self.k2(keys)),
                                             self._split(self.v2(keys)), attn_mask=bias)  # (B, N, heads, Q, d/h)
        e = e + self.out(out.transpose(2, 3).reshape(B, N, Q, d))
        return e + self.ff(self.norm_ff(e)), routing

    def _brick_keys(self, q, tokens, f_m, pos):
        """Attn1 over the pooled bricks, then the tokens under each embedding's
        top-k bricks, with log Attn1 of a token's brick as its logit bias."""
        B, N, Q, d = q.shape
        h, w = f_m.shape[-2:]
        s = self.s
        pooled = F.max_pool2d(f_m, s)  # (B, d, h/s, w/s)
        pooled_pos = F.avg_pool2d(pos.T.reshape(1, d, h, w), s)
        bricks = self.norm_kv((pooled + pooled_pos).flatten(2).transpose(1, 2))  # (B, P, d)
        logits1 = self._split(self.q1(q)) @ self._split(self.k1(bricks)[:, None]).transpose(-1, -2)
        attn1 = (logits1 / (d / self.heads) ** 0.5).softmax(-1)  # (B, N, heads, Q, P)
        routing = attn1.mean(dim=(2, 3))  # (B, N, P)
        cells = routing.topk(self.k, dim=-1).indices  # (B, N, k)
        index = brick_token_indices(cells, w, s).reshape(B, N, -1)  # (B, N, k*s*s)
        keys = torch.gather(tokens[:, None].expand(B, N, h * w, d), 2, index[..., None].expand(-1, -1, -1, d))
        # log Attn1 of each gathered token's brick, per head and query: (B, N, heads, Q, k*s*s)
        brick_attn = torch.gather(attn1, -1, cells[:, :, None, None, :].expand(-1, -1, self.heads, Q, -1))
        return keys, brick_attn.clamp_min(1e-6).log().repeat_interleave(s * s, dim=-1), routing

    def _sparse_keys(self, q, tokens, f_m, pos):
        """A fixed strided subset of the tokens (every s-th row and column)."""
        B, N = q.shape[:2]
        h, w = f_m.shape[-2:]
        keys = tokens.reshape(B, h, w, -1)[:, ::self.s, ::self.s].reshape(B, 1, -1, tokens.shape[-1])
        return keys.expand(B, N, -1, -1), None, None

    def _all_keys(self, q, tokens, f_m, pos):
        """Vanilla attention: every token."""
        B, N = q.shape[:2]
        return tokens[:, None].expand(B, N, -1, -1), None, None


class SCE(nn.Module):
    """f_m (B, d, h, w) -> heatmaps (B, N, S, S), embeddings (B, N, S*S, d) and each layer's
    routing (B, layers, N, (h/s)(w/s)) (None without bricks)."""

    def __init__(self, d: int, heads: int, layers: int, n_vertebrae: int, embed_size: int, s: int, k: int, mode: str,
                 ffn_dim: int, position_max_cycles: float = 0.0):
        super().__init__()
        self.embed_size = embed_size
        self.position_max_cycles = position_max_cycles
        self.embeddings = nn.Parameter(torch.randn(n_vertebrae, embed_size * embed_size, d) * 0.02)
        self.layers = nn.ModuleList([BrickLayer(d, heads, s, k, mode, ffn_dim) for _ in range(layers)])
        self.norm = nn.LayerNorm(d)
        self.heatmap = nn.Linear(d, 1)

    def forward(self, f_m):
        B, d, h, w = f_m.shape
        S = self.embed_size
        pos = sine_positions(h, w, d, f_m.device, self.position_max_cycles)  # (h*w, d)
        e = (self.embeddings + sine_positions(S, S, d, f_m.device, self.position_max_cycles)
             )[None].expand(B, -1, -1, -1)  # (B, N, S*S, d)
        routings = []
        for layer in self.layers:
            e, routing = layer(e, f_m, pos)
            routings.append(routing)
        heatmaps = self.heatmap(self.norm(e)).reshape(B, -1, S, S)  # (B, N, S, S)
        return heatmaps, e, torch.stack(routings, dim=1) if routings[0] is not None else None
