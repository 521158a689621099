"""A plain-PyTorch Open-Sora-style video DiT (STDiT): spatial and temporal blocks alternate.

Written for ditopt's tests so that nothing depends on diffusers class names.
Each block: adaLN-single modulated self-attention (over the H x W tokens of a
frame, or over the F frames of a position), cross-attention to text, and a
gated MLP, with the shared timestep modulation plus a per-block table, as in
Open-Sora 1.2's STDiT3.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim or dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        ctx = x if context is None else context
        q = self.q(x).view(b, n, self.heads, -1).transpose(1, 2)
        k, v = self.kv(ctx).view(b, ctx.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class STDiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, temporal: bool):
        super().__init__()
        self.temporal = temporal
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.cross_attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)

    def forward(self, x, y, t_mod, frames: int, spatial: int):
        b = x.shape[0]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + t_mod.reshape(b, 6, -1)
        ).chunk(6, dim=1)
        h = self.norm1(x) * (1 + scale_msa) + shift_msa
        d = h.shape[-1]
        if self.temporal:  # attend over frames at each spatial position
            h = h.view(b, frames, spatial, d).transpose(1, 2).reshape(b * spatial, frames, d)
            h = self.attn(h).view(b, spatial, frames, d).transpose(1, 2).reshape(b, frames * spatial, d)
        else:  # attend over the positions of each frame
            h = self.attn(h.reshape(b * frames, spatial, d)).reshape(b, frames * spatial, d)
        x = x + gate_msa * h
        x = x + self.cross_attn(x, y)
        h = self.norm2(x) * (1 + scale_mlp) + shift_mlp
        return x + gate_mlp * self.mlp(h)


class STDiT(nn.Module):
    """forward(x [B, C, F, H, W], timestep [B], y [B, L, caption_dim]) -> [B, C_out, F, H, W]."""

    def __init__(self, in_channels=4, out_channels=4, dim=64, heads=2, depth=2, patch=2, caption_dim=32, mlp_ratio=4.0):
        super().__init__()
        self.patch, self.dim, self.out_channels = patch, dim, out_channels
        self.x_embedder = nn.Conv3d(in_channels, dim, kernel_size=(1, patch, patch), stride=(1, patch, patch))
        self.t_embedder = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.y_embedder = nn.Sequential(nn.Linear(caption_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.spatial_blocks = nn.ModuleList(STDiTBlock(dim, heads, mlp_ratio, temporal=False) for _ in range(depth))
        self.temporal_blocks = nn.ModuleList(STDiTBlock(dim, heads, mlp_ratio, temporal=True) for _ in range(depth))
        self.final_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.final_table = nn.Parameter(torch.randn(2, dim) / dim**0.5)
        self.final_proj = nn.Linear(dim, patch * patch * out_channels)

    def forward(self, x, timestep, y):
        b, _, frames, height, width = x.shape
        hp, wp = height // self.patch, width // self.patch
        x = self.x_embedder(x).flatten(2).transpose(1, 2)  # [B, F*H*W, D], frame-major
        t = self.t_embedder(timestep_embedding(timestep, self.dim))
        t_mod = self.t_block(t)
        y = self.y_embedder(y)
        for spatial_block, temporal_block in zip(self.spatial_blocks, self.temporal_blocks):
            x = spatial_block(x, y, t_mod, frames, hp * wp)
            x = temporal_block(x, y, t_mod, frames, hp * wp)
        shift, scale = (self.final_table[None] + t[:, None]).chunk(2, dim=1)
        x = self.final_proj(self.final_norm(x) * (1 + scale) + shift)
        x = x.view(b, frames, hp, wp, self.patch, self.patch, self.out_channels)
        return x.permute(0, 6, 1, 2, 4, 3, 5).reshape(b, self.out_channels, frames, height, width)
