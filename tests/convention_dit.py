"""A small video DiT written the ways current models differ from the ones ditopt names: patchify by
reshape and a Linear (channels first or last, no convolution), a timestep per sample or per token, or
none at all (the caller embeds it), and diffusers' `cache_context` where a pipeline would give it.

Blocks are adaLN-gated (self-attention over the video tokens, cross-attention to the text, an MLP), as
in Wan and DiT, so every ditopt method has its sites.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

try:  # a diffusers CacheMixin has `cache_context`, as pipelines' transformers do
    from diffusers.models.cache_utils import CacheMixin
except ImportError:  # pragma: no cover - diffusers is a dependency
    CacheMixin = object


def sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float().unsqueeze(-1) * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.q2, self.kv2, self.proj2 = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        self.norm3 = nn.LayerNorm(dim, elementwise_affine=False)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.modulation = nn.Linear(dim, 6 * dim)

    def _heads(self, x):
        b, n, c = x.shape
        return x.view(b, n, self.heads, c // self.heads).transpose(1, 2)

    def _merge(self, x):
        b, h, n, d = x.shape
        return x.transpose(1, 2).reshape(b, n, h * d)

    def forward(self, x, text, temb):
        # temb [B, C] per sample, or [B, N, C] per token
        mod = self.modulation(F.silu(temb))
        if mod.dim() == 2:
            mod = mod.unsqueeze(1)
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=-1)
        h = self.norm1(x) * (1 + scale1) + shift1
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        a = F.scaled_dot_product_attention(self._heads(q), self._heads(k), self._heads(v))
        x = x + gate1 * self.proj(self._merge(a))
        k2, v2 = self.kv2(text).chunk(2, dim=-1)
        c = F.scaled_dot_product_attention(self._heads(self.q2(self.norm2(x))), self._heads(k2), self._heads(v2))
        x = x + self.proj2(self._merge(c))
        h = self.norm3(x) * (1 + scale2) + shift2
        return x + gate2 * self.fc2(F.gelu(self.fc1(h)))


class ConventionDiT(nn.Module, CacheMixin):
    """latent [B, C, F, H, W] (channels_last: [B, F, H, W, C]) -> the same shape.

    timestep: "sample" takes t [B]; "token" takes t [B, N] (one per video token, as Wan 2.2 TI2V's
    expand_timesteps); "embedded" takes `temb` [B, dim] the caller computed (no timestep input).
    `hint_after`: the forward changes the tokens between that block and the next."""

    def __init__(self, channels: int = 4, dim: int = 32, heads: int = 2, depth: int = 3, patch: int = 2,
                 text_dim: int = 16, channels_last: bool = False, timestep: str = "sample", hint_after: int | None = None):
        super().__init__()
        self.hint_after = hint_after  # a block after which the forward adds a text hint (as Wan VACE adds its own)
        self.channels, self.patch, self.channels_last, self.timestep = channels, patch, channels_last, timestep
        self.patch_embed = nn.Linear(channels * patch * patch, dim)
        self.text_embed = nn.Linear(text_dim, dim)
        self.time_embed = nn.Sequential(nn.Linear(64, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False)
        self.proj_out = nn.Linear(dim, channels * patch * patch)

    def embed_time(self, t: torch.Tensor) -> torch.Tensor:
        return self.time_embed(sinusoid(t, 64))

    def forward(self, x, text, t=None, temb=None):
        p = self.patch
        if self.channels_last:
            b, f, h, w, c = x.shape
            tokens = x.reshape(b, f, h // p, p, w // p, p, c).permute(0, 1, 2, 4, 3, 5, 6)
        else:
            b, c, f, h, w = x.shape
            tokens = x.reshape(b, c, f, h // p, p, w // p, p).permute(0, 2, 3, 5, 1, 4, 6)
        tokens = self.patch_embed(tokens.reshape(b, f * (h // p) * (w // p), c * p * p))
        if temb is None:
            temb = self.embed_time(t)
        ctx = self.text_embed(text)
        for i, block in enumerate(self.blocks):
            tokens = block(tokens, ctx, temb)
            if i == self.hint_after:
                tokens = tokens + 0.5 * ctx.mean(dim=1, keepdim=True)
        out = self.proj_out(self.norm_out(tokens)).reshape(b, f, h // p, w // p, c, p, p)
        if self.channels_last:
            return out.permute(0, 1, 2, 5, 3, 6, 4).reshape(b, f, h, w, c)
        return out.permute(0, 4, 1, 2, 5, 3, 6).reshape(b, c, f, h, w)


# -- calling it as a sampler would (tests/test_conventions.py, tests/test_block_chain.py) ---------------------

STEPS = 10


def latent(model: ConventionDiT, seed: int = 0, batch: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, 2, 8, 8, model.channels) if model.channels_last else (batch, model.channels, 2, 8, 8)
    return torch.randn(*shape, generator=gen)


def text(seed: int = 0, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 5, 16, generator=torch.Generator().manual_seed(100 + seed))


def schedule(convention: str) -> list[float]:
    falling = torch.linspace(999, 0, STEPS).tolist()
    return {"falling": falling, "rising": [999 - t for t in falling], "sigma": [t / 1000 for t in falling],
            "integer": [float(int(t)) for t in falling]}[convention]


def timestep_input(model: ConventionDiT, value: float, x: torch.Tensor):
    if model.timestep == "token":
        tokens = x.shape[2] * (x.shape[3] // 2) * (x.shape[4] // 2) if not model.channels_last else \
            x.shape[1] * (x.shape[2] // 2) * (x.shape[3] // 2)
        t = torch.full((x.shape[0], tokens), value)
        t[:, : tokens // 4] = 0.0  # the conditioning frame's tokens, as Wan 2.2 TI2V gives them
        return {"t": t}
    if model.timestep == "embedded":
        with torch.no_grad():
            return {"temb": model.embed_time(torch.full((x.shape[0],), value))}
    return {"t": torch.full((x.shape[0],), value)}


def run_generation(fn, model, convention: str, seed: int = 0, steps: int = STEPS, step_index: bool = False):
    """An Euler-like loop; returns every step's model output."""
    x, ctx, outs = latent(model, seed), text(seed), []
    with torch.no_grad():
        for i, t in enumerate(schedule(convention)[:steps]):
            inputs = dict(x=x, text=ctx, **timestep_input(model, t, x))
            if step_index:
                with model.cache_context("cond", step_index=i, num_inference_steps=STEPS):
                    out = fn(**inputs)
            else:
                out = fn(**inputs)
            outs.append(out)
            x = x - out / STEPS
    return outs
