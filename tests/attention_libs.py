"""Small stand-ins for flash-attn and xformers, registered the way those libraries are called.

flash-attn (>= 2.7) registers `torch.ops.flash_attn._flash_attn_forward` and
`_flash_attn_varlen_forward` as torch.library ops and calls them from `flash_attn_func` and
`flash_attn_varlen_func`; xformers' `memory_efficient_attention` turns a `BlockDiagonalMask` into
`seqstart` tensors for its `efficient_attention_forward_cutlass` op.  Neither installs here (they need
CUDA builds of torch), so these register ops of the same names and argument names, computed in plain
torch, and `install()` puts modules named `flash_attn` and `xformers.ops` in `sys.modules`.
"""

from __future__ import annotations

import math
import sys
import types
from typing import Optional

import torch


def _reference(q, k, v, scale, causal=False):  # [B, S, H, D]
    scale = scale if scale is not None else 1 / math.sqrt(q.shape[-1])
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v.float()).to(q.dtype)


def _packed(q, k, v, cu_q, cu_k, scale):  # [T, H, D] with segment boundaries
    out = torch.empty_like(q)
    for i in range(cu_q.numel() - 1):
        a, b, c, d = int(cu_q[i]), int(cu_q[i + 1]), int(cu_k[i]), int(cu_k[i + 1])
        out[a:b] = _reference(q[None, a:b], k[None, c:d], v[None, c:d], scale)[0]
    return out


def _lse(q):
    return torch.zeros(q.shape[0], q.shape[-2], q.shape[1] if q.dim() == 4 else q.shape[0], dtype=torch.float32)


if not hasattr(torch.ops.flash_attn, "_flash_attn_forward"):
    @torch.library.custom_op("flash_attn::_flash_attn_forward", mutates_args=())
    def _flash_attn_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float,
                            softmax_scale: float, causal: bool, window_size_left: int = -1,
                            window_size_right: int = -1, softcap: float = 0.0,
                            alibi_slopes: Optional[torch.Tensor] = None, return_softmax: bool = False
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return _reference(q, k, v, softmax_scale, causal), _lse(q), q.new_empty(0), torch.zeros(2, dtype=torch.int64)

    @_flash_attn_forward.register_fake
    def _(q, k, v, dropout_p, softmax_scale, causal, window_size_left=-1, window_size_right=-1, softcap=0.0,
          alibi_slopes=None, return_softmax=False):
        return torch.empty_like(q), _lse(q), q.new_empty(0), q.new_empty(2, dtype=torch.int64)

    @torch.library.custom_op("flash_attn::_flash_attn_varlen_forward", mutates_args=())
    def _flash_attn_varlen_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                                   cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                                   dropout_p: float, softmax_scale: float, causal: bool, window_size_left: int = -1,
                                   window_size_right: int = -1, softcap: float = 0.0,
                                   alibi_slopes: Optional[torch.Tensor] = None, return_softmax: bool = False,
                                   block_table: Optional[torch.Tensor] = None,
                                   leftpad_k: Optional[torch.Tensor] = None,
                                   seqused_k: Optional[torch.Tensor] = None
                                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        out = _packed(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale)
        return out, torch.zeros(q.shape[1], q.shape[0]), q.new_empty(0), torch.zeros(2, dtype=torch.int64)

    @_flash_attn_varlen_forward.register_fake
    def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
          window_size_left=-1, window_size_right=-1, softcap=0.0, alibi_slopes=None, return_softmax=False,
          block_table=None, leftpad_k=None, seqused_k=None):
        return (torch.empty_like(q), q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32), q.new_empty(0),
                q.new_empty(2, dtype=torch.int64))

    @torch.library.custom_op("xformers::efficient_attention_forward_cutlass", mutates_args=())
    def _cutlass(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_bias: Optional[torch.Tensor],
                 seqstart_q: Optional[torch.Tensor], seqstart_k: Optional[torch.Tensor], max_seqlen_q: Optional[int],
                 dropout_p: float, compute_logsumexp: bool, custom_mask_type: int, scale: Optional[float],
                 seqlen_k: Optional[torch.Tensor] = None, window_size: Optional[int] = None
                 ) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        if seqstart_q is None:
            out = _reference(query, key, value, scale)
        else:
            out = _packed(query[0], key[0], value[0], seqstart_q, seqstart_k, scale)[None]
        return out, query.new_empty(0, dtype=torch.float32), 0, 0

    @_cutlass.register_fake
    def _(query, key, value, attn_bias, seqstart_q, seqstart_k, max_seqlen_q, dropout_p, compute_logsumexp,
          custom_mask_type, scale, seqlen_k=None, window_size=None):
        return torch.empty_like(query), query.new_empty(0, dtype=torch.float32), 0, 0


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
    """flash-attn's dense entry point: [B, S, H, D] in and out."""
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    return torch.ops.flash_attn._flash_attn_forward(q, k, v, dropout_p, scale, causal)[0]


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False):
    """flash-attn's packed entry point: [T, H, D] with cumulative sequence lengths."""
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    return torch.ops.flash_attn._flash_attn_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                           max_seqlen_k, dropout_p, scale, causal)[0]


class BlockDiagonalMask:
    """xformers' mask of a packed batch: query segment i attends to key segment i only."""

    def __init__(self, q_seqstart: list[int], k_seqstart: list[int]):
        self.q_seqstart, self.k_seqstart = q_seqstart, k_seqstart

    @classmethod
    def from_seqlens(cls, q_seqlen, kv_seqlen=None):
        kv_seqlen = q_seqlen if kv_seqlen is None else kv_seqlen

        def starts(lengths):
            out = [0]
            for n in lengths:
                out.append(out[-1] + int(n))
            return out
        return cls(starts(q_seqlen), starts(kv_seqlen))


def memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None):
    """xformers' entry point: [B, M, H, K]; a BlockDiagonalMask packs the batch into B = 1."""
    starts = (None, None, None)
    if isinstance(attn_bias, BlockDiagonalMask):
        starts = (torch.tensor(attn_bias.q_seqstart, dtype=torch.int32, device=query.device),
                  torch.tensor(attn_bias.k_seqstart, dtype=torch.int32, device=query.device),
                  max(b - a for a, b in zip(attn_bias.q_seqstart, attn_bias.q_seqstart[1:])))
    elif attn_bias is not None:
        raise NotImplementedError("the stand-in knows BlockDiagonalMask only")
    return torch.ops.xformers.efficient_attention_forward_cutlass(query, key, value, None, starts[0], starts[1],
                                                                  starts[2], p, False, 0, scale)[0]


def install() -> None:
    """Make `import flash_attn` and `import xformers.ops` find these stand-ins."""
    flash = types.ModuleType("flash_attn")
    flash.flash_attn_func, flash.flash_attn_varlen_func = flash_attn_func, flash_attn_varlen_func
    xformers, ops, fmha = (types.ModuleType(n) for n in ("xformers", "xformers.ops", "xformers.ops.fmha"))
    ops.memory_efficient_attention, ops.fmha, fmha.BlockDiagonalMask = memory_efficient_attention, fmha, BlockDiagonalMask
    xformers.ops = ops
    sys.modules.update({"flash_attn": flash, "xformers": xformers, "xformers.ops": ops, "xformers.ops.fmha": fmha})


def uninstall() -> None:
    for name in ("flash_attn", "xformers", "xformers.ops", "xformers.ops.fmha"):
        sys.modules.pop(name, None)
