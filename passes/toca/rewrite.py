"""ToCa pass: token-wise caching of each block's self-attention, cross-attention and MLP outputs.

For every site the pass caches the module's output before its adaLN gate
(the out-projection, or the MLP's down projection), so each step applies its
own gate and residual add to whatever the cache holds:

    rows  = ditopt.toca_rows(x, site)          # which rows to compute this step
    x_k   = ditopt.gather_rows(x, rows)        # row sites: cross-attention and MLP
    out_k = <the module, on the K rows>        # unchanged nodes: it is token-wise
    out   = ditopt.toca_update(out_k, rows, site, N)   # fresh rows + cached rows

Self-attention is never recomputed in part (errors spread fast through it):
its site only ever runs whole or reads its cache.  Scores are computed next
to the attention that defines them, from its own Q and K, never from a map:
s2 (`ditopt.attention_entropy`) at the block's cross-attention, or s1
(`ditopt.attention_column_score`) at its self-attention when it has no
cross-attention.  Run as is, the rewritten graph computes exactly what the
model does; the hook specialises each block per step (hook.py).

A row site is rewritten only when its module is provably row-wise here: its
nodes hand no value out but the output, and re-propagating shapes with a
different row count gives that many output rows (a shape baked into a view
would fail).  Skipped sites are listed with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from ditopt.analysis import AttentionSite, Block, DiTStructure, example, q_projection_input, shape
from ditopt.method import Rewrite, Tag, tag
from ditopt.patterns import SDPA_TARGETS, call_args, is_call, nodes_between, walk

from . import ops as _ops  # noqa: F401  (registers ToCa's torch.ops.ditopt ops)
from .config import ToCaConfig

ops = torch.ops.ditopt
NAME = "toca"


@dataclass(frozen=True)
class SiteRef:
    """A cached site, the payload of its nodes (roles rows, gather, update)."""

    id: int
    block: int
    kind: str  # "self", "cross" or "mlp"
    name: str
    tokens: int  # rows of the site's output


@dataclass(frozen=True)
class ScoreRef:
    """The payload of a score node: the site whose attention it scores (its id), and which score."""

    id: int
    block: int
    kind: str  # "entropy" (s2) or "column" (s1)


def _row_region(x_in: fx.Node, out: fx.Node, block_nodes: set) -> list[fx.Node] | None:
    """Nodes between x_in and out (reached from x_in, reaching out), in graph order."""
    forward = set(walk(x_in, lambda n: n.users, block_nodes))
    if out not in forward:
        return None
    region = forward & (set(walk(out, lambda n: n.all_input_nodes, forward)) | {out})
    return [n for n in out.graph.nodes if n in region]


def _why_not_row_wise(x_in: fx.Node, region: list[fx.Node], out: fx.Node) -> str | None:
    dims = shape(x_in)
    if dims is None or len(dims) != 3:
        return "the module's input is not [batch, tokens, channels]"
    if shape(out) is None or len(shape(out)) != 3 or shape(out)[:2] != dims[:2]:
        return "the module's output does not have one row per input row"
    inside = set(region)
    for n in region:
        if n is not out and any(u not in inside for u in n.users):
            return f"{n.name} inside the module is read outside it"
    return _shape_check(x_in, region, out)


_RESHAPES = ("view", "reshape", torch.reshape)


def _free_token_dim(region: list[fx.Node], rows: int) -> int:
    """Views and reshapes that spell out the row count (`x.view(b, n, heads, -1)`, as Dynamo records
    them) get -1 there instead: the same shape at full length, the right one for K rows."""
    freed = 0
    for n in region:
        out = shape(n)
        if n.target not in _RESHAPES or out is None or list(out).count(rows) != 1 or not isinstance(n.args[0], fx.Node):
            continue
        new_shape = [-1 if d == rows else int(d) for d in out]
        n.args = (n.args[0], *new_shape) if n.op == "call_method" else (n.args[0], tuple(new_shape))
        n.kwargs = {}
        freed += 1
    return freed


def _shape_check(x_in: fx.Node, region: list[fx.Node], out: fx.Node) -> str | None:
    """Run the module's nodes on meta tensors with another row count: they must follow it."""
    rows = shape(x_in)[1]
    other = rows - 1 if rows > 1 else 2
    env: dict[fx.Node, object] = {}

    def value(a):
        if a is x_in:
            v = example(a)
            return torch.empty(v.shape[0], other, *v.shape[2:], dtype=v.dtype, device="meta")
        if a not in env:
            v = a.meta.get("example_value")
            env[a] = torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device="meta") \
                if isinstance(v, torch.Tensor) else v
        return env[a]

    g = fx.Graph()
    remap: dict[fx.Node, fx.Node] = {}
    inputs = []
    for n in region:
        for a in n.all_input_nodes:
            if a not in remap and a not in region:
                remap[a] = g.placeholder(f"in{len(inputs)}")
                inputs.append(a)
        remap[n] = g.node_copy(n, lambda a: remap[a])
    g.output(remap[out])
    try:
        with torch.no_grad():
            result = fx.Interpreter(fx.GraphModule(torch.nn.Module(), g)).run(*[value(a) for a in inputs])
    except Exception as e:  # noqa: BLE001 - any failure means the module is not row-wise as traced
        return f"the module's shapes are fixed in the graph ({type(e).__name__})"
    if not isinstance(result, torch.Tensor) or result.shape[1] != other:
        return "the module's output does not follow its input's row count"
    return None


def _site_tag(node: fx.Node, anchor: fx.Node, site: dict, role: str) -> fx.Node:
    ref = SiteRef(site["site"], site["block"], site["kind"], site["name"], site["tokens"])
    return tag(node, Tag(NAME, role, ref), like=anchor)


class _Rewriter:
    def __init__(self, gm: fx.GraphModule, structure: DiTStructure, cfg: ToCaConfig):
        self.gm, self.graph, self.structure, self.cfg = gm, gm.graph, structure, cfg
        self.sites: list[dict] = []
        self.skipped: list[dict] = []
        self.scores: list[dict] = []

    def block(self, block: Block) -> None:
        members = set(nodes_between(self.graph, block.first_node, block.last_node))
        for att in block.attention:
            if att.kind in ("self", "joint"):
                self._reuse_site(block, att)
            elif att.kind == "cross":
                self._row_site(block, att.name, "cross", q_projection_input(att.sdpa, members),
                               att.output, members)
            else:
                self.skipped.append({"site": att.name, "reason": f"{att.kind} attention"})
        for mlp in block.mlps:
            self._row_site(block, mlp.name, "mlp", mlp.input, mlp.output, members)
        self._score(block)

    def _new_site(self, block: Block, name: str, kind: str, rows_of: fx.Node) -> dict:
        site = {"site": len(self.sites), "block": block.index, "name": name, "kind": kind,
                "tokens": int(shape(rows_of)[1])}
        self.sites.append(site)
        return site

    def _reuse_site(self, block: Block, att: AttentionSite) -> None:
        out = att.output
        if out is None or shape(out) is None or len(shape(out)) != 3:
            self.skipped.append({"site": att.name, "reason": "no [batch, tokens, channels] output projection found"})
            return
        site = self._new_site(block, att.name, "self", out)
        users = list(out.users)
        with self.graph.inserting_after(out):
            rows = _site_tag(self.graph.call_function(ops.toca_rows.default, (out, site["site"])), out, site, "rows")
        with self.graph.inserting_after(rows):
            update = self.graph.call_function(ops.toca_update.default, (out, rows, site["site"], site["tokens"]))
            _site_tag(update, out, site, "update")
        for u in users:
            u.replace_input_with(out, update)
        site["sdpa"] = att.sdpa

    def _row_site(self, block: Block, name: str, kind: str, x_in: fx.Node | None, out: fx.Node | None,
                  members: set) -> None:
        if x_in is None or out is None:
            self.skipped.append({"site": name, "reason": "the module's input or output projection was not found"})
            return
        region = _row_region(x_in, out, members)
        if region is not None:
            _free_token_dim(region, int(shape(x_in)[1]))
        why = "the output is not reached from the input" if region is None else _why_not_row_wise(x_in, region, out)
        if why is not None:
            self.skipped.append({"site": name, "reason": why})
            return
        site = self._new_site(block, name, kind, x_in)
        first_use = region[0]
        with self.graph.inserting_before(first_use):
            rows = _site_tag(self.graph.call_function(ops.toca_rows.default, (x_in, site["site"])), first_use, site,
                             "rows")
            picked = _site_tag(self.graph.call_function(ops.gather_rows.default, (x_in, rows)), first_use, site,
                               "gather")
        for n in region:
            n.replace_input_with(x_in, picked)
        users = list(out.users)
        with self.graph.inserting_after(out):
            update = self.graph.call_function(ops.toca_update.default, (out, rows, site["site"], site["tokens"]))
            _site_tag(update, out, site, "update")
        for u in users:
            u.replace_input_with(out, update)
        if kind == "cross":
            site["sdpa"] = next(n for n in region if is_call(n, SDPA_TARGETS))

    def _score(self, block: Block) -> None:
        """One score per block: s2 at its cross-attention, else s1 at its first full self-attention."""
        mine = [s for s in self.sites if s["block"] == block.index and "sdpa" in s]
        cross = [s for s in mine if s["kind"] == "cross"]
        own = [s for s in mine if s["kind"] == "self"
               and next(a for a in block.attention if a.sdpa is s["sdpa"]).axis != "temporal"]
        wanted = self.cfg.score
        if wanted == "none":
            return
        if wanted == "auto" and cross:
            source, op, kind = (cross[0] if cross else None), ops.attention_entropy.default, "entropy"
        else:
            source, op, kind = (own[0] if own else None), ops.attention_column_score.default, "column"
        if source is None:
            self.scores.append({"block": block.index, "score": None,
                                "reason": "no cross-attention or full/spatial self-attention to score from"})
            return
        sdpa = source["sdpa"]
        args = call_args(sdpa, "sdpa")
        if args["enable_gqa"]:
            self.scores.append({"block": block.index, "score": None, "reason": "grouped-query attention"})
            return
        operands = (args["query"], args["key"], args["attn_mask"], args["scale"])
        if kind == "entropy":
            operands += (self.cfg.cfg_shared,)
        with self.graph.inserting_before(sdpa):
            score = self.graph.call_function(op, operands)
        tag(score, Tag(NAME, "score", ScoreRef(source["site"], block.index, kind)), like=sdpa)
        self.scores.append({"block": block.index, "score": kind, "from": source["name"]})


def rewrite(gm: fx.GraphModule, structure: DiTStructure, cfg: ToCaConfig) -> Rewrite:
    """Cache every supported site of every block; the report lists sites, scores and skipped sites."""
    rewriter = _Rewriter(gm, structure, cfg)
    for block in structure.blocks:
        rewriter.block(block)
    gm.graph.lint()
    gm.recompile()
    report = {"sites": [{k: v for k, v in s.items() if k != "sdpa"} for s in rewriter.sites],
              "scores": rewriter.scores, "skipped": rewriter.skipped}
    return Rewrite(report, None if rewriter.sites else "no site could be cached")
