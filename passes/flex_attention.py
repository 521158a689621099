"""flex attention becomes SDPA where its score_mod and mask_mod make that exact.

diffusers' `set_attention_backend("flex")` (and research code calling `flex_attention`) puts
`torch.ops.higher_order.flex_attention(q, k, v, score_mod, block_mask, scale, kernel_options, ...)` in
the graph, its score_mod and mask_mod as subgraphs.  When the score_mod returns the score unchanged and
the mask_mod admits every (query, key) pair, the call computes exactly softmax(q k^T * scale) v: it
becomes `scaled_dot_product_attention(q, k, v, scale=scale)`, which every method knows.  Any other
call is left as it is and reported with why (ditopt then names it in its warning).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from ditopt.analysis import example, module_path
from ditopt.patterns import inputs, walk

FLEX = getattr(torch.ops.higher_order, "flex_attention", None)


def is_flex(node: fx.Node) -> bool:
    return FLEX is not None and node.op == "call_function" and node.target is FLEX


def _subgraph(gm: fx.GraphModule, node) -> fx.Graph | None:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        sub = getattr(gm, node.target, None)
        return getattr(sub, "graph", None)
    return None


def _returns_first_input(graph: fx.Graph) -> bool:
    """A score_mod that returns its score argument unchanged."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    out = next(n for n in graph.nodes if n.op == "output")
    result = out.args[0]
    return bool(placeholders) and result is placeholders[0]


def _admits_everything(graph: fx.Graph) -> bool:
    """A mask_mod that returns a constant True (diffusers' and flex's no-op mask)."""
    out = next(n for n in graph.nodes if n.op == "output")
    result = out.args[0]
    if not isinstance(result, fx.Node) or result.op != "call_method" or result.target not in ("new_ones", "new_full"):
        return result is True
    if result.target == "new_full" and result.args[-1] is not True:
        return False
    return result.kwargs.get("dtype") is torch.bool


def why_not_sdpa(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """None when the flex call is SDPA exactly; else the reason, in words."""
    q, k, v, score_mod, block_mask, *rest = node.args
    score_graph = _subgraph(gm, score_mod)
    if score_graph is None or not _returns_first_input(score_graph):
        return "its score_mod changes the scores (a bias, a softcap, ALiBi)"
    mask_graph = _subgraph(gm, block_mask[-1]) if isinstance(block_mask, tuple) and block_mask else None
    if isinstance(block_mask, tuple) and block_mask and mask_graph is None:
        return "its block mask has no mask_mod ditopt can read"
    if mask_graph is not None and not _admits_everything(mask_graph):
        return "its mask_mod masks (query, key) pairs (a causal, sliding-window or document mask)"
    if len(rest) >= 3 and (rest[2] or (len(rest) > 3 and rest[3])):
        return "its score_mod or mask_mod reads other tensors"
    qs, ks = example(q), example(k)
    if qs is None or ks is None or qs.dim() != 4 or qs.shape[1] != ks.shape[1]:
        return "its query and key head counts differ (grouped-query attention)"
    users = list(node.users)
    if not all(u.op == "call_function" and u.target is operator.getitem and u.args[1] == 0 for u in users):
        return "its log-sum-exp output is used"
    return None


def _vmap_plumbing(node: fx.Node) -> bool:
    """functorch's vmap bookkeeping (levels, batch dims), which a traced `create_block_mask` leaves in the graph."""
    return "functorch" in (getattr(node.target, "__module__", None) or "")


def _mask_construction(graph: fx.Graph, flex_nodes: list[fx.Node]) -> set[fx.Node] | None:
    """The nodes that only build these calls' block masks (create_block_mask traced through vmap, with its
    in-place writes and vmap levels), or None when any of them is used by something else."""
    built = {n for f in flex_nodes for arg in _nodes_in(f.args[4]) for n in (arg, *walk(arg, inputs))
             if n.op not in ("placeholder", "output")}
    if not built:
        return set()
    order = {n: i for i, n in enumerate(graph.nodes)}
    lo, hi = min(order[n] for n in built), max(order[n] for n in built)
    # what else the construction computes from its values, and its vmap levels, within its span: one pass in
    # graph order sees every input before its users
    for n in list(graph.nodes)[lo:hi + 1]:
        if n not in built and n not in flex_nodes and (_vmap_plumbing(n) or any(a in built for a in n.all_input_nodes)):
            built.add(n)
    if any(u not in built and u not in flex_nodes for n in built for u in n.users):
        return None
    return built


def _nodes_in(value) -> list[fx.Node]:
    found = []
    fx.node.map_arg(value, lambda n: found.append(n))
    return found


def run(gm: fx.GraphModule) -> dict:
    """Rewrite every flex attention that is SDPA exactly; report the others with why."""
    rewritten, declined = [], []
    reasons = {n: why_not_sdpa(gm, n) for n in gm.graph.nodes if is_flex(n)}
    construction = _mask_construction(gm.graph, [n for n, why in reasons.items() if why is None])
    for node, why in reasons.items():
        where = module_path(node) or node.name
        why = why or (None if construction is not None else "its block mask's construction is used by other "
                                                            "computation too")
        if why is not None:
            declined.append({"node": node.name, "module": where, "reason": why})
            node.meta["ditopt_declined"] = why  # the analysis's warning quotes it
            continue
        q, k, v, _, _, scale, *_ = node.args
        with gm.graph.inserting_before(node):
            sdpa = gm.graph.call_function(F.scaled_dot_product_attention, (q, k, v), {"scale": scale})
        sdpa.meta = {**node.meta, "example_value": example(q).new_empty(
            (*example(q).shape[:-1], example(v).shape[-1]))}
        for user in list(node.users):
            user.replace_all_uses_with(sdpa)
            gm.graph.erase_node(user)
        gm.graph.erase_node(node)
        rewritten.append({"node": node.name, "module": where})
    if rewritten:  # the block mask's construction is dead now
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        for n in sorted(construction, key=lambda n: -order[n]):
            gm.graph.erase_node(n)
        gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return {"rewritten": rewritten, "declined": declined}
