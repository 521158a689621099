"""The graph vocabulary every analysis and pass shares: target sets, call arguments, walkers.

One place says which FX targets count as a linear, an attention call, a residual add or
a pass-through op, and one place reads a call's arguments whether they were passed by
position or by keyword (`call_args`), so no consumer juggles either.  The walkers are
bounded by the node set they may visit, never by a depth.
"""

from __future__ import annotations

import operator
from typing import Callable, Iterable

import torch
import torch.fx as fx
import torch.nn.functional as F

SDPA_TARGETS = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}
LINEAR_TARGETS = {F.linear, torch._C._nn.linear}
CONV_TARGETS = {torch.conv2d, torch.conv3d, F.conv2d, F.conv3d}
ACTIVATIONS = {F.gelu, torch._C._nn.gelu, F.silu, torch.nn.functional.relu, torch.relu, F.mish, torch.tanh, torch.sigmoid}
ADD_TARGETS = {operator.add, operator.iadd, torch.add, "add", "add_"}
MUL_TARGETS = {operator.mul, operator.imul, torch.mul, "mul", "mul_"}
DIV_TARGETS = {operator.truediv, torch.div, "div"}
MATMUL_TARGETS = {torch.matmul, operator.matmul, torch.bmm, "matmul", "bmm", "__matmul__"}
SPLITS = {"split", "chunk", torch.split, torch.chunk}
CATS = {torch.cat, torch.concat}
TRANSPOSES = {"transpose", "permute", torch.transpose, torch.permute}
SIN_COS = {torch.sin, torch.cos, "sin", "cos"}
# Ops that carry a tensor through unchanged in meaning (layout, dtype, no-op dropout).
PASSTHROUGH = {
    F.dropout, torch.nn.functional.dropout, operator.getitem, torch.flatten, torch.reshape, torch.permute,
    torch.transpose, torch.squeeze, torch.unsqueeze,
    "view", "reshape", "flatten", "unflatten", "permute", "transpose", "contiguous", "to", "float", "type_as",
    "half", "bfloat16", "squeeze", "unsqueeze", "clone", "__getitem__",
}
# Ops whose output's size or value is read from tensor data on the host: a region compiled on its own cannot
# hold them (Inductor raises DataDependentOutputException), so no pass moves them.
DATA_DEPENDENT = {
    "item", "tolist", "nonzero", "masked_select", "unique", "__bool__", "__int__", "__float__",
    torch.nonzero, torch.masked_select, torch.unique, torch.argwhere, torch.bincount,
    torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
}
# What may lie between a span's input and its output when the output is a residual update of it.
RESIDUAL_PATH = ADD_TARGETS | PASSTHROUGH | SPLITS | {torch.cat, operator.getitem}

# Parameter names of the calls whose arguments consumers read, in positional order.
SIGNATURES = {
    "sdpa": ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"),
    "cat": ("tensors", "dim"),
    "dropout": ("input", "p", "training", "inplace"),
}
DEFAULTS = {
    "sdpa": {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False},
    "cat": {"dim": 0},
    "dropout": {"p": 0.5, "training": True, "inplace": False},
}


def is_call(node, targets) -> bool:
    return isinstance(node, fx.Node) and node.op in ("call_function", "call_method") and node.target in targets


def call_args(node: fx.Node, signature: str) -> dict:
    """The arguments of a call by parameter name, positional or keyword, defaults filled in."""
    names = SIGNATURES[signature]
    out = dict(DEFAULTS[signature])
    out.update(zip(names, node.args))
    out.update({k: v for k, v in node.kwargs.items() if k in names})
    return out


def set_call_arg(node: fx.Node, signature: str, name: str, value) -> None:
    """Replace one argument where the call passed it (by position or keyword), or add it by keyword."""
    i = SIGNATURES[signature].index(name)
    if i < len(node.args):
        node.update_arg(i, value)
    else:
        node.update_kwarg(name, value)


def sdpa_qkv(node: fx.Node) -> list:
    """query, key, value of an attention call."""
    a = call_args(node, "sdpa")
    return [a["query"], a["key"], a["value"]]


def sdpa_mask_and_scale(node: fx.Node) -> tuple:
    a = call_args(node, "sdpa")
    return a["attn_mask"], a["scale"]


def first_input(node: fx.Node):
    return node.args[0] if node.args else None


def nodes_between(graph: fx.Graph, first: fx.Node, last: fx.Node) -> list[fx.Node]:
    """The graph's nodes from `first` to `last`, both included, in order (a block, or a run of blocks)."""
    nodes = list(graph.nodes)
    return nodes[nodes.index(first):nodes.index(last) + 1]


def walk(start: fx.Node, step: Callable[[fx.Node], Iterable[fx.Node]], within: set | None = None):
    """Every node reached from `start` by `step` (users or inputs), breadth first, inside `within`."""
    seen, frontier = {start}, [start]
    while frontier:
        nxt = []
        for n in frontier:
            for m in step(n):
                if m not in seen and (within is None or m in within):
                    seen.add(m)
                    nxt.append(m)
                    yield m
        frontier = nxt


def users(node: fx.Node) -> Iterable[fx.Node]:
    return node.users


def inputs(node: fx.Node) -> Iterable[fx.Node]:
    return node.all_input_nodes


def first_reached(start: fx.Node, step, targets, within: set | None = None) -> fx.Node | None:
    """The nearest node calling one of `targets` reached from `start` by `step`."""
    return next((n for n in walk(start, step, within) if is_call(n, targets)), None)


def chain_back(start, targets, through, within: set | None = None) -> fx.Node | None:
    """Follow first inputs back from `start` through ops in `through` to a call of `targets`."""
    node, seen = start, set()
    while isinstance(node, fx.Node) and node not in seen and (within is None or node in within):
        if is_call(node, targets):
            return node
        if through is not None and not is_call(node, through):
            return None
        seen.add(node)
        node = first_input(node)
    return None


def op_name(node: fx.Node) -> str | None:
    """The qualified name of the torch.library op a node calls ("flash_attn::_flash_attn_forward"), or None."""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name
    if isinstance(target, torch._ops.HigherOrderOperator):  # flex_attention, ...
        return f"higher_order::{target._name}"
    return None


def dependents(graph: fx.Graph, roots: Callable[[fx.Node], bool]) -> set[fx.Node]:
    """The nodes for which `roots` holds, and every node computed from one of them."""
    out: set[fx.Node] = set()
    for n in graph.nodes:
        if roots(n) or any(a in out for a in n.all_input_nodes):
            out.add(n)
    return out


def writes_in_place(node: fx.Node) -> bool:
    """A call that writes its first argument: `x.add_(...)`, `x.copy_(...)`, `x[i] = v`."""
    if node.op not in ("call_function", "call_method"):
        return False
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return name.endswith("_") and not name.endswith("__") or name in ("setitem", "__setitem__")


def move_to_head(graph: fx.Graph, nodes: set[fx.Node]) -> list[fx.Node]:
    """Move `nodes` (closed under their inputs, placeholders aside) before the graph's first computation,
    keeping their order; returns them in that order."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    head = next(n for n in graph.nodes if n.op != "placeholder" and n not in nodes)
    moved = sorted(nodes, key=order.__getitem__)
    for n in moved:
        head.prepend(n)
    return moved
