"""ditopt's op vocabulary: the nodes its passes insert, as torch.library custom ops.

An exported graph reads `torch.ops.ditopt.reduce(...)`, `...restore(...)`,
`...cache_lookup(...)`, `...skip_guard(...)`.  Each op has a plain-torch
implementation (used on the CPU and as the kernels' reference) and a fake
implementation so Dynamo, AOTAutograd and Inductor can trace through it.
"""

from __future__ import annotations

import torch
from torch import Tensor

LIB = "ditopt"


def _gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    return torch.gather(x, 2, index.unsqueeze(-1).expand(*index.shape, x.shape[-1]))


@torch.library.custom_op(f"{LIB}::reduce", mutates_args=())
def reduce(x: Tensor, index: Tensor) -> Tensor:
    """Keep tokens `index` [B, H, K] of x [B, H, S, D] (per batch element and head) -> [B, H, K, D]."""
    return _gather_tokens(x, index)


@reduce.register_fake
def _(x, index):
    return x.new_empty(*index.shape, x.shape[-1])


@torch.library.custom_op(f"{LIB}::restore", mutates_args=())
def restore(y: Tensor, source: Tensor) -> Tensor:
    """Back to full length: token s of the result is row source[b, h, s] of y [B, H, K, D] -> [B, H, S, D].

    A kept token points at its own row; a reduced token at its destination's row.
    """
    return _gather_tokens(y, source)


@restore.register_fake
def _(y, source):
    return y.new_empty(*source.shape, y.shape[-1])


@torch.library.custom_op(f"{LIB}::cache_lookup", mutates_args=())
def cache_lookup(fresh: Tensor, cache: Tensor, index: Tensor) -> Tensor:
    """Rows `index` [B, K] come from fresh [B, K, C], every other row from cache [B, N, C] -> [B, N, C]."""
    out = cache.clone()
    out.scatter_(1, index.unsqueeze(-1).expand(*index.shape, cache.shape[-1]), fresh)
    return out


@cache_lookup.register_fake
def _(fresh, cache, index):
    return torch.empty_like(cache)


@torch.library.custom_op(f"{LIB}::skip_guard", mutates_args=())
def skip_guard(x: Tensor, region: int) -> Tensor:
    """Marks the entry of a skippable region.  The lowering replaces it with a runtime decision;
    run unlowered (an exported graph executed as is) it is the identity."""
    return x.clone()


@skip_guard.register_fake
def _(x, region):
    return torch.empty_like(x)
