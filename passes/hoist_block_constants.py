"""Values a block computes from weights alone and hands to other blocks move out of it, to the graph's head.

A RoPE table is the usual case: Open-Sora's rotary embedding computes its frequencies in the first
temporal block that calls it and caches them, so in the first traced graph the other temporal blocks
read a value made inside that block.  Left there, the block could never be skipped (its region has an
output that is not a residual update) and it would differ from its siblings.  Such a value depends on
no data input, so computing it first is exact.  In-place ops are left where they are.
"""

from __future__ import annotations

import torch.fx as fx

from ditopt.analysis import _block_path_of, data_dependent, module_path
from ditopt.patterns import move_to_head, writes_in_place


def _movable(node: fx.Node, data: set) -> bool:
    return node.op in ("call_function", "call_method", "get_attr") and node not in data and not writes_in_place(node)


def run(gm: fx.GraphModule) -> dict:
    """Move every such value (with what it is computed from) before the first computation; report them."""
    graph = gm.graph
    data = data_dependent(graph)
    moved: set[fx.Node] = set()
    hoisted = []
    for node in list(graph.nodes):
        if node in moved or not _movable(node, data) or (own := _block_path_of(node)) is None:
            continue
        readers = {(_block_path_of(u) or ("", ""))[0] for u in node.users} - {own[0]}
        if not readers:
            continue
        chain, stack = set(), [node]
        while stack:
            n = stack.pop()
            if n in chain or n in moved or n.op == "placeholder":
                continue
            if not _movable(n, data):
                break
            chain.add(n)
            stack.extend(n.all_input_nodes)
        else:
            for n in move_to_head(graph, chain | moved):  # after what earlier values moved there
                n.meta["ditopt_hoisted"] = True
            moved |= chain
            hoisted.append({"node": node.name, "module": module_path(node), "read_in": sorted(readers)})
    graph.lint()
    gm.recompile()
    return {"hoisted": hoisted}
