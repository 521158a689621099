"""AsymRnR's matching, step by step: split the grid, find each source's nearest destination, select.

    split_grid      tokens -> (destinations, sources): one random destination per full
                    stride cell of the F x H x W grid, everything else a source
    nearest         per source, its nearest destination and the distance (kernels/matching.py)
    select_tokens   keep every destination and the least similar sources; the rest are
                    reduced into their nearest destination

A plan is two index tensors per batch element and head: `keep` [B, H, L], the
kept token positions in ascending order, and `source` [B, H, N], the row of
the reduced sequence that stands for each token (itself if kept, its
destination's row otherwise).  `ditopt::reduce(x, keep)` and
`ditopt::restore(y, source)` apply it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def effective_stride(grid: tuple[int, int, int], stride: tuple[int, int, int]) -> tuple[int, int, int]:
    """The stride clamped to the grid, so that a grid smaller than one cell still has a cell."""
    return tuple(max(1, min(s, g)) for s, g in zip(stride, grid))


def num_destinations(grid: tuple[int, int, int], stride: tuple[int, int, int]) -> int:
    """How many full stride cells the grid holds: one destination each."""
    stride = effective_stride(grid, stride)
    return math.prod(g // s for g, s in zip(grid, stride))


def split_grid(grid: tuple[int, int, int], stride: tuple[int, int, int], seed: "int | torch.Generator",
               device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """(destination tokens, source tokens), each sorted, int64, for an F x H x W grid in row-major order.

    One destination per full (sf, sh, sw) cell, at a position drawn from `seed` (a number, or a
    generator to draw from); tokens of the ragged border (where the stride does not divide the
    grid) are all sources, and along each axis the border is split at random between its two
    ends, as the reference does.
    """
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    F, H, W = grid
    sf, sh, sw = effective_stride(grid, stride)
    nf, nh, nw = F // sf, H // sh, W // sw
    # the draws come from a seeded CPU generator (the same split on every device); the rest is built on `device`
    offset = torch.randint(0, sf * sh * sw, (nf, nh, nw), generator=gen).to(device)
    lead = [int(torch.randint(0, g % s, (1,), generator=gen)) if g % s else 0 for g, s in zip(grid, (sf, sh, sw))]
    f = lead[0] + torch.arange(nf, device=device).view(-1, 1, 1) * sf + offset // (sh * sw)
    h = lead[1] + torch.arange(nh, device=device).view(1, -1, 1) * sh + (offset // sw) % sh
    w = lead[2] + torch.arange(nw, device=device).view(1, 1, -1) * sw + offset % sw
    dst = ((f * H + h) * W + w).flatten().sort().values
    is_dst = torch.zeros(F * H * W, dtype=torch.int8, device=device).index_fill_(0, dst, 1)
    src = torch.argsort(is_dst, stable=True)[: F * H * W - dst.numel()]  # the others, in order (no host sync)
    return dst, src


def reduced_length(num_tokens: int, num_dst: int, ratio: float) -> int:
    """Tokens left after removing a fraction `ratio`: max(|dst|, floor(N (1 - ratio)))."""
    return min(num_tokens, max(num_dst, math.floor(num_tokens * (1.0 - ratio) + 1e-9)))


def identity_plan(batch: int, heads: int, num_tokens: int, device) -> tuple[Tensor, Tensor]:
    everything = torch.arange(num_tokens, device=device).expand(batch, heads, num_tokens).contiguous()
    return everything, everything.clone()


def select_tokens(nearest: Tensor, distance: Tensor, dst: Tensor, src: Tensor, num_tokens: int,
                  ratio: float) -> tuple[Tensor, Tensor]:
    """The plan (keep [B, H, L], source [B, H, N]) that removes a fraction `ratio` of the tokens.

    The sources most similar to their nearest destination (smallest distance) are reduced; a
    partial selection (top-k) finds them, no full sort.
    """
    B, H, _ = distance.shape
    device = distance.device
    kept = reduced_length(num_tokens, dst.numel(), ratio)
    n_reduced = num_tokens - kept
    if n_reduced == 0:
        return identity_plan(B, H, num_tokens, device)
    reduced = torch.topk(distance, n_reduced, dim=-1, largest=False, sorted=False).indices  # into src
    reduced_tok = src[reduced]
    is_kept = torch.ones(B, H, num_tokens, dtype=torch.bool, device=device)
    is_kept.scatter_(2, reduced_tok, False)
    row = torch.cumsum(is_kept, dim=2) - 1  # row of each kept token in the reduced sequence
    # every reduced token writes into a spare last column, which is dropped
    target = torch.where(is_kept, row, kept)
    positions = torch.arange(num_tokens, device=device).expand(B, H, num_tokens)
    keep = torch.empty(B, H, kept + 1, dtype=torch.int64, device=device).scatter_(2, target, positions)[..., :kept]
    destination_tok = dst[torch.gather(nearest, 2, reduced)]
    source = row.scatter(2, reduced_tok, torch.gather(row, 2, destination_tok))
    return keep.contiguous(), source


def relative_distance(x: Tensor, src: Tensor, distance: Tensor, metric: str) -> Tensor:
    """A scale-free dissimilarity in [0, ~2] per source: |x_j - x_dst|^2 / |x_j|^2, or 1 - cos."""
    if metric == "euclidean":
        norm_sq = x[:, :, src].float().pow(2).sum(-1)
        return distance / norm_sq.clamp_min(1e-12)
    if metric == "cosine":
        return 1.0 + distance
    raise ValueError("the adaptive AsymRnR schedule needs metric 'euclidean' or 'cosine' (dot has no scale)")
