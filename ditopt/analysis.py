"""Find a diffusion transformer's structure in a Dynamo FX graph.

Everything is read from the graph itself: module paths from
`node.meta["nn_module_stack"]`, shapes from `node.meta["example_value"]`.
No model class name is consulted, so a plain-PyTorch model is analysed the
same way as a diffusers one.  A graph that does not look like a DiT raises
`UnsupportedGraph` with the reason; the backend then falls back to Inductor.
"""

from __future__ import annotations

import operator
import re
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F


class UnsupportedGraph(Exception):
    """The graph has no DiT structure ditopt can act on; the message says why."""


@dataclass
class AttentionSite:
    name: str  # module path, e.g. "blocks.0.attn1"
    kind: str  # "self", "cross", "joint" or "other"
    axis: str  # "full", "spatial" or "temporal" (which video axes the sequence spans)
    sdpa: str  # node name of the attention call
    q_len: int
    kv_len: int
    heads: int
    head_dim: int
    video_span: tuple[int, int] | None  # (start, length) of video tokens in the sequence
    output: str | None  # the out-projection's node, before any gate
    gate: str | None  # the node multiplied onto the output before the residual add
    residual_add: str | None
    branch: str | None = None  # the operand the site contributes to the residual add (gated output)


@dataclass
class MLPSite:
    name: str
    input: str  # node feeding the first linear
    output: str  # the second linear's node, before any gate
    hidden: int
    gate: str | None
    residual_add: str | None
    branch: str | None = None


@dataclass
class Block:
    index: int
    path: str  # e.g. "transformer_blocks.3"
    module_type: str
    first_node: str
    last_node: str
    num_nodes: int
    attention: list[AttentionSite] = field(default_factory=list)
    mlps: list[MLPSite] = field(default_factory=list)

    @property
    def signature(self) -> tuple:
        """What kind of block this is: the module type and its site kinds."""
        return (self.module_type, tuple((a.kind, a.axis) for a in self.attention), len(self.mlps))


@dataclass
class TokenLayout:
    batch: int
    video_tokens: int
    grid: tuple[int, int, int] | None  # (frames, height, width) in tokens
    text_tokens: int | None


@dataclass
class SkipSpan:
    """Adjacent blocks that can be skipped together: each value the span hands on is a residual
    update of one of its inputs, `streams` = [(input node, output node)]."""

    id: int
    blocks: list[int]
    streams: list[tuple[str, str]]
    decide_after: str | None = None  # a probe inside the span that the skip decision waits for


@dataclass
class DiTStructure:
    blocks: list[Block]
    layout: TokenLayout
    latent_input: str
    timestep_input: str | None
    excluded_blocks: list[dict] = field(default_factory=list)  # blocks found but left unchanged, with why
    skip_spans: list[SkipSpan] = field(default_factory=list)  # filled by the adacache pass
    probes: dict[str, str] = field(default_factory=dict)  # probe name -> node name, read by runtime policies

    def to_json(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """A short human-readable summary, as `ditopt inspect` prints it."""
        lay = self.layout
        grid = "x".join(map(str, lay.grid)) if lay.grid else "unknown"
        lines = [
            f"video tokens: {lay.video_tokens} (grid F x H x W = {grid}), text tokens: {lay.text_tokens}, batch {lay.batch}",
            f"timestep input: {self.timestep_input}, latent input: {self.latent_input}",
            f"blocks: {len(self.blocks)}",
        ]
        for b in self.blocks:
            sites = [f"{a.kind}-attn[{a.axis}]({a.q_len}x{a.kv_len}, {a.heads}h)" for a in b.attention]
            sites += [f"mlp({m.hidden})" for m in b.mlps]
            gated = sum(1 for s in [*b.attention, *b.mlps] if s.gate)
            lines.append(f"  [{b.index}] {b.path} ({b.module_type}): {', '.join(sites)}; {gated} gated residual adds")
        for ex in self.excluded_blocks:
            lines.append(f"  excluded {ex['path']}: {ex['reason']}")
        return "\n".join(lines)


SDPA_TARGETS = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}
LINEAR_TARGETS = {F.linear, torch._C._nn.linear}
CONV_TARGETS = {torch.conv2d, torch.conv3d, F.conv2d, F.conv3d}
ACTIVATIONS = {F.gelu, torch._C._nn.gelu, F.silu, torch.nn.functional.relu, torch.relu, F.mish, torch.tanh, torch.sigmoid}
ADD_TARGETS = {operator.add, operator.iadd, torch.add, "add", "add_"}
MUL_TARGETS = {operator.mul, operator.imul, torch.mul, "mul", "mul_"}
# Ops that carry a tensor through unchanged in meaning (layout, dtype, no-op dropout).
PASSTHROUGH = {
    F.dropout, torch.nn.functional.dropout, operator.getitem, torch.flatten, torch.reshape, torch.permute,
    torch.transpose, torch.squeeze, torch.unsqueeze,
    "view", "reshape", "flatten", "unflatten", "permute", "transpose", "contiguous", "to", "float", "type_as",
    "half", "bfloat16", "squeeze", "unsqueeze", "clone", "__getitem__",
}

_PATH_RE = re.compile(r"\.__dict__\['_modules'\]\['([^']+)'\]|\['([^']+)'\]")


def module_path(node: fx.Node) -> str | None:
    """The dotted path of the innermost module a node was traced in, e.g. "blocks.0.attn1"."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    return normalize_path(list(stack.values())[-1][0])


def module_paths(node: fx.Node) -> list[tuple[str, str]]:
    """(path, type name) of every module on the node's stack, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    return [(normalize_path(p), getattr(t, "__name__", str(t))) for p, t in stack.values()]


def normalize_path(raw: str) -> str:
    path = _PATH_RE.sub(lambda m: "." + (m.group(1) or m.group(2)), raw)
    path = re.sub(r"^L\.self\.?|^L\['self'\]\.?", "", path)
    path = path.replace("L.self", "").lstrip(".")
    return re.sub(r"\[(\d+)\]", r".\1", path)


def example(node) -> torch.Tensor | None:
    val = node.meta.get("example_value") if isinstance(node, fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def shape(node) -> tuple | None:
    val = example(node)
    return tuple(val.shape) if val is not None else None


def is_weight(node: fx.Node) -> bool:
    """True for placeholders that Dynamo lifted from module parameters or buffers."""
    return node.op == "placeholder" and ("_parameters_" in node.name or "_buffers_" in node.name)


def _matches(node: fx.Node, targets) -> bool:
    return node.op in ("call_function", "call_method") and node.target in targets


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes if example(a) is not None]


# ---------------------------------------------------------------------------
# inputs: latent, text, timestep


def _data_placeholders(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if n.op == "placeholder" and not is_weight(n) and example(n) is not None]


def _find_latent(graph: fx.Graph) -> fx.Node:
    candidates = [n for n in _data_placeholders(graph) if example(n).dim() >= 3 and example(n).is_floating_point()]
    if not candidates:
        raise UnsupportedGraph("no floating-point input of rank >= 3 (a latent video or image) was found")
    return max(candidates, key=lambda n: example(n).numel())


def _reaches(start: fx.Node, targets, limit: int = 12) -> bool:
    frontier, seen = [start], set()
    for _ in range(limit):
        nxt = []
        for n in frontier:
            for u in n.users:
                if u in seen:
                    continue
                seen.add(u)
                if _matches(u, targets):
                    return True
                nxt.append(u)
        frontier = nxt
    return False


def _find_timestep(graph: fx.Graph) -> fx.Node | None:
    """The timestep input: a small data input that feeds a sinusoidal embedding."""
    candidates = [n for n in _data_placeholders(graph) if example(n).dim() <= 1]
    sinusoidal = [n for n in candidates if _reaches(n, {torch.sin, torch.cos, "sin", "cos"})]
    named = [n for n in sinusoidal if "timestep" in n.name or n.name in ("l_t_", "l_kwargs_t_")]
    if named or sinusoidal:
        return (named or sinusoidal)[0]
    return None


def _find_text(graph: fx.Graph, latent: fx.Node) -> fx.Node | None:
    candidates = [
        n for n in _data_placeholders(graph)
        if n is not latent and example(n).dim() == 3 and example(n).is_floating_point()
    ]
    named = [n for n in candidates if "encoder_hidden_states" in n.name or "y" == n.name.strip("l_").strip("_")]
    return (named or candidates or [None])[0]


# ---------------------------------------------------------------------------
# token layout


def _token_layout(graph: fx.Graph, latent: fx.Node, text: fx.Node | None) -> TokenLayout:
    lat = example(latent)
    batch = int(lat.shape[0])
    text_tokens = int(example(text).shape[1]) if text is not None else None
    if lat.dim() == 3:  # already tokens, [B, S, C] (LTX packs its latents before the model)
        return TokenLayout(batch, int(lat.shape[1]), None, text_tokens)
    for node in graph.nodes:
        if _matches(node, CONV_TARGETS) and _depends_on(node, latent, limit=8):
            out = shape(node)
            if len(out) == 5:  # conv3d: [B, C, F, H, W]
                grid = (int(out[2]), int(out[3]), int(out[4]))
            else:  # conv2d over frames folded into the batch: [B*F, C, H, W]
                grid = (int(out[0]) // batch, int(out[2]), int(out[3]))
            return TokenLayout(batch, grid[0] * grid[1] * grid[2], grid, text_tokens)
    raise UnsupportedGraph("no patch-embedding convolution over the latent input was found")


def _depends_on(node: fx.Node, ancestor: fx.Node, limit: int) -> bool:
    frontier = [node]
    for _ in range(limit):
        nxt = []
        for n in frontier:
            for a in n.all_input_nodes:
                if a is ancestor:
                    return True
                if a.op != "placeholder":
                    nxt.append(a)
        frontier = nxt
    return False


# ---------------------------------------------------------------------------
# blocks


def _block_path_of(node: fx.Node) -> tuple[str, str] | None:
    """The outermost module on the stack that is an item of a module list ("blocks.3")."""
    for path, type_name in module_paths(node):
        if re.search(r"\.\d+$", path):
            return path, type_name
    return None


def _find_blocks(graph: fx.Graph) -> list[tuple[str, str, list[fx.Node]]]:
    nodes = [n for n in graph.nodes if n.op in ("call_function", "call_method", "call_module")]
    attention_blocks = {bp for n in nodes if _matches(n, SDPA_TARGETS) and (bp := _block_path_of(n))}
    if not attention_blocks:
        raise UnsupportedGraph("no attention call inside a repeated module (a list of transformer blocks) was found")
    members: dict[str, list[fx.Node]] = {}
    types: dict[str, str] = {}
    order: list[str] = []
    for n in nodes:
        bp = _block_path_of(n)
        if bp is None or bp not in attention_blocks:
            continue
        path, type_name = bp
        if path not in members:
            members[path], types[path] = [], type_name
            order.append(path)
        members[path].append(n)
    position = {n: i for i, n in enumerate(graph.nodes)}
    spans = []
    for path in order:
        idx = [position[n] for n in members[path]]
        spans.append((min(idx), max(idx), path))
    spans.sort()
    for (s0, e0, p0), (s1, e1, p1) in zip(spans, spans[1:]):
        if s1 <= e0:
            raise UnsupportedGraph(f"the nodes of {p0} and {p1} interleave; blocks must run one after another")
    return [(p, types[p], members[p]) for _, _, p in spans]


# ---------------------------------------------------------------------------
# sites inside a block


def _is_scalar_op(node: fx.Node, targets) -> bool:
    """A multiply or divide by a Python number (e.g. diffusers' rescale_output_factor)."""
    return _matches(node, targets) and any(isinstance(a, (int, float)) for a in node.args)


def _walk_forward_to_residual(start: fx.Node, block_nodes: set, prefer_len: int | None = None):
    """From a site's output, follow pass-through ops and one gate multiply to the residual add.

    Returns (gate, residual add, branch): node names of the gate, the add, and the add's
    operand that carries the site's contribution.

    Where the output is split (joint attention splits text from video), follow the part
    whose sequence length is `prefer_len`.
    """
    node, gate = start, None
    for _ in range(16):
        users = [u for u in node.users if u in block_nodes]
        if not users:
            return gate, None, None
        if len(users) > 1 and prefer_len is not None:
            users = [u for u in users if (shape(u) or (None,))[1:2] == (prefer_len,)] or users
        user = users[0]
        if _matches(user, ADD_TARGETS):
            return gate, user.name, node.name
        if _is_scalar_op(user, MUL_TARGETS | {operator.truediv, "div"}):
            pass
        elif _matches(user, MUL_TARGETS) and gate is None:
            other = [a for a in user.all_input_nodes if a is not node]
            gate = other[0].name if other else None
        elif not _matches(user, PASSTHROUGH | {"split", "chunk", torch.split, torch.chunk}):
            return gate, None, None
        node = user
    return gate, None, None


def _first_linear_after(node: fx.Node, block_nodes: set) -> fx.Node | None:
    frontier = [node]
    for _ in range(8):
        nxt = []
        for n in frontier:
            for u in n.users:
                if u not in block_nodes:
                    continue
                if _matches(u, LINEAR_TARGETS):
                    return u
                nxt.append(u)
        frontier = nxt
    return None


def _find_seq_cat(q: fx.Node, seq_len: int, video_tokens: int, block_nodes: set) -> tuple[int, int] | None:
    """Where the video tokens sit in a joint sequence: look back from Q for the concatenation."""
    frontier, seen = [q], set()
    for _ in range(24):
        nxt = []
        for n in frontier:
            if n in seen or n not in block_nodes:
                continue
            seen.add(n)
            if _matches(n, {torch.cat, torch.concat}):
                parts = n.args[0] if n.args else n.kwargs.get("tensors")
                dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
                sizes = [shape(p)[dim] if shape(p) else None for p in parts]
                if None not in sizes and sum(sizes) == seq_len and video_tokens in sizes:
                    i = sizes.index(video_tokens)
                    return (sum(sizes[:i]), video_tokens)
            nxt.extend(n.all_input_nodes)
        frontier = nxt
    return None


def _transposes_tokens_before(q: fx.Node, block_nodes: set) -> bool:
    """Whether the input of Q's projection was transposed inside the block (frames moved next to batch)."""
    node = q
    for _ in range(16):  # back to the projection (past head split, norms, RoPE)
        if not isinstance(node, fx.Node) or node not in block_nodes:
            return False
        if _matches(node, LINEAR_TARGETS):
            break
        node = node.args[0] if node.args else None
    else:
        return False
    node = node.args[0]
    for _ in range(12):
        if not isinstance(node, fx.Node) or node not in block_nodes:
            return False
        if _matches(node, {"transpose", "permute", torch.transpose, torch.permute}):
            return True
        if not _matches(node, PASSTHROUGH):
            return False
        node = node.args[0]
    return False


def sdpa_qkv(node: fx.Node) -> list:
    """query, key, value of an attention call, whether passed by position or by keyword."""
    return list(node.args[:3]) + [node.kwargs.get(k) for k in ("query", "key", "value")[len(node.args[:3]):]]


def sdpa_mask_and_scale(node: fx.Node) -> tuple:
    """attn_mask and scale of an attention call, whether passed by position or by keyword (None if absent)."""
    args = list(node.args) + [None] * (7 - len(node.args))
    return node.kwargs.get("attn_mask", args[3]), node.kwargs.get("scale", args[6])


def q_projection_input(sdpa: fx.Node, within: set | None = None) -> fx.Node | None:
    """The value entering the Q projection of an attention call: back from Q through head split,
    norms and RoPE to the linear, staying inside `within` when given."""
    node = sdpa_qkv(sdpa)[0]
    for _ in range(16):
        if not isinstance(node, fx.Node) or (within is not None and node not in within):
            return None
        if _matches(node, LINEAR_TARGETS):
            return node.args[0] if isinstance(node.args[0], fx.Node) else None
        node = node.args[0] if node.args else None
    return None


def _attention_site(node: fx.Node, layout: TokenLayout, block_nodes: set) -> AttentionSite:
    q, k, _ = sdpa_qkv(node)
    qs, ks = shape(q), shape(k)
    if qs is None or ks is None or len(qs) != 4:
        raise UnsupportedGraph(f"attention call {node.name} has inputs of unexpected rank")
    batch, heads, q_len, head_dim = (int(x) for x in qs)
    kv_len = int(ks[2])
    n_v, grid = layout.video_tokens, layout.grid
    frames = grid[0] if grid else 1
    spatial = grid[1] * grid[2] if grid else None
    kind, axis, span = "other", "full", None
    is_spatial = grid and frames > 1 and q_len == spatial and batch == layout.batch * frames
    is_temporal = grid and frames > 1 and q_len == frames and batch == layout.batch * spatial
    if is_spatial and is_temporal:  # F == H*W: shapes cannot tell; temporal attention transposes tokens
        is_spatial = not _transposes_tokens_before(q, block_nodes)
        is_temporal = not is_spatial
    if q_len == n_v:
        kind, span = ("self" if kv_len == q_len else "cross"), (0, n_v)
    elif is_spatial:
        kind, axis, span = ("self" if kv_len == q_len else "cross"), "spatial", (0, q_len)
    elif is_temporal:
        kind, axis, span = "self", "temporal", (0, q_len)
    elif q_len > n_v and kv_len == q_len:
        kind, span = "joint", _find_seq_cat(q, q_len, n_v, block_nodes)
    out = _first_linear_after(node, block_nodes)
    gate, residual, branch = (_walk_forward_to_residual(out, block_nodes, span[1] if span else None)
                              if out is not None else (None, None, None))
    return AttentionSite(
        name=module_path(node) or node.name, kind=kind, axis=axis, sdpa=node.name, q_len=q_len, kv_len=kv_len,
        heads=heads, head_dim=head_dim, video_span=span, output=out.name if out is not None else None,
        gate=gate, residual_add=residual, branch=branch,
    )


def _mlp_sites(block_nodes: list[fx.Node], attention_outputs: set, attention_modules: list[str]) -> list[MLPSite]:
    node_set = set(block_nodes)
    sites = []
    for down in block_nodes:
        if not _matches(down, LINEAR_TARGETS) or down.name in attention_outputs:
            continue
        path = module_path(down) or ""
        if any(path == m or path.startswith(m + ".") for m in attention_modules):
            continue
        out_features = shape(down)[-1]
        # Walk back from the down projection through activations to the up projection.
        node, saw_activation = down.args[0], False
        for _ in range(8):
            if not isinstance(node, fx.Node) or node not in node_set:
                break
            if _matches(node, LINEAR_TARGETS):
                up_in = shape(node.args[0])
                if saw_activation and up_in and up_in[-1] == out_features and shape(node)[-1] >= out_features:
                    gate, residual, branch = _walk_forward_to_residual(down, node_set)
                    common = _common_prefix(module_path(node) or "", path)
                    sites.append(MLPSite(common or path, node.args[0].name, down.name, int(shape(node)[-1]), gate,
                                         residual, branch))
                break
            if _matches(node, ACTIVATIONS) or _matches(node, MUL_TARGETS):
                saw_activation = True
            elif not _matches(node, PASSTHROUGH | {"chunk"}):
                break
            node = node.args[0] if node.args else None
    return sites


def _common_prefix(a: str, b: str) -> str:
    parts = []
    for x, y in zip(a.split("."), b.split(".")):
        if x != y:
            break
        parts.append(x)
    return ".".join(parts)


# ---------------------------------------------------------------------------


def analyze(gm: fx.GraphModule) -> DiTStructure:
    """The DiT structure of a Dynamo graph; raises UnsupportedGraph when there is none."""
    graph = gm.graph
    if any(isinstance(n.meta.get("example_value"), torch.SymInt) for n in graph.nodes if n.op == "placeholder"):
        raise UnsupportedGraph("the graph has dynamic shapes (symbolic sizes); ditopt handles static shapes only")
    latent = _find_latent(graph)
    text = _find_text(graph, latent)
    layout = _token_layout(graph, latent, text)
    timestep = _find_timestep(graph)
    found = _find_blocks(graph)
    blocks = []
    for path, type_name, nodes in found:
        node_set = set(nodes)
        attention = [_attention_site(n, layout, node_set) for n in nodes if _matches(n, SDPA_TARGETS)]
        att_modules = sorted({a.name for a in attention})
        mlps = _mlp_sites(nodes, {a.output for a in attention if a.output}, att_modules)
        blocks.append(Block(len(blocks), path, type_name, nodes[0].name, nodes[-1].name, len(nodes), attention, mlps))
    blocks, excluded = _drop_partial_blocks(blocks)
    video_blocks = [b for b in blocks if any(a.kind != "other" for a in b.attention)]
    excluded += [{"path": b.path, "reason": "attends over no video tokens (a text refiner?)"}
                 for b in blocks if b not in video_blocks]
    blocks = video_blocks
    if not blocks:
        raise UnsupportedGraph("no complete transformer block is in this graph (graph breaks cut them)")
    for i, b in enumerate(blocks):
        b.index = i
    return DiTStructure(blocks, layout, latent.name, timestep.name if timestep is not None else None, excluded)


def _drop_partial_blocks(blocks: list[Block]) -> tuple[list[Block], list[dict]]:
    """Blocks that a graph break cut differ from their siblings of the same type: leave those alone."""
    by_type: dict[str, Counter] = {}
    for b in blocks:
        by_type.setdefault(b.module_type, Counter())[(b.signature, b.num_nodes)] += 1
    kept, excluded = [], []
    for b in blocks:
        counts = by_type[b.module_type]
        common, n = counts.most_common(1)[0]
        if n > 1 and (b.signature, b.num_nodes) != common and counts[(b.signature, b.num_nodes)] == 1:
            excluded.append({"path": b.path, "reason": f"differs from its {n} sibling blocks of the same type "
                             "(the last block of a stack, or cut by a graph break)"})
        else:
            kept.append(b)
    return kept, excluded
