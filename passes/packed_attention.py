"""Attention through flash-attn or xformers, and packed batches, become per-sample SDPA where exact.

The normalisation stage's second rule set (after `normalize_attention`): each form below is a table
row that names the call, its layout and which of its arguments are Q, K, V, the scale and the
segment boundaries; every other argument must hold its default (no window, no softcap, no ALiBi),
or the call is left as it is and the report says which argument is set.

    flash_attn::_flash_attn_forward          q [B, S, H, D]
    flash_attn::_flash_attn_varlen_forward   q [T, H, D], samples packed, cu_seqlens_q / cu_seqlens_k
    xformers::efficient_attention_forward_cutlass
                                             q [1, T, H, D], samples packed, seqstart_q / seqstart_k
                                             (what a BlockDiagonalMask becomes), or [B, S, H, D]
    scaled_dot_product_attention             q [1, H, T, D] with a block-diagonal attn_mask

A packed batch is understood as per-sample attention: the segment boundaries must be graph
constants (Dynamo bakes the Python lists behind `BlockDiagonalMask.from_seqlens([N] * B, y_lens)` or
a `cu_seqlens` tensor into the graph), and they are evaluated once here.  Query segments of one
length N become a batch [B, H, N, D]; key segments of unequal lengths (text of different lengths)
are gathered into [B, H, L_max, D] with a constant key-padding mask, which SDPA gives exactly zero
weight.  The result is reshaped back to the call's own layout, so nothing after it changes.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F

from ditopt.analysis import example, module_path
from ditopt.patterns import SDPA_TARGETS, call_args, is_call, op_name


class Declined(Exception):
    """This call is not an attention SDPA reproduces exactly per sample; the message says why."""


@dataclass(frozen=True)
class Form:
    layout: str  # "bshd" (batch, sequence, heads, dim), "thd" (packed tokens), "1thd" (packed, batch of 1)
    q: str
    k: str
    v: str
    scale: str
    dropout: str
    causal: str | None = None
    seqstarts: tuple[str, str] | None = None  # the arguments holding the segment boundaries of Q and K
    defaults: dict = field(default_factory=dict)  # arguments that must hold these values


FORMS = {
    "flash_attn::_flash_attn_forward": Form(
        "bshd", "q", "k", "v", "softmax_scale", "dropout_p", "causal",
        defaults={"window_size_left": -1, "window_size_right": -1, "softcap": 0.0, "alibi_slopes": None}),
    "flash_attn::_flash_attn_varlen_forward": Form(
        "thd", "q", "k", "v", "softmax_scale", "dropout_p", "causal", ("cu_seqlens_q", "cu_seqlens_k"),
        defaults={"window_size_left": -1, "window_size_right": -1, "softcap": 0.0, "alibi_slopes": None,
                  "block_table": None, "leftpad_k": None, "seqused_k": None}),
    "xformers::efficient_attention_forward_cutlass": Form(
        "1thd", "query", "key", "value", "scale", "dropout_p", None, ("seqstart_q", "seqstart_k"),
        defaults={"attn_bias": None, "custom_mask_type": 0, "window_size": None}),
}


def op_args(node: fx.Node) -> dict:
    """A library op's arguments by schema name, positional or keyword, defaults filled in."""
    target = node.target
    schema = (target if isinstance(target, torch._ops.OpOverload) else target.default)._schema
    out = {a.name: a.default_value for a in schema.arguments if a.has_default_value()}
    out.update({a.name: v for a, v in zip(schema.arguments, node.args)})
    out.update(node.kwargs)
    return out


# ---------------------------------------------------------------------------
# constants


class Constants:
    """The values of a graph's nodes that read no graph input, evaluated in graph order (so an in-place
    write such as `mask[:n, :m] = True` is replayed before the mask is read)."""

    def __init__(self, gm: fx.GraphModule):
        self.gm, self.values = gm, None

    def __getitem__(self, node):
        if not isinstance(node, fx.Node):
            return node
        if self.values is None:
            self.values = self._evaluate()
        return self.values.get(node)

    def _evaluate(self) -> dict:
        values: dict[fx.Node, object] = {}
        for node in self.gm.graph.nodes:
            if node.op == "get_attr":
                values[node] = getattr(self.gm, node.target)
            elif node.op in ("call_function", "call_method") and all(a in values for a in node.all_input_nodes):
                args, kwargs = fx.node.map_arg((node.args, node.kwargs), values.__getitem__)
                fn = node.target if node.op == "call_function" else getattr(type(args[0]), node.target)
                try:
                    values[node] = fn(*args, **kwargs)
                except Exception:  # noqa: BLE001 - a value that cannot be computed here is not a constant
                    continue
        return values


def _boundaries(value, what: str) -> list[int]:
    if not isinstance(value, torch.Tensor) or value.dim() != 1 or value.numel() < 2:
        raise Declined(f"{what} is not a graph constant (a tensor computed from the inputs); "
                       "the segments of a packed batch must be known when the graph compiles")
    starts = [int(x) for x in value.tolist()]
    if starts[0] != 0 or any(b < a for a, b in zip(starts, starts[1:])):
        raise Declined(f"{what} {starts} are not increasing boundaries from 0")
    return starts


def block_diagonal_segments(mask: torch.Tensor) -> tuple[list[int], list[int]]:
    """Row and column boundaries of a block-diagonal mask [T, S] (True: may attend), or Declined."""
    spans = []
    for i, row in enumerate(mask.bool()):
        idx = row.nonzero().flatten()
        if idx.numel() == 0 or int(idx[-1] - idx[0]) + 1 != idx.numel():
            raise Declined(f"row {i} of the mask attends to no keys or to keys that are not one contiguous run")
        spans.append((int(idx[0]), int(idx[-1]) + 1))
    rows, cols = [0], [0]
    for i, span in enumerate(spans):
        if i and span == spans[i - 1]:
            continue
        if span[0] != cols[-1]:
            raise Declined("the mask's blocks do not tile the keys one sample after another")
        if i:
            rows.append(i)
        cols.append(span[1])
    rows.append(len(spans))
    if cols[-1] != mask.shape[1]:
        raise Declined("the mask's blocks do not cover every key")
    return rows, cols


# ---------------------------------------------------------------------------
# the rewrite


class _Emitter:
    """Inserts nodes before `anchor`, each with its example value (computed under the graph's fake mode)."""

    def __init__(self, graph: fx.Graph, anchor: fx.Node, meta: dict, reads: list[fx.Node]):
        self.graph, self.anchor, self.meta = graph, anchor, meta
        self.mode = next((v.fake_mode for v in map(example, reads) if hasattr(v, "fake_mode")), None)

    def __call__(self, target, *args, **kwargs) -> fx.Node:
        with self.graph.inserting_before(self.anchor):
            node = (self.graph.call_method(target, args, kwargs) if isinstance(target, str)
                    else self.graph.call_function(target, args, kwargs))
        node.meta = {k: v for k, v in self.meta.items() if k in ("nn_module_stack", "stack_trace", "source_fn_stack")}
        vals = fx.node.map_aggregate((args, kwargs), lambda a: example(a) if isinstance(a, fx.Node) else a)
        fn = getattr(torch.Tensor, target) if isinstance(target, str) else target
        if self.mode is not None:
            with self.mode:
                node.meta["example_value"] = fn(*vals[0], **vals[1])
        else:
            node.meta["example_value"] = fn(*vals[0], **vals[1])
        return node

    def constant(self, data, dtype, device) -> fx.Node:
        return self(torch.tensor, data, dtype=dtype, device=device)


def _per_sample(emit: _Emitter, x: fx.Node, starts: list[int], heads: int, dim: int) -> tuple[fx.Node, fx.Node | None]:
    """Packed tokens [T, H, D] as [B, H, L, D], and a key-padding mask where the segments differ in length."""
    lengths = [b - a for a, b in zip(starts, starts[1:])]
    batch, longest = len(lengths), max(lengths)
    if len(set(lengths)) == 1:
        out = emit("reshape", x, batch, longest, heads, dim)
        return emit("transpose", out, 1, 2), None
    index = [[a + min(j, n - 1) for j in range(longest)] for a, n in zip(starts, lengths)]
    device = example(x).device
    gathered = emit(operator.getitem, x, emit.constant(index, torch.long, device))  # [B, L_max, H, D]
    keep = [[[[j < n for j in range(longest)]]] for n in lengths]  # [B, 1, 1, L_max]
    return emit("transpose", gathered, 1, 2), emit.constant(keep, torch.bool, device)


@dataclass
class Packed:
    """What one attention call computes, per sample: the rewrite's input."""

    node: fx.Node  # the call
    output: fx.Node  # the value that carries its result ([0] of a library op's tuple)
    q: fx.Node
    k: fx.Node
    v: fx.Node
    scale: float | None
    causal: bool
    layout: str  # of q, k, v and the output: "bshd", "thd", "1thd" or "1htd" (SDPA's own, batch of 1)
    starts: tuple[list[int], list[int]] | None  # segment boundaries of Q and K, None: not packed
    form: str


def _library_call(node: fx.Node, name: str, constants: Constants) -> Packed:
    form = FORMS[name]
    a = op_args(node)
    for arg, default in form.defaults.items():
        if a.get(arg, default) != default:
            raise Declined(f"{arg}={a[arg]!r} (only {default!r} is plain softmax attention)")
    if a[form.dropout] not in (0, 0.0):
        raise Declined(f"{form.dropout}={a[form.dropout]!r}: attention dropout at inference")
    readers = [u for u in node.users]
    if any(u.target is not operator.getitem for u in readers) or any(u.args[1] != 0 and u.users for u in readers):
        raise Declined("a result other than the attention output (the log-sum-exp) is read")
    outs = [u for u in readers if u.args[1] == 0]
    if len(outs) != 1:
        raise Declined("the attention output is not read exactly once")
    starts, layout = None, form.layout
    if form.seqstarts is not None:
        values = [a.get(s) for s in form.seqstarts]
        if all(v is None for v in values):
            layout = "bshd"
        else:
            starts = tuple(_boundaries(constants[v], s) for v, s in zip(values, form.seqstarts))
    scale = a[form.scale]
    if isinstance(scale, fx.Node):
        raise Declined(f"{form.scale} is a graph value, not a number")
    return Packed(node, outs[0], a[form.q], a[form.k], a[form.v], scale, bool(form.causal and a[form.causal]),
                  layout, starts, name)


def _masked_sdpa(node: fx.Node, constants: Constants) -> Packed:
    a = call_args(node, "sdpa")
    q = example(a["query"])
    if q is None or q.dim() != 4 or q.shape[0] != 1:
        raise Declined("not a packed batch: the batch is not 1")
    if a["dropout_p"] not in (0, 0.0) or a["is_causal"] or a["enable_gqa"]:
        raise Declined("dropout, is_causal or enable_gqa is set on a packed attention")
    mask = constants[a["attn_mask"]]
    if not isinstance(mask, torch.Tensor):
        raise Declined("the mask is computed from the inputs: which keys each sample sees is not known when the "
                       "graph compiles")
    mask = mask.reshape(mask.shape[-2:]) if mask.dim() > 2 and math.prod(mask.shape[:-2]) == 1 else mask
    if mask.dim() != 2:
        raise Declined(f"a mask of shape {list(mask.shape)} differs per head or sample")
    if mask.is_floating_point():
        if not bool(((mask == 0) | (mask == float("-inf"))).all()):
            raise Declined("an additive mask with values other than 0 and -inf is a bias, not a block mask")
        mask = mask == 0
    rows, cols = block_diagonal_segments(mask)
    if len(rows) == 2:
        raise Declined("the mask is one block: a masked attention, not a packed batch")
    return Packed(node, node, a["query"], a["key"], a["value"], a["scale"], False, "1htd", (rows, cols),
                  "sdpa_block_mask")


def _check(p: Packed) -> None:
    """What makes a call not per-sample SDPA exactly, checked before the rewrite inserts anything."""
    if p.starts is None:
        if p.causal and example(p.q).shape[1] != example(p.k).shape[1]:
            raise Declined("causal attention with different Q and K lengths aligns at the end, SDPA at the start")
        return
    if p.causal:
        raise Declined("causal attention over a packed batch")
    q_starts, k_starts = p.starts
    if len(q_starts) != len(k_starts):
        raise Declined(f"{len(q_starts) - 1} query segments but {len(k_starts) - 1} key segments")
    if len({b - a for a, b in zip(q_starts, q_starts[1:])}) != 1:
        raise Declined("the query segments differ in length: not a batch of samples with one token count")
    if min(b - a for a, b in zip(k_starts, k_starts[1:])) == 0:
        raise Declined("a sample attends to no keys")


def _rewrite(gm: fx.GraphModule, p: Packed) -> fx.Node:
    _check(p)
    qv = example(p.q)
    emit = _Emitter(gm.graph, p.output, p.output.meta, [p.q, p.k, p.v])
    if p.layout == "1htd":  # SDPA's own layout, batch of one: [1, H, T, D] -> tokens [T, H, D]
        heads, dim = int(qv.shape[1]), int(qv.shape[3])
        q, k, v = (emit("transpose", emit("squeeze", x, 0), 0, 1) for x in (p.q, p.k, p.v))
    elif p.layout in ("thd", "1thd"):
        heads, dim = int(qv.shape[-2]), int(qv.shape[-1])
        q, k, v = (emit("reshape", x, -1, heads, dim) for x in (p.q, p.k, p.v))
    else:  # bshd: one transpose each way
        q, k, v = (emit("transpose", x, 1, 2) for x in (p.q, p.k, p.v))
        out = emit(F.scaled_dot_product_attention, q, k, v, is_causal=p.causal, scale=p.scale)
        out.meta["ditopt_form"] = p.form
        return emit("transpose", out, 1, 2)
    q_starts, k_starts = p.starts
    qb, _ = _per_sample(emit, q, q_starts, heads, dim)
    kb, keep = _per_sample(emit, k, k_starts, heads, dim)
    vb, _ = _per_sample(emit, v, k_starts, heads, dim)
    kwargs = {"scale": p.scale} if keep is None else {"attn_mask": keep, "scale": p.scale}
    out = emit(F.scaled_dot_product_attention, qb, kb, vb, **kwargs)  # [B, H, N, D]
    out.meta["ditopt_form"] = p.form
    if p.layout == "1htd":
        return emit("reshape", emit("transpose", out, 0, 1), 1, heads, -1, dim)
    tokens = emit("reshape", emit("transpose", out, 1, 2), -1, heads, dim)
    return tokens if p.layout == "thd" else emit("unsqueeze", tokens, 0)


def _erase_dead(graph: fx.Graph, node: fx.Node) -> None:
    """Erase a replaced call, its unread results and the constants only it read (a mask, boundaries)."""
    for user in list(node.users):
        if not user.users:
            graph.erase_node(user)
    if node.users or node.op == "placeholder":
        return
    inputs = node.all_input_nodes
    graph.erase_node(node)
    for a in inputs:
        if not a.users and a.op in ("call_function", "call_method"):
            _erase_dead(graph, a)


def _candidates(gm: fx.GraphModule):
    for node in list(gm.graph.nodes):
        name = op_name(node) if node.op == "call_function" else None
        if name in FORMS:
            yield node, name
        elif is_call(node, SDPA_TARGETS) and call_args(node, "sdpa")["attn_mask"] is not None:
            q = example(call_args(node, "sdpa")["query"])
            if q is not None and q.dim() == 4 and q.shape[0] == 1:
                yield node, "sdpa_block_mask"


def run(gm: fx.GraphModule) -> dict:
    """Rewrite every library or packed attention call into per-sample SDPA; report the others with why."""
    rewritten, declined = [], []
    constants = Constants(gm)
    for node, form in _candidates(gm):
        where = module_path(node) or node.name
        try:
            p = _masked_sdpa(node, constants) if form == "sdpa_block_mask" else _library_call(node, form, constants)
            out = _rewrite(gm, p)
        except Declined as why:
            declined.append({"node": node.name, "module": where, "form": form, "reason": str(why)})
            continue
        p.output.replace_all_uses_with(out)
        _erase_dead(gm.graph, p.node)
        entry = {"node": node.name, "module": where, "form": form}
        if p.starts is not None:
            entry["samples"] = len(p.starts[0]) - 1
            entry["key_lengths"] = [b - a for a, b in zip(p.starts[1], p.starts[1][1:])]
        rewritten.append(entry)
    gm.graph.lint()
    gm.recompile()
    return {"rewritten": rewritten, "declined": declined}
