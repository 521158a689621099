"""Split a rewritten graph into regions and compile each distinct region once.

Regions are contiguous slices of the graph in node order (so the split can
never create a cycle): the prologue, one region per transformer block, glue
between blocks, and the epilogue.  Weights are graph inputs, so blocks that
do the same computation on inputs of the same metadata have the same
canonical key and share one compiled variant: an N-block model compiles O(1)
block variants, not O(N).
"""

from __future__ import annotations

import operator
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from .analysis import DiTStructure
from .method import Tag, tag_of


@dataclass
class Region:
    index: int
    kind: str  # "prologue", "block", "own" (a method's hook runs it), "glue" or "epilogue"
    block: int | None  # index into DiTStructure.blocks for block regions
    gm: fx.GraphModule
    inputs: list[fx.Node]  # the values it reads, as nodes of the parent graph
    outputs: list[fx.Node]  # the values it defines that are read later (or that a hook reads)
    owner: Tag | None = None  # for "own" regions: the tag of the method node it holds
    input_slots: list[int] = field(default_factory=list)
    output_slots: list[int] = field(default_factory=list)
    free_after: list[int] = field(default_factory=list)  # slots whose last reader is this region
    nodes: list[fx.Node] = field(default_factory=list)  # its nodes in the parent graph
    last: int = -1  # a fused region stands for regions index..last; any other, for itself

    def __post_init__(self):
        if self.last < 0:
            self.last = self.index

    @property
    def name(self) -> str:
        if self.kind == "fused":
            return f"regions{self.index}_to_{self.last}_fused"
        return f"region{self.index}_{self.kind}" + (f"{self.block}" if self.block is not None else "")


@dataclass
class Lowered:
    """A rewritten graph cut into regions: what the runtime runs and what method hooks are built from."""

    regions: list[Region]
    template: Any  # the output's structure, with slot numbers for values
    slot: dict[fx.Node, int]  # every value by node of the parent graph
    tags: list[tuple[fx.Node, Tag]]  # every node a method tagged (markers too, though no longer in the graph)
    structure: DiTStructure
    gm: fx.GraphModule | None = None  # the parent graph

    def region_of(self, node: fx.Node) -> int:
        """The region that defines a value."""
        s = self.slot[node]
        return next(r.index for r in self.regions if s in r.output_slots)

    def tagged(self, method: str, role: str | None = None) -> list[tuple[fx.Node, Tag]]:
        return [(n, t) for n, t in self.tags if t.method == method and (role is None or t.role == role)]


def lower(gm: fx.GraphModule, structure: DiTStructure) -> Lowered:
    """Cut a rewritten graph into regions, after replacing every marker node by its input."""
    tags = [(n, t) for n in gm.graph.nodes if (t := tag_of(n)) is not None]
    for node, t in tags:
        if t.marker:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.recompile()
    regions, template, slot = split_regions(gm, structure)
    return Lowered(regions, template, slot, tags, structure, gm)


def fuse_regions(lowered: Lowered, cuts: set[int], unfusable: set[int], mode: str = "block") -> dict[int, Region]:
    """Merge each run of neighbouring regions that no hook runs itself (`unfusable`) and that no hook needs
    to stop between (`cuts`: i means "stop before region i") into one region, compiled as one graph: fewer
    calls, and Inductor fuses across the old boundaries.  Returns first index -> merged region, for runs of
    two or more.  A value made and read only inside a run is no longer a region output.

    mode "block": a run holds regions of one transformer block at most (with the glue around it), so that
    identical blocks still share one compiled variant and compile time stays independent of depth; "all":
    runs as long as the hooks allow (one graph per run: compile time grows with depth); "none"."""
    runs: list[list[Region]] = []
    for r in lowered.regions if mode != "none" else ():
        if r.index in unfusable:
            continue
        run = runs[-1] if runs else None
        other_block = (mode == "block" and r.block is not None
                       and any(m.block not in (None, r.block) for m in run or ()))
        if run and run[-1].index == r.index - 1 and r.index not in cuts and not other_block:
            run.append(r)
        else:
            runs.append([r])
    fused = {}
    for run in (run for run in runs if len(run) > 1):
        first, last = run[0], run[-1]
        merged = _make_region(lowered.gm, first.index, "fused", None, [n for r in run for n in r.nodes], None)
        merged.last = last.index
        merged.input_slots = [lowered.slot[n] for n in merged.inputs]
        merged.output_slots = [lowered.slot[n] for n in merged.outputs]
        merged.free_after = sorted({s for r in run for s in r.free_after})
        fused[first.index] = merged
    return fused


def split_regions(gm: fx.GraphModule, structure: DiTStructure) -> tuple[list[Region], Any, dict[fx.Node, int]]:
    """Cut gm into regions. Also returns the output template (slot numbers in the output's structure)
    and the slot of every value."""
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    block_at: dict[fx.Node, int] = {}
    for b in structure.blocks:
        first, last = order[b.first_node], order[b.last_node]
        for n in graph.nodes:
            if first <= order[n] <= last:
                block_at[n] = b.index

    body = [n for n in graph.nodes if n.op not in ("placeholder", "output")]
    # A segment is (block, own-region key, nodes): nodes a method asks to run itself form regions of their own.
    segments: list[tuple[int | None, str | None, list[fx.Node]]] = []
    cut = False
    for n in body:
        t = tag_of(n)
        blk, own = block_at.get(n), _own_key(n)
        if not segments or segments[-1][:2] != (blk, own) or cut:
            segments.append((blk, own, []))
        segments[-1][2].append(n)
        cut = t is not None and t.split_after  # a hook decides on this value: end the region

    output_node = next(n for n in graph.nodes if n.op == "output")
    regions = []
    for i, (blk, own, nodes) in enumerate(segments):
        if own is not None:
            kind = "own"
        elif blk is not None:
            kind = "block"
        elif i == 0:
            kind = "prologue"
        elif i == len(segments) - 1:
            kind = "epilogue"
        else:
            kind = "glue"
        owner = next((tag_of(n) for n in nodes if tag_of(n) is not None), None) if own is not None else None
        regions.append(_make_region(gm, i, kind, blk, nodes, owner))

    slot = {n: i for i, n in enumerate(n for n in graph.nodes if n.op == "placeholder")}
    for r in regions:
        for node in r.outputs:
            slot[node] = len(slot)
        r.input_slots = [slot[node] for node in r.inputs]
        r.output_slots = [slot[node] for node in r.outputs]
    final = {slot[n] for n in output_node.all_input_nodes}
    last_reader: dict[int, int] = {}
    for r in regions:
        for s in r.input_slots:
            last_reader[s] = r.index
    for s, ri in last_reader.items():
        if s not in final:
            regions[ri].free_after.append(s)
    template = fx.node.map_arg(output_node.args[0], lambda n: _Slot(slot[n]))
    return regions, template, slot


def _own_key(node: fx.Node) -> str | None:
    """The own-region key of a method node, or of the getitem that unpacks one."""
    t = tag_of(node)
    if t is None and node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        t = tag_of(node.args[0])
    return t.own_region if t is not None else None


class _Slot(int):
    """A slot number standing in for a value inside the output's structure."""


def fill_template(template: Any, values: Sequence[Any]) -> Any:
    if isinstance(template, _Slot):
        return values[template]
    if isinstance(template, (tuple, list)):
        return type(template)(fill_template(t, values) for t in template)
    if isinstance(template, dict):
        return {k: fill_template(v, values) for k, v in template.items()}
    return template


def _make_region(gm: fx.GraphModule, index: int, kind: str, block: int | None, nodes: list[fx.Node],
                 owner: Tag | None) -> Region:
    inside = set(nodes)
    inputs: list[fx.Node] = []
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in inside and a not in inputs:
                inputs.append(a)
    outputs = [n for n in nodes if any(u not in inside for u in n.users) or _wanted(n)]
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for a in inputs:
        p = g.placeholder(a.name)
        p.meta = dict(a.meta)
        env[a] = p
    for n in nodes:
        env[n] = g.node_copy(n, lambda x: env[x])
    g.output(tuple(env[o] for o in outputs))
    region_gm = fx.GraphModule(gm, g, class_name=f"Region{index}")
    return Region(index, kind, block, region_gm, inputs, outputs, owner, nodes=list(nodes))


def _wanted(node: fx.Node) -> bool:
    t = tag_of(node)
    return t is not None and t.output


# ---------------------------------------------------------------------------
# canonical keys and compilation


def _target_name(target: Any) -> str:
    if isinstance(target, str):
        return target
    mod = getattr(target, "__module__", None) or ""
    return f"{mod}.{getattr(target, '__qualname__', None) or getattr(target, '__name__', repr(target))}"


def _canon(arg: Any, index: dict) -> Any:
    if isinstance(arg, fx.Node):
        return ("%", index[arg])
    if isinstance(arg, (tuple, list)):
        return (type(arg).__name__, tuple(_canon(a, index) for a in arg))
    if isinstance(arg, dict):
        return ("dict", tuple((k, _canon(v, index)) for k, v in sorted(arg.items())))
    if isinstance(arg, slice):
        return ("slice", _canon(arg.start, index), _canon(arg.stop, index), _canon(arg.step, index))
    if isinstance(arg, (torch.dtype, torch.device, torch.memory_format, torch.layout)):
        return str(arg)
    return repr(arg)


def graph_key(gm: fx.GraphModule) -> tuple:
    """The computation a region does, independent of node and input names."""
    index: dict[fx.Node, int] = {}
    entries = []
    for i, n in enumerate(gm.graph.nodes):
        index[n] = i
        target = "" if n.op == "placeholder" else _target_name(n.target)
        entries.append((n.op, target, _canon(n.args, index), _canon(n.kwargs, index)))
    return tuple(entries)


def input_key(values: Sequence[Any]) -> tuple:
    out = []
    for v in values:
        if isinstance(v, torch.Tensor):
            out.append((tuple(v.shape), v.stride(), v.dtype, v.device.type, v.requires_grad))
        else:
            out.append(("py", type(v).__name__, repr(v)))
    return tuple(out)


def _fresh_copy(gm: fx.GraphModule) -> fx.GraphModule:
    g = fx.Graph()
    out = g.graph_copy(gm.graph, {})
    g.output(out)
    return fx.GraphModule(gm, g, class_name=type(gm).__name__)


def compile_graph(gm: fx.GraphModule, example_inputs: list, config) -> Callable:
    """Lower one graph with the configured lowering; returns a callable taking the inputs positionally."""
    if config.lowering == "eager":
        return gm
    if config.lowering == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(_fresh_copy(gm), example_inputs)
    from torch._inductor.compile_fx import compile_fx

    patches = torch._inductor.list_mode_options(config.mode) if config.mode else None
    return compile_fx(_fresh_copy(gm), example_inputs, config_patches=patches)


@dataclass
class CompiledVariant:
    fn: Callable
    seconds: float


class VariantCache:
    """Compiled code per (region computation, input metadata): identical blocks share one entry."""

    def __init__(self, config):
        self.config = config
        self.variants: dict[tuple, CompiledVariant] = {}

    def get(self, gm: fx.GraphModule, inputs: list) -> Callable:
        """Called once per region variant (the runtime keeps what it returns)."""
        key = (graph_key(gm), input_key(inputs))
        hit = self.variants.get(key)
        if hit is None:
            start = time.perf_counter()
            hit = self.variants[key] = CompiledVariant(compile_graph(gm, list(inputs), self.config),
                                                       time.perf_counter() - start)
        return hit.fn

    @property
    def compile_seconds(self) -> float:
        return sum(v.seconds for v in self.variants.values())
