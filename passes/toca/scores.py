"""ToCa's token scores and top-k selection, without an attention map.

The reference implementation materialises the B x N x N self-attention map
(and the cross-attention map) at every fresh step to score tokens, which
rules out flash/efficient attention.  Here:

- s1, self-attention influence: column sums of the head-averaged attention
  probabilities, computed in chunks of query rows.  Each chunk's rows are
  complete (all keys), so its row log-sum-exp normalises it exactly; no more
  than `chunk x M` logits per head exist at once.
- s2, cross-attention entropy: per query, the entropy of its head-averaged
  probabilities over the (short) text axis, also chunked over queries.
- s4, spatial uniformity: the best-scored token of each cell of an F x H x W
  grid (any shape; border cells may be smaller) is boosted by (1 + bonus).

All functions are plain torch on any device and take no host syncs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

QUERY_CHUNK = 512  # query rows per chunk: chunk x keys logits per head live at a time


def _logits(q: Tensor, k: Tensor, mask: Tensor | None, scale: float | None, rows: slice) -> Tensor:
    """Attention logits of query rows `rows`, [B, H, r, M] in fp32, masked like scaled_dot_product_attention."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = torch.matmul(q[:, :, rows].float(), k.float().transpose(-1, -2)) * scale
    if mask is not None:
        m = mask.expand(*logits.shape[:2], q.shape[2], k.shape[2])[:, :, rows] if mask.shape[-2] != 1 else mask
        logits = logits.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else logits + m.float()
    return logits


def attention_column_score(q: Tensor, k: Tensor, mask: Tensor | None = None, scale: float | None = None,
                           chunk: int = QUERY_CHUNK) -> Tensor:
    """s1: sum over queries of the head-averaged attention probabilities each key receives, [B, M].

    q [B, H, N, D], k [B, H, M, D]; equals softmax(q k^T * scale + mask).mean(1).sum(1) without the map.
    """
    B, H, N, _ = q.shape
    total = q.new_zeros(B, k.shape[2], dtype=torch.float32)
    for start in range(0, N, chunk):
        probs = _logits(q, k, mask, scale, slice(start, start + chunk))
        probs = probs.sub_(torch.logsumexp(probs, dim=-1, keepdim=True)).exp_()  # in place: one chunk buffer
        if mask is not None:
            probs = probs.nan_to_num_(0.0)  # rows with every key masked contribute nothing
        total += probs.sum(dim=(1, 2)).div_(H)
    return total


def attention_entropy(q: Tensor, k: Tensor, mask: Tensor | None = None, scale: float | None = None,
                      cfg_halves: bool = False, chunk: int = QUERY_CHUNK) -> Tensor:
    """s2: entropy of each query's head-averaged attention distribution over the keys, [B, N].

    With cfg_halves (an even batch of CFG's uncond and cond halves), the two halves' distributions are
    averaged before the entropy, as the reference does, and both halves get that one entropy."""
    B, H, N, _ = q.shape
    shared = cfg_halves and B % 2 == 0
    out = q.new_empty(B, N, dtype=torch.float32)
    for start in range(0, N, chunk):
        logits = _logits(q, k, mask, scale, slice(start, start + chunk))
        probs = torch.softmax(logits, dim=-1).nan_to_num(0.0).mean(dim=1)  # [B, r, M]
        if shared:
            probs = probs.view(2, B // 2, *probs.shape[1:]).mean(0).repeat(2, 1, 1)
        out[:, start:start + chunk] = -(probs * torch.log(probs + 1e-7)).sum(-1)
    return out


def attention_flops(q_shape, k_shape) -> int:
    """FLOPs of either score: one q k^T product (2 N M D per head) and the softmax terms (~5 per logit)."""
    B, H, N, D = q_shape
    M = k_shape[2]
    return B * H * N * M * (2 * D + 5)


def cell_ids(grid: tuple[int, int, int], cell: tuple[int, int, int], device=None) -> Tensor:
    """For each token of an F x H x W grid (row-major), the id of its cell of size `cell` (ragged borders)."""
    F_, H_, W_ = grid
    cf, ch, cw = (max(1, c) for c in cell)
    f = torch.arange(F_, device=device) // cf
    h = torch.arange(H_, device=device) // ch
    w = torch.arange(W_, device=device) // cw
    ncf, nch, ncw = -(-F_ // cf), -(-H_ // ch), -(-W_ // cw)
    return (f.view(-1, 1, 1) * nch * ncw + h.view(1, -1, 1) * ncw + w.view(1, 1, -1)).reshape(-1)


def uniformity_bonus(score: Tensor, cells: Tensor, bonus: float, offset: int = 0) -> Tensor:
    """s4: multiply the best score of each cell by (1 + bonus).  `cells` [n] covers score[:, offset:offset+n]."""
    if bonus == 0:
        return score
    n = cells.numel()
    part = score[:, offset:offset + n]
    ids = cells.unsqueeze(0).expand_as(part)
    best = part.new_full((part.shape[0], int(cells.max()) + 1), float("-inf"))
    best = best.scatter_reduce(1, ids, part, reduce="amax")
    is_best = part == best.gather(1, ids)
    boosted = torch.where(is_best, part * (1 + bonus), part)
    return torch.cat([score[:, :offset], boosted, score[:, offset + n:]], dim=1)


def l2_normalized(score: Tensor) -> Tensor:
    return torch.nn.functional.normalize(score, p=2, dim=-1)


def select_rows(score: Tensor, k: int) -> Tensor:
    """The k highest-scored rows of each batch element, in ascending row order, [B, k] int64."""
    if k >= score.shape[1]:
        return torch.arange(score.shape[1], device=score.device).expand(score.shape[0], -1)
    return torch.topk(score, k, dim=1, sorted=False).indices.sort(dim=1).values
