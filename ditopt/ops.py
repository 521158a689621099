"""ditopt's op vocabulary: the nodes its passes insert, as torch.library custom ops.

An exported graph reads `torch.ops.ditopt.reduce(...)`, `...restore(...)`,
`...cache_lookup(...)`, `...skip_guard(...)`, `...token_match(...)`.  Each op has a plain-torch
implementation (used on the CPU and as the kernels' reference) and a fake
implementation so Dynamo, AOTAutograd and Inductor can trace through it.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.library import triton_op, wrap_triton

from ditopt.kernels import gather, matching
from ditopt.kernels.matching import triton_available

LIB = "ditopt"


def _on_gpu(x: Tensor) -> bool:
    return x.device.type == "cuda" and triton_available()


def _gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    if _on_gpu(x):
        return gather.gather_tokens_triton(x, index, launch=wrap_triton)
    return gather.gather_tokens_reference(x, index)


# Reduce, restore, merge and the nearest-destination search are triton_ops: on CUDA their bodies launch
# ditopt's Triton kernels through wrap_triton, so Inductor sees inside; on other devices (and for fake
# tensors on them) the bodies are the plain-torch references.


@triton_op(f"{LIB}::reduce", mutates_args=())
def reduce(x: Tensor, index: Tensor) -> Tensor:
    """Keep tokens `index` [B, H, K] of x [B, H, S, D] (per batch element and head) -> [B, H, K, D]."""
    return _gather_tokens(x, index)


@triton_op(f"{LIB}::restore", mutates_args=())
def restore(y: Tensor, source: Tensor) -> Tensor:
    """Back to full length: token s of the result is row source[b, h, s] of y [B, H, K, D] -> [B, H, S, D].

    A kept token points at its own row; a reduced token at its destination's row.
    """
    return _gather_tokens(y, source)


@triton_op(f"{LIB}::merge", mutates_args=())
def merge(x: Tensor, keep: Tensor, source: Tensor) -> Tensor:
    """Reduce in mode "mean": row k of the result [B, H, K, D] is the mean of the tokens whose source is k
    (a kept token and the tokens reduced into it).  `keep` [B, H, K] gives K."""
    return gather.merge_tokens_reference(x, source, keep.shape[-1])


@triton_op(f"{LIB}::nearest_destination", mutates_args=())
def nearest_destination(x: Tensor, src: Tensor, dst: Tensor, metric: str) -> tuple[Tensor, Tensor]:
    """For each source token of x [B, H, N, D]: (index into dst of its nearest destination, distance)."""
    if _on_gpu(x):
        return matching.nearest_destination_triton(x, src, dst, metric, launch=wrap_triton)
    return matching.nearest_destination_reference(x, src, dst, metric)


@torch.library.custom_op(f"{LIB}::token_match", mutates_args=())
def token_match(x: Tensor, ratio: float, grid: list[int], stride: list[int], metric: str,
                seed: int) -> tuple[Tensor, Tensor]:
    """AsymRnR's plan for x [B, H, N, D] on an F x H x W token grid: (keep [B, H, L], source [B, H, N]).

    Run unlowered it matches afresh on every call; the lowering hands this node to the runtime, which
    caches matches across steps and applies the per-step ratio schedule.
    """
    from . import token_matching as tm

    dst, src = tm.split_grid(tuple(grid), tuple(stride), seed, x.device)
    nearest, distance = nearest_destination(x, src, dst, metric)
    return tm.select_tokens(nearest, distance, dst, src, x.shape[2], ratio)


@token_match.register_fake
def _(x, ratio, grid, stride, metric, seed):
    from . import token_matching as tm

    B, H, N, _ = x.shape
    kept = tm.reduced_length(N, tm.num_destinations(tuple(grid), tuple(stride)), ratio)
    return x.new_empty(B, H, kept, dtype=torch.int64), x.new_empty(B, H, N, dtype=torch.int64)


@torch.library.custom_op(f"{LIB}::cache_lookup", mutates_args=())
def cache_lookup(fresh: Tensor, cache: Tensor, index: Tensor) -> Tensor:
    """Rows `index` [B, K] come from fresh [B, K, C], every other row from cache [B, N, C] -> [B, N, C]."""
    out = cache.clone()
    out.scatter_(1, index.unsqueeze(-1).expand(*index.shape, cache.shape[-1]), fresh)
    return out


@cache_lookup.register_fake
def _(fresh, cache, index):
    return torch.empty_like(cache)


# ---------------------------------------------------------------------------
# ToCa.  Run unlowered, a site computes every row (toca_rows gives them all) and toca_update returns
# its fresh value: the graph computes what the model does.  The lowering specialises each block per
# step: fresh sites drop the three ops, reused sites read their cache, partial sites get their rows
# and cache from the runtime (ditopt/toca.py).


@torch.library.custom_op(f"{LIB}::toca_rows", mutates_args=())
def toca_rows(x: Tensor, site: int) -> Tensor:
    """The rows of x [B, N, ...] that ToCa site `site` computes at this step, ascending, [B, K] int64."""
    return torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1).clone()


@toca_rows.register_fake
def _(x, site):
    return x.new_empty(x.shape[0], x.shape[1], dtype=torch.int64)


@torch.library.custom_op(f"{LIB}::gather_rows", mutates_args=())
def gather_rows(x: Tensor, rows: Tensor) -> Tensor:
    """Rows `rows` [B, K] of x [B, N, C] -> [B, K, C]."""
    return torch.gather(x, 1, rows.unsqueeze(-1).expand(*rows.shape, x.shape[-1]))


@gather_rows.register_fake
def _(x, rows):
    return x.new_empty(rows.shape[0], rows.shape[1], x.shape[-1])


@torch.library.custom_op(f"{LIB}::toca_update", mutates_args=())
def toca_update(fresh: Tensor, rows: Tensor, site: int, tokens: int) -> Tensor:
    """Site `site`'s output [B, tokens, C]: rows `rows` from fresh [B, K, C], the others from its cache.

    Unlowered there is no cache, so `rows` must be every row (as toca_rows gives them)."""
    if rows.shape[1] != tokens:
        raise RuntimeError("ditopt::toca_update run outside ditopt's runtime needs every row fresh")
    out = fresh.new_empty(fresh.shape[0], tokens, fresh.shape[-1])
    return out.scatter_(1, rows.unsqueeze(-1).expand(*rows.shape, fresh.shape[-1]), fresh)


@toca_update.register_fake
def _(fresh, rows, site, tokens):
    return fresh.new_empty(fresh.shape[0], tokens, fresh.shape[-1])


@torch.library.custom_op(f"{LIB}::attention_column_score", mutates_args=())
def attention_column_score(q: Tensor, k: Tensor, attn_mask: Tensor | None, scale: float | None) -> Tensor:
    """ToCa's s1: head-averaged attention probability each key receives, summed over queries, [B, M].
    Chunked over queries: the N x M map is never materialised."""
    from .token_scores import attention_column_score as score

    return score(q, k, attn_mask, scale)


@attention_column_score.register_fake
def _(q, k, attn_mask, scale):
    return q.new_empty(q.shape[0], k.shape[2], dtype=torch.float32)


@torch.library.custom_op(f"{LIB}::attention_entropy", mutates_args=())
def attention_entropy(q: Tensor, k: Tensor, attn_mask: Tensor | None, scale: float | None) -> Tensor:
    """ToCa's s2: entropy of each query's head-averaged attention over the keys, [B, N]."""
    from .token_scores import attention_entropy as entropy

    return entropy(q, k, attn_mask, scale)


@attention_entropy.register_fake
def _(q, k, attn_mask, scale):
    return q.new_empty(q.shape[0], q.shape[2], dtype=torch.float32)


def _register_score_flops() -> None:
    from torch.utils.flop_counter import register_flop_formula

    from .token_scores import attention_flops

    for op in (torch.ops.ditopt.attention_column_score, torch.ops.ditopt.attention_entropy):
        register_flop_formula(op)(lambda q_shape, k_shape, *args, out_shape=None, **kwargs: attention_flops(q_shape, k_shape))


_register_score_flops()


@torch.library.custom_op(f"{LIB}::skip_guard", mutates_args=())
def skip_guard(x: Tensor, region: int) -> Tensor:
    """Marks the entry of a skippable region.  The lowering replaces it with a runtime decision;
    run unlowered (an exported graph executed as is) it is the identity."""
    return x.clone()


@skip_guard.register_fake
def _(x, region):
    return torch.empty_like(x)
