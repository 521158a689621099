"""AsymRnR pass: fewer video tokens inside self-attention, Q and K/V reduced independently.

Every video self-attention (full or spatial; joint attention's video span,
with its text tokens untouched wherever they sit) becomes

    keep_q, source_q = ditopt.token_match(q_video, ...)      # Q's own match
    keep_kv          = ditopt.token_match(v_video, ...)      # one match for K and V, on V
    out = sdpa(cat(q_text, reduce(q_video, keep_q)),
               cat(k_text, reduce(k_video, keep_kv)),
               cat(v_text, reduce(v_video, keep_kv)))
    out = cat(out_text, restore(out_video, source_q))       # back to full length

Matching happens on the attention's own inputs (after QK-norm and RoPE).
Slices are written relative to both ends of the sequence, so the reduced
lengths the runtime picks at each step never appear in the graph.

A key mask [B, 1, 1, S] (HunyuanVideo's text padding) is reduced with K/V,
per head.  Sites left alone, with the reason in the report: temporal
attention (a few frames per sequence), cross attention, other masks, causal
attention and grouped-query attention.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from ditopt.analysis import AttentionSite, DiTStructure, shape
from ditopt.method import Rewrite, Tag, tag
from ditopt.patterns import call_args, sdpa_qkv, set_call_arg

from . import ops as _ops  # noqa: F401  (registers AsymRnR's torch.ops.ditopt ops)
from .config import AsymRnRConfig

ops = torch.ops.ditopt
NAME = "asymrnr"


@dataclass(frozen=True)
class MatchRequest:
    """What one token_match node asks the hook for."""

    block: int
    site: str
    role: str  # "q" or "kv"


def _why_not(site: AttentionSite, node: fx.Node) -> str | None:
    if site.kind not in ("self", "joint"):
        return f"{site.kind} attention (only self-attention over video tokens is reduced)"
    if site.axis == "temporal":
        return "temporal attention (its sequences are a few frames long)"
    if site.video_span is None:
        return "the video tokens' place in the joint sequence was not found"
    args = call_args(node, "sdpa")
    mask = args["attn_mask"]
    if mask is not None:
        dims = shape(mask) if isinstance(mask, fx.Node) else None
        if dims is None or len(dims) != 4 or dims[1] != 1 or dims[2] != 1:
            return "the attention mask is not a key mask of shape [B, 1, 1, S] (only those are reduced with K/V)"
    if args["is_causal"] is True:
        return "causal attention"
    if args["enable_gqa"]:
        return "grouped-query attention"
    return None


def site_grid(site: AttentionSite, structure: DiTStructure, stride: tuple) -> tuple[tuple, tuple]:
    """The token grid the site's sequence spans, and the split stride over it."""
    grid = structure.layout.grid
    n = site.video_span[1]
    if site.axis == "spatial":
        return (1, grid[1], grid[2]), (1, stride[1], stride[2])
    if grid is None or grid[0] * grid[1] * grid[2] != n:  # tokens packed before the model: a 1-D sequence
        return (1, 1, n), (1, 1, stride[0] * stride[1] * stride[2])
    return tuple(grid), tuple(stride)


class _Builder:
    """Inserts nodes before the attention call, each with the call's module stack."""

    def __init__(self, graph: fx.Graph, anchor: fx.Node):
        self.graph = graph
        self.meta = {k: anchor.meta[k] for k in ("nn_module_stack", "stack_trace") if k in anchor.meta}

    def call(self, target, args, extra_meta: dict | None = None) -> fx.Node:
        node = self.graph.call_function(target, args)
        node.meta.update(self.meta)
        node.meta.update(extra_meta or {})
        return node

    def tokens(self, x: fx.Node, start: int, stop_from_end: int, dim: int = 2) -> fx.Node:
        """x[:, :, start : len - stop_from_end] (along `dim`), written without the length."""
        stop = -stop_from_end if stop_from_end else None
        return self.call(operator.getitem, (x, (slice(None),) * dim + (slice(start or None, stop),)))

    def around(self, pre: int, post: int, x: fx.Node, middle: fx.Node, dim: int = 2) -> fx.Node:
        """cat(x's first `pre` tokens, middle, x's last `post` tokens) along the sequence (`dim`)."""
        if not pre and not post:
            return middle
        lead = (slice(None),) * dim
        parts = []
        if pre:
            parts.append(self.call(operator.getitem, (x, lead + (slice(None, pre),))))
        parts.append(middle)
        if post:
            parts.append(self.call(operator.getitem, (x, lead + (slice(-post, None),))))
        return self.call(torch.cat, (parts, dim))


def _match(b: _Builder, x: fx.Node, ratio: float, grid, stride, cfg, role: str, block: int, site: str,
           outputs: tuple[int, ...]) -> list[fx.Node]:
    """A token_match node (a region of its own, which the hook runs) and the getitems of its outputs."""
    m = b.call(ops.token_match.default, (x, float(ratio), list(grid), list(stride), cfg.metric, cfg.seed))
    tag(m, Tag(NAME, "match", MatchRequest(block, site, role), own_region=f"{site}:{role}"))
    return [b.call(operator.getitem, (m, i)) for i in outputs]


def _rewrite(gm: fx.GraphModule, node: fx.Node, site: AttentionSite, block: int, structure: DiTStructure,
             cfg: AsymRnRConfig) -> dict:
    grid, stride = site_grid(site, structure, cfg.stride)
    start, n = site.video_span
    pre, post = start, site.q_len - start - n
    q, k, v = sdpa_qkv(node)
    mean = cfg.reduce_mode == "mean"
    with gm.graph.inserting_before(node):
        b = _Builder(gm.graph, node)
        qv, kv_video, vv = (b.tokens(x, pre, post) for x in (q, k, v))
        keep_q, source_q = _match(b, qv, cfg.q_ratio, grid, stride, cfg, "q", block, site.name, (0, 1))
        on = vv if cfg.kv_match_on == "v" else kv_video
        kv_plan = _match(b, on, cfg.kv_ratio, grid, stride, cfg, "kv", block, site.name, (0, 1) if mean else (0,))

        def reduce(x, plan):
            return b.call(ops.merge.default, (x, *plan)) if mean else b.call(ops.reduce.default, (x, plan[0]))

        new_q = b.around(pre, post, q, reduce(qv, (keep_q, source_q)))
        new_k = b.around(pre, post, k, reduce(kv_video, kv_plan))
        new_v = b.around(pre, post, v, reduce(vv, kv_plan))
        mask = call_args(node, "sdpa")["attn_mask"]
        if mask is not None:  # a key mask [B, 1, 1, S]: keep the columns of the kept keys, per head
            columns = b.call(torch.Tensor.transpose, (b.tokens(mask, pre, post, dim=3), -1, -2))  # [B, 1, n, 1]
            columns = b.call(torch.Tensor.expand, (columns, -1, site.heads, -1, -1))
            kept = b.call(torch.Tensor.transpose, (b.call(ops.reduce.default, (columns, kv_plan[0])), -1, -2))
            text = b.call(torch.Tensor.expand, (mask, -1, site.heads, -1, -1))
            new_mask = b.around(pre, post, text, kept, dim=3)
    news = [("query", new_q), ("key", new_k), ("value", new_v)] + ([("attn_mask", new_mask)] if mask is not None else [])
    for name, new in news:
        set_call_arg(node, "sdpa", name, new)
    users = list(node.users)
    with gm.graph.inserting_before(node.next):
        b = _Builder(gm.graph, node)
        restored = b.call(ops.restore.default, (b.tokens(node, pre, post), source_q))
        out = b.around(pre, post, node, restored)
    for u in users:
        u.replace_input_with(node, out)
    return {"site": site.name, "block": block, "grid": list(grid), "stride": list(stride), "tokens": n,
            "text_before": pre, "text_after": post}


def rewrite(gm: fx.GraphModule, structure: DiTStructure, cfg: AsymRnRConfig) -> Rewrite:
    """Rewrite every supported video self-attention; the report lists rewritten and skipped sites."""
    rewritten, skipped = [], []
    for block in structure.blocks:
        for site in block.attention:
            why = _why_not(site, site.sdpa)
            if why is not None:
                skipped.append({"site": site.name, "reason": why})
                continue
            rewritten.append(_rewrite(gm, site.sdpa, site, block.index, structure, cfg))
    gm.graph.lint()
    gm.recompile()
    report = {"rewritten": rewritten, "skipped": skipped}
    return Rewrite(report, None if rewritten else "no attention site could be reduced")
