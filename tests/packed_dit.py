"""A small video DiT whose self-attention runs through flash-attn's packed entry point: every sample's
video tokens laid end to end ([B*N, H, D]) with cumulative sequence lengths, as varlen deployments do."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class PackedSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from flash_attn import flash_attn_varlen_func

        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b * n, 3, self.heads, self.head_dim).unbind(1)
        cu = torch.tensor([i * n for i in range(b + 1)], dtype=torch.int32, device=x.device)
        out = flash_attn_varlen_func(q, k, v, cu, cu, n, n)
        return self.proj(out.reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.attn = PackedSelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.modulation = nn.Linear(dim, 6 * dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(F.silu(c))[:, None].chunk(6, dim=-1)
        x = x + gate1 * self.attn(self.norm1(x) * (1 + scale1) + shift1)
        h = self.norm2(x) * (1 + scale2) + shift2
        return x + gate2 * self.fc2(F.gelu(self.fc1(h)))


class PackedDiT(nn.Module):
    """forward(x [B, C, F, H, W], timestep [B]) -> [B, C, F, H, W]."""

    def __init__(self, channels: int = 4, dim: int = 32, heads: int = 2, depth: int = 3, patch: int = 2):
        super().__init__()
        self.dim, self.patch, self.channels = dim, patch, channels
        self.embed = nn.Conv3d(channels, dim, (1, patch, patch), (1, patch, patch))
        self.t_mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.out = nn.Linear(dim, patch * patch * channels)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        b, _, f, h, w = x.shape
        half = self.dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
        c = self.t_mlp(torch.cat([torch.cos(timestep[:, None] * freqs), torch.sin(timestep[:, None] * freqs)], -1))
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        for block in self.blocks:
            tokens = block(tokens, c)
        p, hp, wp = self.patch, h // self.patch, w // self.patch
        out = self.out(tokens).view(b, f, hp, wp, p, p, self.channels)
        return out.permute(0, 6, 1, 2, 4, 3, 5).reshape(b, self.channels, f, h, w)
