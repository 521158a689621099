"""Find a diffusion transformer's structure in a Dynamo FX graph.

Everything is read from the graph itself: module paths from
`node.meta["nn_module_stack"]`, shapes from `node.meta["example_value"]`.
No model class name is consulted, so a plain-PyTorch model is analysed the
same way as a diffusers one.  A graph that does not look like a DiT raises
`UnsupportedGraph` with the reason; the backend then falls back to Inductor.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field, fields, is_dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

from .patterns import (ACTIVATIONS, ADD_TARGETS, CATS, CONV_TARGETS, DIV_TARGETS, LINEAR_TARGETS, MATMUL_TARGETS,
                       MUL_TARGETS,
                       PASSTHROUGH, SDPA_TARGETS, SIN_COS, SPLITS, TRANSPOSES, call_args, chain_back, dependents,
                       first_reached, inputs, is_call, op_name, sdpa_qkv, users, walk)


_SOFTMAX = {"softmax", torch.softmax, torch.nn.functional.softmax}


class UnsupportedGraph(Exception):
    """The graph has no DiT structure ditopt can act on; the message says why."""


class OneBlockGraph(UnsupportedGraph):
    """The graph is one transformer block compiled on its own (passes/block_chain.py chains such graphs)."""


@dataclass
class AttentionSite:
    name: str  # module path, e.g. "blocks.0.attn1"
    kind: str  # "self", "cross", "joint", "linear" (a linear attention, found by its K^T V product) or "other"
    axis: str  # "full", "spatial" or "temporal" (which video axes the sequence spans)
    sdpa: fx.Node  # the attention call (for a linear attention, its K^T V product)
    q_len: int
    kv_len: int
    heads: int
    head_dim: int
    video_span: tuple[int, int] | None  # (start, length) of video tokens in the sequence
    output: fx.Node | None  # the out-projection, before any gate
    gate: fx.Node | None  # the node multiplied onto the output before the residual add
    residual_add: fx.Node | None
    branch: fx.Node | None = None  # the operand the site contributes to the residual add (gated output)
    form: str = "sdpa"  # how the model wrote it: "sdpa", "hand-written", a library op, "sdpa_block_mask", "linear"


def attention_form(node: fx.Node) -> str:
    """How the model wrote the attention an SDPA node computes (the normalisation passes record it)."""
    return node.meta.get("ditopt_form", "sdpa")


@dataclass
class MLPSite:
    name: str
    input: fx.Node  # feeds the first linear
    output: fx.Node  # the second linear, before any gate
    hidden: int
    gate: fx.Node | None
    residual_add: fx.Node | None
    branch: fx.Node | None = None


@dataclass
class Block:
    index: int
    path: str  # e.g. "transformer_blocks.3"
    module_type: str
    first_node: fx.Node
    last_node: fx.Node
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
    patchify: str = "unknown"  # how the latent became tokens, in words (`ditopt inspect` prints it)


@dataclass
class DiTStructure:
    blocks: list[Block]
    layout: TokenLayout
    latent_input: fx.Node
    timestep_input: fx.Node | None
    excluded_blocks: list[dict] = field(default_factory=list)  # blocks found but left unchanged, with why
    attention_nodes: list[dict] = field(default_factory=list)  # every attention in the graph: where, kind, form

    def to_json(self) -> dict:
        """The structure as JSON-able data, nodes by name."""
        return _jsonable(self)

    def describe(self) -> str:
        """A short human-readable summary, as `ditopt inspect` prints it."""
        lay = self.layout
        grid = "x".join(map(str, lay.grid)) if lay.grid else "unknown"
        lines = [
            f"video tokens: {lay.video_tokens} (grid F x H x W = {grid}), text tokens: {lay.text_tokens}, batch {lay.batch}",
            f"patchify: {lay.patchify}",
            f"timestep input: {self.timestep_input}, latent input: {self.latent_input}",
            f"blocks: {len(self.blocks)}",
        ]
        for b in self.blocks:
            sites = [f"{a.kind}-attn[{a.axis}]({a.q_len}x{a.kv_len}, {a.heads}h, {a.form})" for a in b.attention]
            sites += [f"mlp({m.hidden})" for m in b.mlps]
            gated = sum(1 for s in [*b.attention, *b.mlps] if s.gate)
            lines.append(f"  [{b.index}] {b.path} ({b.module_type}): {', '.join(sites)}; {gated} gated residual adds")
        for ex in self.excluded_blocks:
            lines.append(f"  excluded {ex['path']}: {ex['reason']}")
        return "\n".join(lines)


def _jsonable(value):
    if isinstance(value, fx.Node):
        return value.name
    if is_dataclass(value):
        return {f.name: _jsonable(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


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


_matches = is_call


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes if example(a) is not None]


# ---------------------------------------------------------------------------
# inputs: latent, text, timestep


def _data_placeholders(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if n.op == "placeholder" and not is_weight(n) and example(n) is not None]


def _find_latent(graph: fx.Graph) -> fx.Node:
    """The latent input: a denoiser returns a tensor of its latent's shape, so a video or image input (rank >= 4)
    whose shape an output has; else one the graph patchifies (the part of a forward before a graph break hands
    tokens on, and may hand its text on unchanged in shape); else an input whose shape an output has; else a
    video or image input before a sequence (rank 3, as text is); else the largest."""
    candidates = [n for n in _data_placeholders(graph) if example(n).dim() >= 3 and example(n).is_floating_point()]
    if not candidates:
        raise UnsupportedGraph("no floating-point input of rank >= 3 (a latent video or image) was found")
    outputs = {tuple(v.shape) for v in _output_examples(graph)}
    echoed = [n for n in candidates if tuple(example(n).shape) in outputs]
    spatial = [n for n in candidates if example(n).dim() >= 4]
    echoed_spatial = [n for n in echoed if n in spatial]
    patchified = [n for n in spatial if _patchified(graph, n)] if not echoed_spatial else []
    return max(echoed_spatial or patchified or echoed or spatial or candidates, key=lambda n: example(n).numel())


def _patchified(graph: fx.Graph, latent: fx.Node) -> bool:
    """Whether a convolution, or reshapes and permutes into a Linear, make tokens of `latent`."""
    convs = [n for n in graph.nodes if _matches(n, CONV_TARGETS)]
    return any(latent in set(walk(n, inputs)) for n in convs) or _linear_patchify(latent) is not None


def _output_examples(graph: fx.Graph) -> list[torch.Tensor]:
    out = next((n for n in graph.nodes if n.op == "output"), None)
    return [v for n in (out.all_input_nodes if out is not None else []) if (v := example(n)) is not None]


def find_timestep(graph: fx.Graph) -> fx.Node | None:
    """The timestep input: a data input that feeds a sinusoidal embedding.  Per sample [B] (or a scalar):
    found among the values of rank <= 2, where an embedding of one number per sample lives.  Per token
    [B, N] (Wan 2.2 TI2V's expand_timesteps), tried only when no such input exists: it must reach the
    sin/cos through elementwise and shape ops alone (t[..., None] * freqs), which a modulation or other
    embedding an earlier graph handed over does not."""
    small = {n for n in graph.nodes if (v := example(n)) is not None and v.dim() <= 2}
    placeholders = _data_placeholders(graph)
    per_sample = [n for n in placeholders if example(n).dim() <= 1
                  and first_reached(n, users, SIN_COS, within=small) is not None]
    elementwise = {n for n in graph.nodes if n.op == "placeholder" or is_call(n, _ELEMENTWISE)}
    batches = {int(example(n).shape[0]) for n in placeholders if example(n).dim() >= 3}
    per_token = [n for n in placeholders if example(n).dim() == 2 and not _module_state(n)
                 and int(example(n).shape[0]) in batches
                 and first_reached(n, users, SIN_COS, within=elementwise) is not None]
    for found in (per_sample, per_token):
        named = [n for n in found if "timestep" in n.name or n.name in ("l_t_", "l_kwargs_t_")]
        if named or found:
            return (named or found)[0]
    return None


def _module_state(node: fx.Node) -> bool:
    """A placeholder Dynamo made for a module attribute (a cached RoPE table), not for an argument of the call."""
    return node.name.startswith("l_self_") or "_self_" in node.name


_ELEMENTWISE = PASSTHROUGH | MUL_TARGETS | DIV_TARGETS | SIN_COS | {"expand", "float", "to", "type_as", torch.outer}


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
    """How the latent becomes video tokens, read from what the graph does with it: a packed sequence, a
    patch-embedding convolution, or reshapes/permutes into a Linear (channels first or last)."""
    lat = example(latent)
    batch = int(lat.shape[0])
    text_tokens = int(example(text).shape[1]) if text is not None else None
    if lat.dim() == 3:  # already tokens, [B, S, C] (LTX and Flux pack their latents before the model)
        return TokenLayout(batch, int(lat.shape[1]), None, text_tokens, "an already packed sequence [B, S, C]")
    for node in graph.nodes:
        if _matches(node, CONV_TARGETS) and latent in set(walk(node, inputs)):
            out = shape(node)
            if len(out) == 5:  # conv3d: [B, C, F, H, W]
                grid, how = (int(out[2]), int(out[3]), int(out[4])), "a Conv3d patch embedding"
            else:  # conv2d over frames folded into the batch: [B*F, C, H, W]
                grid, how = (int(out[0]) // batch, int(out[2]), int(out[3])), "a Conv2d patch embedding per frame"
            return TokenLayout(batch, grid[0] * grid[1] * grid[2], grid, text_tokens, how)
    found = _linear_patchify(latent)
    if found is not None:
        grid, how = found
        return TokenLayout(batch, grid[0] * grid[1] * grid[2], grid, text_tokens, how)
    raise UnsupportedGraph(f"no patch embedding of the latent input {latent.name} {tuple(lat.shape)} was found: "
                           "neither a convolution over it nor a Linear after reshapes and permutes of it")


_SHAPE_OPS = PASSTHROUGH | {"pad", F.pad}


def _linear_patchify(latent: fx.Node) -> tuple[tuple[int, int, int], str] | None:
    """(grid, description) where the latent reaches a Linear through shape ops only (patchify by reshape and
    permute, as Cosmos, Z-Image and much research code do; or a per-position Linear on a channels-last latent)."""
    graph = latent.graph
    reshaped = {n for n in graph.nodes if _matches(n, _SHAPE_OPS) and shape(n) is not None}
    linear = first_reached(latent, users, LINEAR_TARGETS,
                           within=reshaped | {n for n in graph.nodes if _matches(n, LINEAR_TARGETS)})
    if linear is None or linear.args[0] not in reshaped | {latent}:
        return None
    views = [tuple(int(d) for d in shape(n)) for n in walk(latent, users, within=reshaped) if n is not latent]
    lat, out = tuple(int(d) for d in shape(latent)), shape(linear)
    in_features = int(shape(linear.args[0])[-1])
    tokens = 1
    for d in out[1:-1]:
        tokens *= int(d)
    best = None
    for channel_axis, where in ((1, "channels first"), (len(lat) - 1, "channels last")):
        channels = lat[channel_axis]
        dims = [d for i, d in enumerate(lat) if i not in (0, channel_axis)]
        dims = [1] * (3 - len(dims)) + dims  # an image is one frame
        if len(dims) != 3 or in_features % channels:
            continue
        for patch in _patch_sizes(dims, in_features // channels):
            grid = tuple(d // p for d, p in zip(dims, patch))
            if grid[0] * grid[1] * grid[2] != tokens:
                continue
            # the reshapes name the split (H/p, p) when there is one; else square patches, then the smallest in time
            named = any(all(g in v for g in grid if g > 1) and len(v) > len(lat) for v in views)
            rank = (not named, patch[1] != patch[2], patch[0])
            if best is None or rank < best[0]:
                how = (f"a Linear over {'x'.join(map(str, patch))} patches ({where}) after reshapes of the latent"
                       if patch != (1, 1, 1) else f"a Linear per latent position ({where})")
                best = (rank, grid, how)
    return (best[1], best[2]) if best is not None else None


def _patch_sizes(dims: list[int], volume: int):
    """Every (pt, ph, pw) dividing `dims` whose product is `volume`."""
    for pt in (p for p in range(1, dims[0] + 1) if dims[0] % p == 0 and volume % p == 0):
        for ph in (p for p in range(1, dims[1] + 1) if dims[1] % p == 0 and (volume // pt) % p == 0):
            pw = volume // (pt * ph)
            if dims[2] % pw == 0:
                yield (pt, ph, pw)


# ---------------------------------------------------------------------------
# blocks


def _block_path_of(node: fx.Node) -> tuple[str, str] | None:
    """The outermost module on the stack that is an item of a module list ("blocks.3")."""
    for path, type_name in module_paths(node):
        if re.search(r"\.\d+$", path):
            return path, type_name
    return None


def _token_counts(layout: TokenLayout) -> set[int]:
    """Sequence lengths an attention over video tokens can have: all of them, one frame, one token column."""
    counts = {layout.video_tokens}
    if layout.grid is not None:
        counts |= {layout.grid[1] * layout.grid[2], layout.grid[0]} - {1}
    return counts


def is_linear_attention(node: fx.Node, tokens: set[int]) -> bool:
    """The K^T V product of a linear attention: a matmul that contracts the token axis of two per-token
    operands, a [.., D, N] @ b [.., N, E] -> [.., D, E] with N a video sequence length larger than D and E."""
    if not _matches(node, MATMUL_TARGETS) or len(node.args) < 2:
        return False
    a, b, out = shape(node.args[0]), shape(node.args[1]), shape(node)
    if a is None or b is None or out is None or len(a) < 2 or len(b) < 2:
        return False
    n = a[-1]
    return n == b[-2] and n in tokens and n > max(a[-2], b[-1])


def _attention_nodes(nodes: list[fx.Node], tokens: set[int]) -> list[fx.Node]:
    return [n for n in nodes if _matches(n, SDPA_TARGETS) or is_linear_attention(n, tokens)]


_PARALLEL_HOOKS = ("diffusers/hooks/context_parallel.py",)


def is_parallel_plumbing(node: fx.Node) -> bool:
    """A node that a context-parallel wrapper traced around a module, not the module itself: diffusers'
    split of a block's input into this rank's shard (its pre-forward hook runs inside the block's call)."""
    trace = node.meta.get("stack_trace") or ""
    frames = [line for line in trace.splitlines() if line.strip().startswith("File ")]
    return bool(frames) and any(h in frames[-1] for h in _PARALLEL_HOOKS)


def data_dependent(graph: fx.Graph) -> set[fx.Node]:
    """The nodes whose value depends on a data input (not only on weights and constants)."""
    return dependents(graph, lambda n: n.op == "placeholder" and not is_weight(n))


def _find_blocks(graph: fx.Graph, layout: TokenLayout) -> list[tuple[str, str, list[fx.Node]]]:
    # What the hoisting pass moved to the graph's head (a RoPE table the first block computes and caches for
    # its siblings) belongs to no block.
    nodes = [n for n in graph.nodes if n.op in ("call_function", "call_method", "call_module")
             and not n.meta.get("ditopt_hoisted")]
    attention_blocks = {bp for n in _attention_nodes(nodes, _token_counts(layout)) if (bp := _block_path_of(n))}
    if not attention_blocks and _attention_nodes(nodes, _token_counts(layout)):
        raise OneBlockGraph(
            "the graph holds attention but no list of transformer blocks: it is one block compiled on its own "
            "(diffusers' compile_repeated_blocks, regional compilation, or a graph break before the blocks)")
    if not attention_blocks:
        softmax = [n for n in nodes if n.target in ("softmax", torch.softmax, torch.nn.functional.softmax)]
        if softmax:
            raise UnsupportedGraph(
                f"no attention call inside a repeated module was found; {softmax[0].name} "
                f"(in {module_path(softmax[0]) or 'the model'}) is a softmax of a hand-written attention that was not "
                "rewritten to scaled_dot_product_attention (report.json's normalize_attention section says why)")
        raise UnsupportedGraph("no attention call inside a repeated module (a list of transformer blocks) was found")
    members: dict[str, list[fx.Node]] = {}
    types: dict[str, str] = {}
    order: list[str] = []
    for n in nodes:
        bp = _block_path_of(n)
        if bp is None or bp not in attention_blocks or is_parallel_plumbing(n):
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

    Returns (gate, residual add, branch): the gate, the add, and the add's
    operand that carries the site's contribution.

    Where the output is split (joint attention splits text from video), follow the part
    whose sequence length is `prefer_len`.
    """
    node, gate = start, None
    while True:  # one path forward through the block: it ends at an add or at an op that is none of these
        after = [u for u in node.users if u in block_nodes]
        if not after:
            return gate, None, None
        if len(after) > 1 and prefer_len is not None:
            after = [u for u in after if (shape(u) or (None,))[1:2] == (prefer_len,)] or after
        user = after[0]
        if _matches(user, ADD_TARGETS):
            return gate, user, node
        if _is_scalar_op(user, MUL_TARGETS | DIV_TARGETS):
            pass
        elif _matches(user, MUL_TARGETS) and gate is None:
            other = [a for a in user.all_input_nodes if a is not node]
            gate = other[0] if other else None
        elif not _matches(user, PASSTHROUGH | SPLITS):
            return gate, None, None
        node = user


def _first_linear_after(node: fx.Node, block_nodes: set) -> fx.Node | None:
    return first_reached(node, users, LINEAR_TARGETS, within=block_nodes)


def _find_seq_cat(q: fx.Node, seq_len: int, video_tokens: int, block_nodes: set) -> tuple[int, int] | None:
    """Where the video tokens sit in a joint sequence: look back from Q for the concatenation."""
    for n in walk(q, inputs, within=block_nodes):
        if _matches(n, CATS):
            a = call_args(n, "cat")
            sizes = [shape(p)[a["dim"]] if shape(p) else None for p in a["tensors"]]
            if None not in sizes and sum(sizes) == seq_len and video_tokens in sizes:
                i = sizes.index(video_tokens)
                return (sum(sizes[:i]), video_tokens)
    return None

def _transposes_tokens_before(q: fx.Node, block_nodes: set) -> bool:
    """Whether the input of Q's projection was transposed inside the block (frames moved next to batch)."""
    linear = chain_back(q, LINEAR_TARGETS, None, within=block_nodes)  # past head split, norms, RoPE
    return linear is not None and chain_back(linear.args[0], TRANSPOSES, PASSTHROUGH, within=block_nodes) is not None

def q_projection_input(sdpa: fx.Node, within: set | None = None) -> fx.Node | None:
    """The value entering the Q projection of an attention call: back from Q through head split,
    norms and RoPE to the linear, staying inside `within` when given."""
    linear = chain_back(sdpa_qkv(sdpa)[0], LINEAR_TARGETS, None, within=within)
    return linear.args[0] if linear is not None and isinstance(linear.args[0], fx.Node) else None


def _linear_attention_site(node: fx.Node, layout: TokenLayout, block_nodes: set) -> AttentionSite:
    """A linear attention, found by its K^T V product; AdaCache probes it, the other methods decline it."""
    k_t = shape(node.args[0])
    n, head_dim = int(k_t[-1]), int(k_t[-2])
    heads = int(k_t[1]) if len(k_t) == 4 else 1
    grid = layout.grid
    axis = "spatial" if grid and n == grid[1] * grid[2] and n != layout.video_tokens else "full"
    out = _first_linear_after(node, block_nodes)
    gate, residual, branch = (_walk_forward_to_residual(out, block_nodes) if out is not None else (None, None, None))
    return AttentionSite(name=module_path(node) or node.name, kind="linear", axis=axis, sdpa=node, q_len=n,
                         kv_len=n, heads=heads, head_dim=head_dim, video_span=(0, n), output=out, gate=gate,
                         residual_add=residual, branch=branch, form="linear")


def _attention_site(node: fx.Node, layout: TokenLayout, block_nodes: set) -> AttentionSite:
    if not _matches(node, SDPA_TARGETS):
        return _linear_attention_site(node, layout, block_nodes)
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
        name=module_path(node) or node.name, kind=kind, axis=axis, sdpa=node, q_len=q_len, kv_len=kv_len,
        heads=heads, head_dim=head_dim, video_span=span, output=out,
        gate=gate, residual_add=residual, branch=branch, form=attention_form(node),
    )


def _mlp_sites(block_nodes: list[fx.Node], attention_outputs: set, attention_modules: list[str]) -> list[MLPSite]:
    node_set = set(block_nodes)
    sites = []
    for down in block_nodes:
        if not _matches(down, LINEAR_TARGETS) or down in attention_outputs:
            continue
        path = module_path(down) or ""
        if any(path == m or path.startswith(m + ".") for m in attention_modules):
            continue
        out_features = shape(down)[-1]
        # Walk back from the down projection through activations to the up projection.
        node, saw_activation, seen = down.args[0], False, set()
        while isinstance(node, fx.Node) and node in node_set and node not in seen:
            seen.add(node)
            if _matches(node, LINEAR_TARGETS):
                up_in = shape(node.args[0])
                if saw_activation and up_in and up_in[-1] == out_features and shape(node)[-1] >= out_features:
                    gate, residual, branch = _walk_forward_to_residual(down, node_set)
                    common = _common_prefix(module_path(node) or "", path)
                    sites.append(MLPSite(common or path, node.args[0], down, int(shape(node)[-1]), gate,
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
    unknown = _unknown_attention_op(graph)
    if unknown is not None and not any(_matches(n, SDPA_TARGETS) for n in graph.nodes):
        raise UnsupportedGraph(unknown)
    if not any(_matches(n, SDPA_TARGETS | MATMUL_TARGETS | _SOFTMAX) for n in graph.nodes):
        raise UnsupportedGraph("the graph holds no attention (no attention call, softmax or matmul): a part of the "
                               "forward that graph breaks cut off, or not a transformer")
    latent = _find_latent(graph)
    text = _find_text(graph, latent)
    layout = _token_layout(graph, latent, text)
    timestep = find_timestep(graph)
    found = _find_blocks(graph, layout)
    tokens = _token_counts(layout)
    data = data_dependent(graph)
    blocks = []
    for path, type_name, nodes in found:
        node_set = set(nodes)
        attention = [_attention_site(n, layout, node_set) for n in _attention_nodes(nodes, tokens)]
        att_modules = sorted({a.name for a in attention})
        mlps = _mlp_sites(nodes, {a.output for a in attention if a.output}, att_modules)
        # Siblings are compared by their computation on data: ops on weights alone differ between otherwise equal
        # blocks (the first temporal block slices a cached RoPE table its siblings read as it is).
        size = sum(n in data for n in nodes)
        blocks.append(Block(len(blocks), path, type_name, nodes[0], nodes[-1], size, attention, mlps))
    blocks, excluded = _drop_partial_blocks(blocks)
    video_blocks = [b for b in blocks if any(a.kind != "other" for a in b.attention)]
    excluded += [{"path": b.path, "reason": "attends over no video tokens (a text refiner?)"}
                 for b in blocks if b not in video_blocks]
    blocks = video_blocks
    if not blocks:
        raise UnsupportedGraph("no complete transformer block is in this graph (graph breaks cut them)")
    for i, b in enumerate(blocks):
        b.index = i
    return DiTStructure(blocks, layout, latent, timestep, excluded, _attention_listing(graph, blocks, excluded, tokens))


def _unknown_attention_op(graph: fx.Graph) -> str | None:
    """The reason for a graph whose attention runs through a library op no normalisation rule knows."""
    for n in graph.nodes:
        name = op_name(n) if n.op == "call_function" else None
        if name is None or name.startswith("aten::") or not ("attn" in name or "attention" in name):
            continue
        why = n.meta.get("ditopt_declined")  # a normalisation rule looked at it and said why it left it
        return (f"the attention {n.name} (in {module_path(n) or 'the model'}) calls {name}, "
                + (f"which ditopt leaves as it is: {why}" if why else
                   "an attention op ditopt has no rule for (packed_attention.FORMS lists the ones it rewrites to SDPA)"))
    return None


def _attention_listing(graph: fx.Graph, blocks: list[Block], excluded: list[dict], tokens: set[int]) -> list[dict]:
    """Every attention node of the graph: the block and kind it was found as, or why no method acts on it."""
    sites = {a.sdpa: (b, a) for b in blocks for a in b.attention}
    why_excluded = {e["path"]: e["reason"] for e in excluded}
    listing = []
    for n in _attention_nodes([n for n in graph.nodes if n.op in ("call_function", "call_method")], tokens):
        entry = {"node": n.name, "module": module_path(n),
                 "form": attention_form(n) if _matches(n, SDPA_TARGETS) else "linear"}
        if n in sites:
            b, a = sites[n]
            entry.update(block=b.path, kind=a.kind, axis=a.axis)
        else:
            path = (_block_path_of(n) or (None,))[0]
            entry["left_alone"] = why_excluded.get(path, "outside every transformer block")
        listing.append(entry)
    return listing


def _drop_partial_blocks(blocks: list[Block]) -> tuple[list[Block], list[dict]]:
    """Blocks that a graph break cut differ from their siblings (the items of the same module list, of the
    same type): leave those alone.  Spatial and temporal lists that interleave are sibling groups each."""
    siblings: dict[tuple[str, str], Counter] = {}
    for b in blocks:
        siblings.setdefault(_sibling_group(b), Counter())[(b.signature, b.num_nodes)] += 1
    kept, excluded = [], []
    for b in blocks:
        counts = siblings[_sibling_group(b)]
        common, n = counts.most_common(1)[0]
        if n > 1 and (b.signature, b.num_nodes) != common and counts[(b.signature, b.num_nodes)] == 1:
            excluded.append({"path": b.path, "reason": f"differs from its {n} sibling blocks in "
                             f"{_sibling_group(b)[0]} (the last block of a stack, or cut by a graph break)"})
        else:
            kept.append(b)
    return kept, excluded


def _sibling_group(block: Block) -> tuple[str, str]:
    return block.path.rsplit(".", 1)[0], block.module_type
