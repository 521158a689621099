"""A re-implementation of Open-Sora 1.2's STDiT3, written here from what its public source does.

What matters to ditopt is kept as that code has it:
- two module lists, `spatial_blocks` and `temporal_blocks`, of one block class, called interleaved
  (spatial i, then temporal i);
- self-attention written by hand (`q * scale @ k^T`, a float32 softmax, `@ v`), or through
  `flash_attn_func` with `enable_flash_attn=True`; temporal blocks rotate Q and K with a rotary
  embedding whose table the first temporal block computes and caches for the others;
- cross-attention that packs the batch into one sequence: queries [1, B*N, H, D] against the text of
  every sample, packed without padding [1, sum(y_lens), H, D], with a block-diagonal mask
  (xformers' `BlockDiagonalMask.from_seqlens([N] * B, y_lens)` where xformers is importable, else the
  same mask as a dense boolean matrix for SDPA);
- the sampler's call: a padded text mask (`masked_select` and `mask.sum(1).tolist()`, both graph
  breaks), and `fps`, `height` and `width` tensors (`height[0].item()`, a graph break).
Not kept: sequence parallelism, gradient checkpointing, `x_mask` conditioning frames, weight loading.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _sinusoid(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, frequency: int = 256):
        super().__init__()
        self.frequency = frequency
        self.mlp = nn.Sequential(nn.Linear(frequency, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.mlp(_sinusoid(t, self.frequency).to(dtype))


class SizeEmbedder(TimestepEmbedder):
    """Embeds one number per sample (fps) like a timestep."""

    def forward(self, s: torch.Tensor, batch: int) -> torch.Tensor:
        s = s.reshape(-1)
        if s.shape[0] != batch:
            s = s.repeat(batch // s.shape[0])
        return self.mlp(_sinusoid(s, self.frequency).to(self.mlp[0].weight.dtype))


class RotaryEmbedding(nn.Module):
    """Rotary embedding over the last-but-one axis; the first call computes the table, later ones reuse it."""

    def __init__(self, dim: int, theta: float = 10000.0):
        super().__init__()
        self.freqs = nn.Parameter(1.0 / theta ** (torch.arange(0, dim, 2).float() / dim), requires_grad=False)
        self.cached_freqs: torch.Tensor | None = None

    def table(self, n: int, device) -> torch.Tensor:
        if self.cached_freqs is not None and self.cached_freqs.shape[0] >= n:
            return self.cached_freqs[:n]
        freqs = torch.outer(torch.arange(n, device=device, dtype=self.freqs.dtype), self.freqs)
        freqs = freqs.repeat_interleave(2, dim=-1)
        self.cached_freqs = freqs.detach()
        return freqs

    def rotate_queries_or_keys(self, t: torch.Tensor) -> torch.Tensor:
        freqs = self.table(t.shape[-2], t.device).to(t.dtype)
        pairs = t.unflatten(-1, (-1, 2))
        rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
        return t * freqs.cos() + rotated * freqs.sin()


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qk_norm: bool, rope=None, enable_flash_attn: bool = False):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.rope = rope
        self.enable_flash_attn = enable_flash_attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            q, k = self.rope(q), self.rope(k)
        if self.enable_flash_attn:
            from flash_attn import flash_attn_func

            x = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=self.scale)
        else:
            dtype = q.dtype
            attn = (q * self.scale) @ k.transpose(-2, -1)
            attn = attn.to(torch.float32).softmax(dim=-1).to(dtype)
            x = (self.attn_drop(attn) @ v).transpose(1, 2)
        return self.proj(x.reshape(b, n, c))


def _xformers():
    try:
        import xformers.ops
    except ImportError:
        return None
    return xformers.ops


class MultiHeadCrossAttention(nn.Module):
    """Cross-attention of a packed batch: every sample's video tokens against its own text only."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.xops = _xformers()  # looked up once, as Open-Sora imports it at module import

    def forward(self, x: torch.Tensor, cond: torch.Tensor, y_lens: list[int]) -> torch.Tensor:
        b, n, c = x.shape
        q = self.q_linear(x).view(1, -1, self.heads, self.head_dim)
        k, v = self.kv_linear(cond).view(1, -1, 2, self.heads, self.head_dim).unbind(2)
        if self.xops is not None:
            bias = self.xops.fmha.BlockDiagonalMask.from_seqlens([n] * b, y_lens)
            x = self.xops.memory_efficient_attention(q, k, v, attn_bias=bias)
        else:
            mask = torch.block_diag(*[torch.ones(n, length, dtype=torch.bool, device=x.device) for length in y_lens])
            x = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               attn_mask=mask).transpose(1, 2)
        return self.proj(x.reshape(b, n, c))


def t2i_modulate(x, shift, scale):
    return x * (1 + scale) + shift


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, out: int | None = None):
        super().__init__()
        self.fc1, self.act = nn.Linear(dim, hidden), nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, out or dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class STDiT3Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, qk_norm: bool, temporal: bool = False, rope=None,
                 enable_flash_attn: bool = False):
        super().__init__()
        self.temporal = temporal
        self.norm1 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.attn = Attention(dim, heads, qk_norm, rope, enable_flash_attn)
        self.cross_attn = MultiHeadCrossAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim ** 0.5)

    def forward(self, x, y, t, y_lens, frames: int, spatial: int):
        b, _, c = x.shape
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + t.reshape(b, 6, -1)).chunk(6, dim=1)
        x_m = t2i_modulate(self.norm1(x), shift_msa, scale_msa)
        if self.temporal:  # B (T S) C -> (B S) T C
            x_m = x_m.view(b, frames, spatial, c).transpose(1, 2).reshape(b * spatial, frames, c)
            x_m = self.attn(x_m).view(b, spatial, frames, c).transpose(1, 2).reshape(b, frames * spatial, c)
        else:  # B (T S) C -> (B T) S C
            x_m = self.attn(x_m.reshape(b * frames, spatial, c)).reshape(b, frames * spatial, c)
        x = x + gate_msa * x_m
        x = x + self.cross_attn(x, y, y_lens)
        x_m = t2i_modulate(self.norm2(x), shift_mlp, scale_mlp)
        return x + gate_mlp * self.mlp(x_m)


def position_embedding_2d(dim: int, h: int, w: int, scale: float, base_size: int, device) -> torch.Tensor:
    """Open-Sora's 2-D sin-cos position embedding of an h x w grid, [1, h*w, dim]."""
    grid_h = torch.arange(h, dtype=torch.float32, device=device) / scale * base_size / h
    grid_w = torch.arange(w, dtype=torch.float32, device=device) / scale * base_size / w
    gh, gw = torch.meshgrid(grid_w, grid_h, indexing="ij")
    gh, gw = gh.t().reshape(-1), gw.t().reshape(-1)
    quarter = dim // 4
    inv = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32, device=device) / quarter)
    parts = [torch.outer(g, inv) for g in (gh, gw)]
    return torch.cat([torch.cat([p.sin(), p.cos()], dim=-1) for p in parts], dim=-1)[None]


class STDiT3(nn.Module):
    """forward(x [B, C, T, H, W], timestep [B], y [B, 1, L, caption_channels], mask [B, L] | None,
    fps [B] | None, height [B] | None, width [B] | None) -> [B, C_out, T, H, W]."""

    def __init__(self, in_channels=4, hidden_size=64, depth=2, num_heads=2, patch_size=(1, 2, 2),
                 caption_channels=32, mlp_ratio=4.0, qk_norm=True, enable_flash_attn=False, input_sq_size=512,
                 pred_sigma=False):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, in_channels * 2 if pred_sigma else in_channels
        self.hidden_size, self.patch_size, self.input_sq_size = hidden_size, patch_size, input_sq_size
        self.rope = RotaryEmbedding(hidden_size // num_heads)
        self.x_embedder = nn.Conv3d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.fps_embedder = SizeEmbedder(hidden_size)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.y_embedder = Mlp(caption_channels, hidden_size, hidden_size)  # the caption embedder's projection
        blocks = dict(dim=hidden_size, heads=num_heads, mlp_ratio=mlp_ratio, qk_norm=qk_norm,
                      enable_flash_attn=enable_flash_attn)
        self.spatial_blocks = nn.ModuleList(STDiT3Block(**blocks) for _ in range(depth))
        self.temporal_blocks = nn.ModuleList(
            STDiT3Block(**blocks, temporal=True, rope=self.rope.rotate_queries_or_keys) for _ in range(depth))
        self.final_norm = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.final_linear = nn.Linear(hidden_size, math.prod(patch_size) * self.out_channels)
        self.final_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size ** 0.5)

    def encode_text(self, y: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, list[int]]:
        """Text packed without padding, [1, sum(y_lens), C], and each sample's length."""
        y = self.y_embedder(y)  # [B, 1, L, C]
        if mask is None:
            return y.squeeze(1).view(1, -1, self.hidden_size), [y.shape[2]] * y.shape[0]
        if mask.shape[0] != y.shape[0]:
            mask = mask.repeat(y.shape[0] // mask.shape[0], 1)
        y = y.squeeze(1).masked_select(mask.unsqueeze(-1) != 0).view(1, -1, self.hidden_size)
        return y, mask.sum(dim=1).tolist()

    def forward(self, x, timestep, y, mask=None, fps=None, height=None, width=None):
        b, _, frames_in, h_in, w_in = x.shape
        pt, ph, pw = self.patch_size
        frames, hp, wp = frames_in // pt, h_in // ph, w_in // pw
        spatial = hp * wp
        base_size = round(spatial ** 0.5)
        if height is not None and width is not None:
            resolution_sq = (height[0].item() * width[0].item()) ** 0.5
        else:
            resolution_sq = (h_in * w_in * 64) ** 0.5  # latent pixels of an 8x VAE
        pos_emb = position_embedding_2d(self.hidden_size, hp, wp, resolution_sq / self.input_sq_size, base_size,
                                        x.device)
        t = self.t_embedder(timestep, dtype=x.dtype)
        if fps is not None:
            t = t + self.fps_embedder(fps.unsqueeze(1), b)
        t_mlp = self.t_block(t)
        y, y_lens = self.encode_text(y, mask)
        x = self.x_embedder(x).flatten(2).transpose(1, 2)  # [B, T*S, C], frame-major
        x = (x.view(b, frames, spatial, -1) + pos_emb[:, None]).reshape(b, frames * spatial, -1)
        for spatial_block, temporal_block in zip(self.spatial_blocks, self.temporal_blocks):
            x = spatial_block(x, y, t_mlp, y_lens, frames, spatial)
            x = temporal_block(x, y, t_mlp, y_lens, frames, spatial)
        shift, scale = (self.final_table[None] + t[:, None]).chunk(2, dim=1)
        x = self.final_linear(t2i_modulate(self.final_norm(x), shift, scale))
        x = x.view(b, frames, hp, wp, pt, ph, pw, self.out_channels)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, self.out_channels, frames * pt, hp * ph, wp * pw)
