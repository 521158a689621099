"""AsymRnR's ops: `ditopt::token_match`, `nearest_destination`, `reduce`, `merge`, `restore`.

Each has a plain-torch implementation (used on the CPU and as the kernels' reference) and a fake
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
    from . import plans as tm

    dst, src = tm.split_grid(tuple(grid), tuple(stride), seed, x.device)
    nearest, distance = nearest_destination(x, src, dst, metric)
    return tm.select_tokens(nearest, distance, dst, src, x.shape[2], ratio)


@token_match.register_fake
def _(x, ratio, grid, stride, metric, seed):
    from . import plans as tm

    B, H, N, _ = x.shape
    kept = tm.reduced_length(N, tm.num_destinations(tuple(grid), tuple(stride)), ratio)
    return x.new_empty(B, H, kept, dtype=torch.int64), x.new_empty(B, H, N, dtype=torch.int64)
