"""Remove ops that do nothing at inference: dropout outside training, casts to the dtype a
tensor already has.  Fewer pass-through nodes make the method passes' matching simpler and
the exported graphs shorter."""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

from ditopt.analysis import example

CASTS = {"float": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16}


def _is_noop(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in (F.dropout, torch.dropout):
        training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
        p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
        return training is False or p == 0
    if node.op != "call_method" or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    src, out = example(node.args[0]), example(node)
    if src is None or out is None or src.dtype != out.dtype or src.device != out.device:
        return False
    if node.target in CASTS:
        return len(node.args) == 1 and not node.kwargs
    if node.target == "type_as":
        return True
    if node.target == "to":
        # Only dtype-only casts; copy=True or a memory_format make a new tensor.
        extra = [a for a in node.args[1:] if not isinstance(a, torch.dtype)]
        return not extra and set(node.kwargs) <= {"dtype"}
    return False


def run(gm: fx.GraphModule) -> dict:
    """Remove them in place; returns how many of each kind."""
    removed: dict[str, int] = {}
    for node in list(gm.graph.nodes):
        if _is_noop(node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            kind = node.target if isinstance(node.target, str) else "dropout"
            removed[kind] = removed.get(kind, 0) + 1
    gm.recompile()
    return {"removed": removed, "total": sum(removed.values())}
