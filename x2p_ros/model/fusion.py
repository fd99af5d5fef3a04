"""3D multi-view fusion: 2D features of both views unprojected into one
pseudo-3D volume anchored at the triangulated prompt, 3D convolutions to N
heatmaps, soft-argmax to N points (mm, reference frame).

With a heatmap prior, vertebra n's 3D logits also get, at every voxel, the
sum over the views of the log of n's own 2D heatmap at the voxel's
projection, times a learned weight: the volume peaks where both views'
heatmaps of that vertebra back-project and meet. Unprojected among 100 other
feature channels and mixed by a 1x1 convolution, the heatmaps alone left the
3D estimates unchanged when swapped for zeros (issue 12).

The volume's axes come from the views: e_z is the images' common "up", e_y
the AP viewing direction made orthogonal to it, e_x = e_y x e_z. It spans the
vertical field of view at the prompt's depth, from a little above the prompt
downwards, and volume_width of that laterally and in depth.

Pixel convention (docs/design.md, section 1) in grid_sample with align_corners=False:
pixel centre u of a W-wide image is at x = (2u + 1) / W - 1 at every feature
resolution; x always pairs with W and y with H.

The geometry (frame, voxel centres, projections, sampling, soft-argmax) runs in
float32 even under bf16 autocast: millimetre coordinates of a few hundred and
pixel coordinates of a few hundred lose whole millimetres and pixels in bf16's
8-bit mantissa, and a 1 mm step projected in bf16 can round to no step at all.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import geometry

TOP_MARGIN = 0.1  # share of the vertical extent kept above the prompt
PRIOR_FLOOR = 1e-3  # heatmap value whose log bounds the prior: a view without the vertebra cannot veto a voxel
HEIGHT_RANGE_MM = (10.0, 3000.0)  # the vertical extent stays finite and positive whatever the geometry


def volume_frame(P, image_hw, anchor, width: float):
    """Axes (B, 3, 3) as columns e_x, e_y, e_z, and extents (B, 3) in mm along them.

    Each view's "up" (the direction of -v at the detector) is flipped to agree
    with the AP view's before they are averaged, so that a view shown upside
    down (a rotated or flipped C-arm image) cannot cancel the other one; the
    average then always has a part orthogonal to the AP ray of at least 1/2."""
    M = P[..., :3]  # (B, V, 3, 3)
    sign = torch.sign(geometry.det3_torch(M))[..., None]
    basis = torch.eye(3, dtype=P.dtype, device=P.device)
    ups = F.normalize(-geometry.solve3_torch(M, basis[1]) * sign, dim=-1)  # (B, V, 3)
    agree = torch.where((ups * ups[:, :1]).sum(-1, keepdim=True) < 0, -1.0, 1.0).to(ups.dtype)  # (B, V, 1)
    up = F.normalize((ups * agree).mean(1), dim=-1)  # (B, 3)
    centre_ray = geometry.solve3_torch(M[:, 0], basis[2]) * sign[:, 0]  # AP view direction
    e_y = F.normalize(centre_ray - (centre_ray * up).sum(-1, keepdim=True) * up, dim=-1)
    e_x = torch.cross(e_y, up, dim=-1)
    axes = torch.stack([e_x, e_y, up], dim=-1)
    # vertical extent: image height over the px-per-mm of a vertical step at the anchor
    ends = torch.stack([anchor, anchor + up], dim=1)[:, None].expand(-1, P.shape[1], -1, -1)  # (B, V, 2, 3)
    uv, _ = geometry.project_torch(P, ends)
    px_per_mm = (uv[:, :, 1] - uv[:, :, 0]).norm(dim=-1).mean(1)  # (B,)
    # an anchor at a source projects to infinity: the largest extent then, never NaN
    height = torch.nan_to_num(image_hw[0] / px_per_mm, nan=HEIGHT_RANGE_MM[1]).clamp(*HEIGHT_RANGE_MM)
    extents = torch.stack([width * height, width * height, height], dim=-1)
    return axes, extents


def voxel_centres(anchor, axes, extents, shape):
    """World coordinates (B, D, Hy, Wx, 3) of the voxel centres; index 0 along D is the top."""
    D, Hy, Wx = shape
    dev, dt = anchor.device, anchor.dtype
    z = TOP_MARGIN - (torch.arange(D, device=dev, dtype=dt) + 0.5) / D  # (D,) shares of the height, downwards
    y = (torch.arange(Hy, device=dev, dtype=dt) + 0.5) / Hy - 0.5
    x = (torch.arange(Wx, device=dev, dtype=dt) + 0.5) / Wx - 0.5
    grid = torch.stack(torch.meshgrid(x, y, z, indexing="xy"), dim=-1)  # (Hy, Wx, D, 3) as (x, y, z) shares
    grid = grid.permute(2, 0, 1, 3)  # (D, Hy, Wx, 3)
    offsets = grid[None] * extents[:, None, None, None, :]  # (B, D, Hy, Wx, 3) mm along e_x, e_y, e_z
    return anchor[:, None, None, None] + offsets @ axes.transpose(-1, -2)[:, None, None]


def unproject(features, P, points, image_hw):
    """Samples view features at the projections of 3D points.

    features (B, V, C, h, w); P (B, V, 3, 4); points (B, D, Hy, Wx, 3) ->
    (B, V, C, D, Hy, Wx), zero where a point projects outside an image or lies
    behind its source."""
    B, V, C, h, w = features.shape
    H, W = image_hw
    pts = points.reshape(B, 1, -1, 3).expand(B, V, -1, 3)
    uv, depth = geometry.project_torch(P, pts)  # (B, V, X, 2)
    grid = torch.stack([geometry.pixel_to_grid(uv[..., 0], W), geometry.pixel_to_grid(uv[..., 1], H)], dim=-1)
    grid = torch.where((depth > 0)[..., None], grid, torch.full_like(grid, 2.0))  # behind: outside
    sampled = F.grid_sample(features.reshape(B * V, C, h, w), grid.reshape(B * V, 1, -1, 2).to(features.dtype),
                            align_corners=False)  # (B*V, C, 1, X)
    return sampled.reshape(B, V, C, *points.shape[1:4])


def conv3d_block(c_in, c_out, stride=1):
    return nn.Sequential(nn.Conv3d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
                         nn.GroupNorm(min(8, c_out // 2), c_out), nn.ReLU(inplace=True))


class Fusion3D(nn.Module):
    """View features (B, V, C, h, w) -> 3D heatmap logits (B, N, D, Hy, Wx), points (B, N, 3) and
    the voxel centres (B, D, Hy, Wx, 3)."""

    def __init__(self, c_in: int, channels: int, n_vertebrae: int, volume_shape, width: float,
                 heatmap_prior: bool = False):
        super().__init__()
        self.reduce = nn.Conv2d(c_in, channels, 1)
        # weight of the heatmaps' log prior on the logits, learned; 1: the prior as it is
        self.prior_weight = nn.Parameter(torch.ones(())) if heatmap_prior else None
        self.volume_shape, self.width = tuple(volume_shape), width
        c = 2 * channels
        self.enc = conv3d_block(channels, c)
        self.down = conv3d_block(c, 2 * c, stride=2)
        self.up = nn.ConvTranspose3d(2 * c, c, 2, stride=2)
        self.dec = conv3d_block(2 * c, c)
        self.head = nn.Conv3d(c, n_vertebrae, 1)

    def forward(self, features, P, anchor, image_hw, heatmaps=None):
        """heatmaps (B, V, N, S, S) in [0, 1]: the 2D heatmaps of the prior (needed with one)."""
        B, V = features.shape[:2]
        f = self.reduce(features.flatten(0, 1))  # (B*V, c, h, w)
        f = f.reshape(B, V, *f.shape[1:])
        with torch.autocast(f.device.type, enabled=False):  # geometry in float32 (see the module's note)
            P, anchor = P.float(), anchor.float()
            axes, extents = volume_frame(P, image_hw, anchor, self.width)
            points = voxel_centres(anchor, axes, extents, self.volume_shape)  # (B, D, Hy, Wx, 3)
            volume = unproject(f.float(), P, points, image_hw).mean(1)  # (B, c, D, Hy, Wx): views averaged
        x = self.enc(volume)
        x = self.dec(torch.cat([self.up(self.down(x)), x], dim=1))
        logits = self.head(x)  # (B, N, D, Hy, Wx)
        with torch.autocast(logits.device.type, enabled=False):
            if self.prior_weight is not None:
                sampled = unproject(heatmaps.float(), P, points, image_hw)  # (B, V, N, D, Hy, Wx)
                logits = logits.float() + self.prior_weight * sampled.clamp_min(PRIOR_FLOOR).log().sum(1)
            prob = logits.flatten(2).float().softmax(-1)  # (B, N, X)
            xyz = prob @ points.reshape(B, -1, 3)  # soft-argmax (B, N, 3)
        return logits, xyz, points
