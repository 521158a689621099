"""ToCa's ops: `ditopt::toca_rows`, `gather_rows`, `toca_update`, `cache_lookup` and the two scores.

Run unlowered, a site computes every row (toca_rows gives them all) and toca_update returns its
fresh value: the graph computes what the model does.  The hook specialises each block per step:
fresh sites drop the three ops, reused sites read their cache, partial sites get their rows and
cache from the runtime (hook.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

LIB = "ditopt"


@torch.library.custom_op(f"{LIB}::cache_lookup", mutates_args=())
def cache_lookup(fresh: Tensor, cache: Tensor, index: Tensor) -> Tensor:
    """Rows `index` [B, K] come from fresh [B, K, C], every other row from cache [B, N, C] -> [B, N, C]."""
    out = cache.clone()
    out.scatter_(1, index.unsqueeze(-1).expand(*index.shape, cache.shape[-1]), fresh)
    return out


@cache_lookup.register_fake
def _(fresh, cache, index):
    return torch.empty_like(cache)


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
    from .scores import attention_column_score as score

    return score(q, k, attn_mask, scale)


@attention_column_score.register_fake
def _(q, k, attn_mask, scale):
    return q.new_empty(q.shape[0], k.shape[2], dtype=torch.float32)


@torch.library.custom_op(f"{LIB}::attention_entropy", mutates_args=())
def attention_entropy(q: Tensor, k: Tensor, attn_mask: Tensor | None, scale: float | None,
                      cfg_halves: bool = False) -> Tensor:
    """ToCa's s2: entropy of each query's head-averaged attention over the keys, [B, N]; with cfg_halves
    the two CFG halves' distributions are averaged first."""
    from .scores import attention_entropy as entropy

    return entropy(q, k, attn_mask, scale, cfg_halves)


@attention_entropy.register_fake
def _(q, k, attn_mask, scale, cfg_halves=False):
    return q.new_empty(q.shape[0], q.shape[2], dtype=torch.float32)


def _register_score_flops() -> None:
    from torch.utils.flop_counter import register_flop_formula

    from .scores import attention_flops

    for op in (torch.ops.ditopt.attention_column_score, torch.ops.ditopt.attention_entropy):
        register_flop_formula(op)(lambda q_shape, k_shape, *args, out_shape=None, **kwargs: attention_flops(q_shape, k_shape))


_register_score_flops()
