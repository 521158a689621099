"""Hand-written softmax attention becomes one `scaled_dot_product_attention` node, where that is exact.

In the manner of Inductor's `fuse_attention`: a pattern, its replacement, and checks that keep the
rewrite exact.  From each softmax over the last axis, walk back to `q @ k^T` and forward to `@ v`:

    s = (q [* a]) @ k.transpose(-2, -1) [* b | / c] [+ mask | .masked_fill(m, -inf)] [.float()]
    p = s.softmax(-1) [.to(dtype)]          # dropout outside training was removed before
    o = p @ v                               ->  o = sdpa(q, k, v, attn_mask=..., scale=a*b/c)

(matmul, bmm or `@`; or the same two products as einsum, `"...qd,...kd->...qk"` and `"...qk,...kd->...qd"`.)

Checks: every intermediate value is read only inside the pattern; scales are Python numbers; q, k
and v have rank >= 3 with matching batch axes; float32 throughout, or a 16-bit attention whose
softmax is taken in float32 (SDPA's kernels accumulate the softmax in float32; one taken in 16 bits
would not be reproduced).  Everything else is left as written, and the report says why, softmax by
softmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

from ditopt.analysis import example, module_path
from ditopt.patterns import ADD_TARGETS, DIV_TARGETS, MATMUL_TARGETS, MUL_TARGETS, TRANSPOSES, is_call

SOFTMAX = {F.softmax, torch.softmax, "softmax", torch.Tensor.softmax}
CASTS = {"float", "to", "type_as", "half", "bfloat16"}
MASKED_FILL = {"masked_fill", torch.masked_fill}


class Declined(Exception):
    """This softmax is not an attention that SDPA reproduces exactly; the message says why."""


@dataclass
class Match:
    q: fx.Node
    k: fx.Node
    v: fx.Node
    scale: float
    mask: fx.Node | None
    mask_is_fill: bool  # masked_fill(m, -inf): SDPA's boolean mask is its negation
    scores: list[fx.Node]  # the nodes the replacement makes dead, QK product to PV product
    output: fx.Node


def _only_user(node: fx.Node) -> fx.Node:
    users = list(node.users)
    if len(users) != 1:
        raise Declined(f"{node.name} is read {len(users)} times (an attention map used elsewhere)")
    return users[0]


def _softmax_dim(node: fx.Node):
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    rank = example(node).dim() if example(node) is not None else None
    return dim if dim is None or dim >= 0 or rank is None else dim + rank


def _is_last_two_swap(node: fx.Node) -> bool:
    val = example(node.args[0]) if node.args else None
    if val is None or not is_call(node, TRANSPOSES):
        return False
    rank = val.dim()
    dims = [d if not isinstance(d, int) or d >= 0 else d + rank for d in node.args[1:]]
    if node.target in ("transpose", torch.transpose):
        return sorted(dims) == [rank - 2, rank - 1]
    perm = dims[0] if len(dims) == 1 and isinstance(dims[0], (list, tuple)) else dims
    perm = [p + rank if p < 0 else p for p in perm]
    return perm == list(range(rank - 2)) + [rank - 1, rank - 2]


def _scalar(node: fx.Node, targets) -> float | None:
    """The Python number of `x * c`, `c * x` (MUL) or `x / c` (DIV), or None."""
    if not is_call(node, targets) or len(node.args) != 2:
        return None
    a, b = node.args
    if targets is DIV_TARGETS:
        return 1.0 / b if isinstance(b, (int, float)) and isinstance(a, fx.Node) else None
    if isinstance(b, (int, float)) and isinstance(a, fx.Node):
        return float(b)
    if isinstance(a, (int, float)) and isinstance(b, fx.Node):
        return float(a)
    return None


def _tensor_arg(node: fx.Node) -> fx.Node:
    return next(a for a in node.args if isinstance(a, fx.Node))


def match(softmax: fx.Node) -> Match:
    """The attention a softmax node closes, or Declined with the reason."""
    val = example(softmax)
    if val is None or _softmax_dim(softmax) != val.dim() - 1:
        raise Declined("the softmax is not over the last axis")
    # forward: casts, then the product with V
    node, dead = softmax, [softmax]
    while True:
        user = _only_user(node)
        if is_call(user, CASTS):
            node = user
            dead.append(user)
            continue
        break
    if is_call(user, MATMUL_TARGETS) and user.args[0] is node:
        output, v = user, user.args[1]
    elif (operands := _einsum_operands(user, "pv")) is not None and operands[0] is node:
        output, v = user, operands[1]
    else:
        raise Declined(f"the softmax is not followed by a matmul with V ({user.name}: {user.target})")
    # backward: casts, a mask, scales, then the product of Q and K^T
    scale, mask, fill = 1.0, None, False
    node = softmax.args[0]
    upcast = softmax.kwargs.get("dtype") == torch.float32
    while True:
        if not isinstance(node, fx.Node):
            raise Declined("the softmax input is not a graph value")
        if node is not softmax.args[0] and len(node.users) != 1:
            raise Declined(f"{node.name} is read outside the attention")
        if is_call(node, CASTS):
            upcast |= example(node) is not None and example(node).dtype == torch.float32
            dead.append(node)
            node = node.args[0]
        elif (c := _scalar(node, MUL_TARGETS)) is not None or (c := _scalar(node, DIV_TARGETS)) is not None:
            scale *= c
            dead.append(node)
            node = _tensor_arg(node)
        elif is_call(node, ADD_TARGETS) and mask is None and len(node.args) == 2:
            a, b = node.args
            dead.append(node)
            mask, node = (b, a) if _on_scores_path(a) else (a, b)
            if not isinstance(mask, fx.Node):
                raise Declined("the scores are shifted by a constant, not a mask")
        elif is_call(node, MASKED_FILL) and mask is None:
            value = node.args[2] if len(node.args) > 2 else node.kwargs.get("value")
            if value != float("-inf"):
                raise Declined(f"masked_fill with {value!r} (only -inf is a boolean mask)")
            mask, fill = node.args[1], True
            dead.append(node)
            node = node.args[0]
        elif is_call(node, MATMUL_TARGETS) or _einsum_operands(node, "qk") is not None:
            break
        else:
            raise Declined(f"{node.name} ({node.target}) between the scores and the softmax is not a scale, "
                           "a mask or a cast")
    qk = node
    if (operands := _einsum_operands(qk, "qk")) is not None:  # einsum("...qd,...kd->...qk", q, k)
        a, k = operands
    else:
        a, kt = qk.args[0], qk.args[1]
        if not (isinstance(kt, fx.Node) and _is_last_two_swap(kt) and len(kt.users) == 1):
            raise Declined(f"the scores {qk.name} are not q @ k.transpose(-2, -1)")
        k = kt.args[0]
        dead.append(kt)
    while (c := _scalar(a, MUL_TARGETS)) is not None and len(a.users) == 1:  # q * scale before the product
        scale *= c
        dead.append(a)
        a = _tensor_arg(a)
    _check_types(a, k, v, output, upcast)
    return Match(a, k, v, scale, mask, fill, [qk, *dead], output)


EINSUM = {torch.einsum, torch.functional.einsum}


def _einsum_operands(node, which: str) -> tuple[fx.Node, fx.Node] | None:
    """The two operands of an einsum that is Q K^T ("qk": `...xd,...yd->...xy`) or P V ("pv":
    `...xy,...yd->...xd`) over the same leading axes, else None."""
    if not is_call(node, EINSUM) or len(node.args) != 3 or not isinstance(node.args[0], str):
        return None
    eq = node.args[0].replace(" ", "")
    if "->" not in eq or eq.count(",") != 1:
        return None
    (a, b), out = eq.split("->")[0].split(","), eq.split("->")[1]
    if not (len(a) == len(b) == len(out) >= 2) or a[:-2] != b[:-2] or a[:-2] != out[:-2]:
        return None
    (a1, a2), (b1, b2), (o1, o2) = a[-2:], b[-2:], out[-2:]
    lead = set(a[:-2])
    if len({a1, a2, b1, b2} & lead) or len(set(a[:-2])) != len(a[:-2]):
        return None
    if which == "qk":
        ok = a2 == b2 and a1 != b1 and (o1, o2) == (a1, b1)
    else:
        ok = a2 == b1 and a1 != b2 and (o1, o2) == (a1, b2)
    return (node.args[1], node.args[2]) if ok and all(isinstance(x, fx.Node) for x in node.args[1:]) else None


def _on_scores_path(node) -> bool:
    """Whether a value comes from the Q K^T product (so the other addend is the mask)."""
    while isinstance(node, fx.Node):
        if is_call(node, MATMUL_TARGETS) or _einsum_operands(node, "qk") is not None:
            return True
        if not (is_call(node, CASTS) or is_call(node, MUL_TARGETS | DIV_TARGETS)):
            return False
        node = _tensor_arg(node)
    return False


def _check_types(q: fx.Node, k: fx.Node, v, output: fx.Node, upcast: bool) -> None:
    vals = [example(x) if isinstance(x, fx.Node) else None for x in (q, k, v)]
    if any(x is None for x in vals):
        raise Declined("q, k or v has no known shape")
    qv, kv, vv = vals
    if qv.dim() < 3 or not (qv.dim() == kv.dim() == vv.dim()) or qv.shape[:-2] != kv.shape[:-2]:
        raise Declined(f"q, k and v shapes {list(qv.shape)}, {list(kv.shape)}, {list(vv.shape)} are not "
                       "[..., tokens, channels] with one batch")
    out = example(output)
    if len({qv.dtype, kv.dtype, vv.dtype}) != 1 or out is None or out.dtype != qv.dtype:
        raise Declined("q, k, v and the output do not share one dtype")
    if qv.dtype != torch.float32 and not upcast:
        raise Declined(f"the softmax is taken in {qv.dtype}: SDPA accumulates it in float32")


def _replace(gm: fx.GraphModule, m: Match) -> fx.Node:
    graph = gm.graph
    with graph.inserting_before(m.output):
        mask = m.mask
        if mask is not None and m.mask_is_fill:
            mask = graph.call_function(torch.logical_not, (mask,))
            if example(m.mask) is not None:
                mask.meta["example_value"] = torch.logical_not(example(m.mask))
        kwargs = {"attn_mask": mask, "scale": m.scale} if mask is not None else {"scale": m.scale}
        sdpa = graph.call_function(F.scaled_dot_product_attention, (m.q, m.k, m.v), kwargs)
    sdpa.meta = dict(m.output.meta)  # module stack, shape and dtype of the product it replaces
    sdpa.meta["ditopt_form"] = "hand-written"
    m.output.replace_all_uses_with(sdpa)
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in sorted({m.output, *m.scores}, key=order.__getitem__, reverse=True):  # readers before what they read
        if not node.users:
            graph.erase_node(node)
    return sdpa


def run(gm: fx.GraphModule) -> dict:
    """Rewrite every hand-written attention that SDPA reproduces exactly; report the others with why."""
    rewritten, declined = [], []
    for node in [n for n in gm.graph.nodes if is_call(n, SOFTMAX)]:
        where = module_path(node) or node.name
        try:
            m = match(node)
        except Declined as why:
            declined.append({"node": node.name, "module": where, "reason": str(why)})
            continue
        _replace(gm, m)
        rewritten.append({"node": node.name, "module": where, "scale": m.scale,
                          "mask": None if m.mask is None else ("boolean" if m.mask_is_fill else "additive")})
    gm.graph.lint()
    gm.recompile()
    return {"rewritten": rewritten, "declined": declined}

