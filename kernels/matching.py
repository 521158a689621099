"""Nearest destination of every source token: the matching step of AsymRnR.

For x [B, H, N, D] and a source/destination split of the N tokens (the same
split for every batch element and head), each source j gets

    nearest[b, h, j] = argmin_i  d(x[b, h, dst[i]], x[b, h, src[j]])
    distance[b, h, j] = that minimum

with d one of
    euclidean: |a - b|^2                (METRIC 0)
    cosine:    -a.b / (|a| |b|)          (METRIC 1; smaller is more similar)
    dot:       -a.b                      (METRIC 2)

The Triton kernel walks the destinations in tiles and keeps a running
minimum per source, so the |src| x |dst| matrix never exists in memory;
products accumulate in fp32.  `nearest_destination_reference` is the plain
torch definition it is tested against.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

METRICS = ("euclidean", "cosine", "dot")
_EPS = 1e-12


def nearest_destination_reference(x: Tensor, src: Tensor, dst: Tensor, metric: str = "euclidean",
                                  chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """(nearest [B, H, S] int64 index into dst, distance [B, H, S] fp32), materialising the distances
    for `chunk` sources at a time."""
    if src.numel() > chunk:
        parts = [nearest_destination_reference(x, s, dst, metric, chunk) for s in src.split(chunk)]
        return torch.cat([p[0] for p in parts], -1), torch.cat([p[1] for p in parts], -1)
    xs = x[:, :, src].float()
    xd = x[:, :, dst].float()
    dot = xs @ xd.transpose(-1, -2)
    if metric == "euclidean":
        d = (xs * xs).sum(-1, keepdim=True) - 2 * dot + (xd * xd).sum(-1).unsqueeze(-2)
        d = d.clamp_min(0)
    elif metric == "cosine":
        norms = xs.norm(dim=-1, keepdim=True) * xd.norm(dim=-1).unsqueeze(-2)
        d = -dot / (norms + _EPS)
    elif metric == "dot":
        d = -dot
    else:
        raise ValueError(f"unknown metric {metric!r}; choose one of {list(METRICS)}")
    distance, nearest = d.min(dim=-1)
    return nearest, distance


try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU path needs only the reference
    triton = None

if triton is not None:

    @triton.jit
    def _nearest_destination_kernel(
        x_ptr, src_ptr, dst_ptr, nearest_ptr, distance_ptr,
        H, N_SRC, N_DST, HEAD_DIM,
        stride_b, stride_h, stride_n, stride_d,
        METRIC: tl.constexpr, DOT_16BIT: tl.constexpr,
        BLOCK_SRC: tl.constexpr, BLOCK_DST: tl.constexpr, BLOCK_DIM: tl.constexpr,
    ):
        pid_src = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        base = x_ptr + b * stride_b + h * stride_h

        offs_src = pid_src * BLOCK_SRC + tl.arange(0, BLOCK_SRC)
        mask_src = offs_src < N_SRC
        offs_dim = tl.arange(0, BLOCK_DIM)
        mask_dim = offs_dim < HEAD_DIM
        src_tok = tl.load(src_ptr + offs_src, mask=mask_src, other=0)
        xs = tl.load(base + src_tok[:, None] * stride_n + offs_dim[None, :] * stride_d,
                     mask=mask_src[:, None] & mask_dim[None, :], other=0.0)
        xs32 = xs.to(tl.float32)
        xs_sq = tl.sum(xs32 * xs32, axis=1)

        best = tl.full([BLOCK_SRC], float("inf"), tl.float32)
        best_idx = tl.zeros([BLOCK_SRC], tl.int32)
        for start in range(0, N_DST, BLOCK_DST):
            offs_dst = start + tl.arange(0, BLOCK_DST)
            mask_dst = offs_dst < N_DST
            dst_tok = tl.load(dst_ptr + offs_dst, mask=mask_dst, other=0)
            xd = tl.load(base + dst_tok[:, None] * stride_n + offs_dim[None, :] * stride_d,
                         mask=mask_dst[:, None] & mask_dim[None, :], other=0.0)
            xd32 = xd.to(tl.float32)
            if DOT_16BIT:  # tensor cores, fp32 accumulation
                dot = tl.dot(xs, tl.trans(xd), out_dtype=tl.float32)
            else:
                dot = tl.dot(xs32, tl.trans(xd32), input_precision="ieee")
            xd_sq = tl.sum(xd32 * xd32, axis=1)
            if METRIC == 0:
                d = tl.maximum(xs_sq[:, None] - 2.0 * dot + xd_sq[None, :], 0.0)
            elif METRIC == 1:
                d = -dot / (tl.sqrt(xs_sq)[:, None] * tl.sqrt(xd_sq)[None, :] + 1e-12)
            else:
                d = -dot
            d = tl.where(mask_dst[None, :], d, float("inf"))
            tile_best = tl.min(d, axis=1)
            tile_idx = tl.argmin(d, axis=1).to(tl.int32) + start
            better = tile_best < best  # strict: the first minimum wins, as torch.min does
            best = tl.where(better, tile_best, best)
            best_idx = tl.where(better, tile_idx, best_idx)

        out = pid_bh * N_SRC + offs_src
        tl.store(nearest_ptr + out, best_idx.to(tl.int64), mask=mask_src)
        tl.store(distance_ptr + out, best, mask=mask_src)


def triton_available() -> bool:
    return triton is not None


def triton_interprets() -> bool:
    """Whether triton was imported in interpreter mode (TRITON_INTERPRET=1 before its first import; torch
    imports it), or is missing.  Setting the variable later does not switch triton's own language functions
    over, so neither GPU compilation nor interpretation can change within a process."""
    if triton is None:
        return True
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.sum, InterpretedFunction)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def launch_config(dtype: torch.dtype, head_dim: int, interpreted: bool = False) -> tuple[int, int, int, bool]:
    """(BLOCK_SRC, BLOCK_DST, BLOCK_DIM, DOT_16BIT) the launcher uses for x of `dtype` with `head_dim`.

    Chosen so that no configuration spills registers on sm_80, sm_90 or sm_100 (ptxas' figures, compiled
    ahead of time: `python -m ditopt.kernels.aot`, docs/gpu.md): 16-bit inputs take tensor-core dots with
    64 x 64 tiles (32 x 64 past a head dim of 128); fp32 keeps its tiles in registers at 32 x 32, and
    16 x 16 past a head dim of 128 (64 x 64 spilt 172 bytes at head dim 64 and 14 KB at 128 on sm_90)."""
    block_dim = max(16, next_power_of_2(head_dim))
    if dtype in (torch.float16, torch.bfloat16):
        return (64 if block_dim <= 128 else 32), 64, block_dim, not interpreted
    return (32, 32, block_dim, False) if block_dim <= 128 else (16, 16, block_dim, False)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def nearest_destination_triton(x: Tensor, src: Tensor, dst: Tensor, metric: str = "euclidean",
                               launch=None) -> tuple[Tensor, Tensor]:
    """The Triton kernel; same contract as `nearest_destination_reference`.

    `launch` wraps the kernel (torch.library.wrap_triton inside a triton_op); None launches it directly,
    which is how the tests run it under TRITON_INTERPRET=1 on the CPU.
    """
    if triton is None:
        raise RuntimeError("the Triton matching kernel needs the triton package")
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {list(METRICS)}")
    B, H, _, D = x.shape
    n_src, n_dst = src.numel(), dst.numel()
    nearest = torch.empty(B, H, n_src, dtype=torch.int64, device=x.device)
    distance = torch.empty(B, H, n_src, dtype=torch.float32, device=x.device)
    if n_src == 0 or n_dst == 0:
        return nearest.zero_(), distance.fill_(float("inf"))
    block_src, block_dst, block_dim, dot_16bit = launch_config(x.dtype, D, _interpreted())
    grid = (triton.cdiv(n_src, block_src), B * H)
    kernel = _nearest_destination_kernel if launch is None else launch(_nearest_destination_kernel)
    kernel[grid](
        x, src, dst, nearest, distance,
        H, n_src, n_dst, D,
        x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        METRICS.index(metric), dot_16bit,
        block_src, block_dst, block_dim,
    )
    return nearest, distance


def matching_flops(batch: int, heads: int, n_src: int, n_dst: int, head_dim: int) -> int:
    """Multiply-adds of one matching, counted as 2 FLOPs each: the source x destination products."""
    return 2 * batch * heads * n_src * n_dst * head_dim
