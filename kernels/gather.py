"""Token gathers and scatters for reduce, restore and merge.

    gather_tokens(x [B, H, S, D], index [B, H, K]) -> [B, H, K, D]:  out[b, h, k] = x[b, h, index[b, h, k]]
    merge_tokens(x [B, H, S, D], source [B, H, S], kept) -> [B, H, kept, D]:
        out[b, h, k] = mean of x[b, h, s] over the tokens s with source[b, h, s] == k

Reduce (mode "replace") and restore are both `gather_tokens`; reduce in mode
"mean" is `merge_tokens`.  Each has a plain-torch reference; the Triton
gather is what runs inside a triton_op on CUDA.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .matching import next_power_of_2


def gather_tokens_reference(x: Tensor, index: Tensor) -> Tensor:
    return torch.gather(x, 2, index.unsqueeze(-1).expand(*index.shape, x.shape[-1]))


def merge_tokens_reference(x: Tensor, source: Tensor, kept: int) -> Tensor:
    B, H, _, D = x.shape
    sums = torch.zeros(B, H, kept, D, dtype=torch.float32, device=x.device)
    sums.scatter_add_(2, source.unsqueeze(-1).expand(*source.shape, D), x.float())
    counts = torch.zeros(B, H, kept, dtype=torch.float32, device=x.device)
    counts.scatter_add_(2, source, torch.ones_like(source, dtype=torch.float32))
    return (sums / counts.clamp_min(1).unsqueeze(-1)).to(x.dtype)


try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:

    @triton.jit
    def _gather_tokens_kernel(
        x_ptr, index_ptr, out_ptr,
        H, K, D,
        sx_b, sx_h, sx_n, sx_d,
        si_b, si_h, si_k,
        BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        pid_k = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        rows = tl.load(index_ptr + b * si_b + h * si_h + offs_k * si_k, mask=mask_k, other=0)
        for start in range(0, D, BLOCK_D):
            offs_d = start + tl.arange(0, BLOCK_D)
            mask = mask_k[:, None] & (offs_d < D)[None, :]
            vals = tl.load(x_ptr + b * sx_b + h * sx_h + rows[:, None] * sx_n + offs_d[None, :] * sx_d, mask=mask)
            # out is contiguous [B, H, K, D]
            tl.store(out_ptr + ((pid_bh * K + offs_k[:, None]) * D + offs_d[None, :]), vals, mask=mask)


def launch_config(head_dim: int) -> tuple[int, int]:
    """(BLOCK_K, BLOCK_D) the launcher uses: 32 rows of up to 128 features per program (D in chunks)."""
    return 32, min(128, max(16, next_power_of_2(head_dim)))


def gather_tokens_triton(x: Tensor, index: Tensor, launch=None) -> Tensor:
    """The Triton gather; same contract as `gather_tokens_reference` (output contiguous)."""
    if triton is None:
        raise RuntimeError("the Triton gather kernel needs the triton package")
    B, H, _, D = x.shape
    K = index.shape[-1]
    out = torch.empty(B, H, K, D, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block_k, block_d = launch_config(D)
    grid = (triton.cdiv(K, block_k), B * H)
    kernel = _gather_tokens_kernel if launch is None else launch(_gather_tokens_kernel)
    kernel[grid](
        x, index, out, H, K, D,
        x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        index.stride(0), index.stride(1), index.stride(2),
        block_k, block_d,
    )
    return out
