"""A small video DiT whose self-attention is a linear attention (Sana-style), written for the tests.

ReLU feature maps, K^T V first and then Q (K^T V), normalised by Q (sum of K): no softmax, no SDPA
call.  adaLN-modulated blocks in a ModuleList, a Conv3d patch embedding, a sinusoidal timestep
embedding and an MLP: what the analysis must find without an attention call to anchor on.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LinearAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k = torch.relu(q), torch.relu(k)
        kv = k.transpose(-1, -2) @ v  # [B, H, D, D]: the token axis is contracted first
        num = q @ kv
        den = q @ k.sum(dim=2, keepdim=True).transpose(-1, -2)
        out = num / (den + 1e-6)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.attn = LinearAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.ada = nn.Linear(dim, 6 * dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        s1, b1, g1, s2, b2, g2 = self.ada(c).unsqueeze(1).chunk(6, dim=-1)
        x = x + g1 * self.attn(self.norm1(x) * (1 + s1) + b1)
        return x + g2 * self.mlp(self.norm2(x) * (1 + s2) + b2)


class LinearDiT(nn.Module):
    def __init__(self, channels: int = 4, dim: int = 32, heads: int = 2, depth: int = 3, patch: int = 2):
        super().__init__()
        self.dim, self.patch = dim, patch
        self.embed = nn.Conv3d(channels, dim, kernel_size=(1, patch, patch), stride=(1, patch, patch))
        self.t_mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.out = nn.Linear(dim, channels * patch * patch)

    def timestep_embedding(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        b, ch, f, h, w = x.shape
        tokens = self.embed(x)  # [B, C, F, H/p, W/p]
        gf, gh, gw = tokens.shape[2:]
        tokens = tokens.flatten(2).transpose(1, 2)
        c = self.t_mlp(self.timestep_embedding(timestep))
        for block in self.blocks:
            tokens = block(tokens, c)
        out = self.out(tokens).reshape(b, gf, gh, gw, ch, self.patch, self.patch)
        return out.permute(0, 4, 1, 2, 5, 3, 6).reshape(b, ch, f, h, w)
