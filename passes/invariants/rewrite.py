"""Move the step-invariant computation to the graph's head, as one region the hook caches.

Step-varying: the latent and the timestep inputs and everything computed from them.  Step-invariant:
every other computation (on the text, on other inputs, on weights and constants).  The values worth
keeping are the invariant ones a varying node reads (the frontier), where computing them takes more
than views of an input.  Each is moved, with everything it is computed from, before the first
computation of the graph and tagged as one own region; a value whose computation includes a block's
first or last node stays where it is (the blocks' node ranges must not change).
"""

from __future__ import annotations

import torch.fx as fx

from ditopt.analysis import DiTStructure, module_path
from ditopt.method import Rewrite, Tag, tag
from ditopt.patterns import DATA_DEPENDENT, PASSTHROUGH, dependents, inputs, is_call, move_to_head, walk, writes_in_place

REGION = "invariants"


def _impure(node: fx.Node) -> bool:
    """An op that writes a tensor or has another side effect (a random draw, a print)."""
    return writes_in_place(node) or node.is_impure()


def _written_in_place(graph: fx.Graph) -> set[fx.Node]:
    """The tensors an in-place op of the graph may write, e.g. CogVideoX's joint position table (zeros,
    then `copy_` into a slice of its `.data`): a value read from one of them stays after the write.
    Conservative: everything back along the written tensor's first arguments."""
    written = set()
    for n in graph.nodes:
        if n.op in ("call_function", "call_method") and _impure(n) and n.args and isinstance(n.args[0], fx.Node):
            base = n.args[0]  # back through first arguments: views, getitem, `.data`, what a view was made of
            while isinstance(base, fx.Node) and base not in written:
                written.add(base)
                base = base.args[0] if base.args else None
    return written


def rewrite(gm: fx.GraphModule, structure: DiTStructure, cfg) -> Rewrite:
    """Tag and move the invariant computation; the report names each cached value and its module."""
    graph = gm.graph
    varying = dependents(graph, lambda n: n is structure.latent_input or n is structure.timestep_input)
    pinned = {n for b in structure.blocks for n in (b.first_node, b.last_node)}
    invariant = {n for n in graph.nodes if n.op in ("call_function", "call_method", "get_attr") and n not in varying}
    moved: set[fx.Node] = set()
    cached, declined = [], []
    written = _written_in_place(graph)
    for node in graph.nodes:
        if node not in invariant or not any(u in varying or u.op == "output" for u in node.users):
            continue
        closure = {node, *walk(node, inputs)}  # the value and everything it is made from
        computed = {n for n in closure if n.op != "placeholder"}
        if all(is_call(n, PASSTHROUGH) or n.op == "get_attr" for n in computed):
            continue  # a view of an input: nothing to save
        why = ("it includes a block's first or last node" if closure & pinned else
               "it reads tensor data on the host (.item(), nonzero, ...)" if any(is_call(n, DATA_DEPENDENT)
                                                                                  for n in computed) else
               "it reads a tensor the graph writes in place" if closure & written else
               "it includes an in-place or random op" if any(_impure(n) for n in computed) else None)
        if why is not None:
            declined.append({"node": node.name, "module": module_path(node), "reason": why})
            continue
        moved |= computed
        cached.append({"node": node.name, "module": module_path(node)})
    if not cached:
        return Rewrite({"cached": [], "declined": declined},
                       "nothing in this graph is computed only from inputs that stay the same across steps")
    for n in move_to_head(graph, moved):
        tag(n, Tag("invariants", "cached", own_region=REGION))
    graph.lint()
    gm.recompile()
    return Rewrite({"cached": cached, "declined": declined, "nodes": len(moved)})
