"""Split a rewritten graph into regions and compile each distinct region once.

Regions are contiguous slices of the graph in node order (so the split can
never create a cycle): the prologue, one region per transformer block, glue
between blocks, and the epilogue.  Weights are graph inputs, so blocks that
do the same computation on inputs of the same metadata have the same
canonical key and share one compiled variant: an N-block model compiles O(1)
block variants, not O(N).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from . import ops  # noqa: F401  (registers torch.ops.ditopt)
from .analysis import DiTStructure
from .config import Config


@dataclass
class Region:
    index: int
    kind: str  # "prologue", "block", "match" (run by the runtime's planner), "glue" or "epilogue"
    block: int | None  # index into DiTStructure.blocks for block regions
    gm: fx.GraphModule
    inputs: list[str]  # names of the values it reads, in the parent graph
    outputs: list[str]  # names of the values it defines that are read later
    input_slots: list[int] = field(default_factory=list)
    output_slots: list[int] = field(default_factory=list)
    free_after: list[int] = field(default_factory=list)  # slots whose last reader is this region

    @property
    def name(self) -> str:
        return f"region{self.index}_{self.kind}" + (f"{self.block}" if self.block is not None else "")


@dataclass
class SpanPlan:
    """A skippable run of block regions, in slot terms: the runtime's view of a SkipSpan."""

    id: int
    first: int  # region index
    last: int
    streams: list[tuple[int, int]]  # (input slot, output slot)
    free_after: list[int]  # slots read last inside the span, to free when it is skipped
    num_blocks: int
    decide_after: int | None = None  # region whose probe the decision waits for (None: decide at entry)


def consume_guards(gm: fx.GraphModule) -> set[int]:
    """Replace the ditopt.skip_guard markers by their input; returns the span ids that had guards.

    The guard is where the runtime decides, so it costs nothing inside the compiled regions."""
    guarded: set[int] = set()
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.ditopt.skip_guard.default:
            x, span_id = node.args
            guarded.add(span_id)
            node.replace_all_uses_with(x)
            gm.graph.erase_node(node)
    gm.recompile()
    return guarded


def plan_spans(structure: DiTStructure, regions: list[Region], slot: dict[str, int], guarded: set[int]) -> list[SpanPlan]:
    """The skippable spans whose guards are in the graph, in slot terms."""
    plans = []
    for span in structure.skip_spans:
        if span.id not in guarded:
            continue
        members = [r for r in regions if r.block is not None and r.block in span.blocks]
        streams = [(slot[i], slot[o]) for i, o in span.streams]
        free = sorted({s for r in members for s in r.free_after} - {dst for _, dst in streams})
        decide_after = next((r.index for r in members if span.decide_after in r.outputs), None) \
            if span.decide_after else None
        plans.append(SpanPlan(span.id, members[0].index, members[-1].index, streams, free, len(span.blocks),
                              decide_after))
    return plans


def split_regions(gm: fx.GraphModule, structure: DiTStructure) -> tuple[list[Region], Any, dict[str, int]]:
    """Cut gm into regions. Also returns the output template (slot numbers in the output's structure)
    and the slot of every value by name."""
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    by_name = {n.name: n for n in graph.nodes}
    block_at: dict[fx.Node, int] = {}
    for b in structure.blocks:
        first, last = order[by_name[b.first_node]], order[by_name[b.last_node]]
        for n in graph.nodes:
            if first <= order[n] <= last:
                block_at[n] = b.index

    body = [n for n in graph.nodes if n.op not in ("placeholder", "output")]
    # A segment is (block, match tag, nodes); a token_match node and its getitems form a region of their own.
    segments: list[tuple[int | None, str | None, list[fx.Node]]] = []
    cut = False
    for n in body:
        blk, tag = block_at.get(n), n.meta.get("ditopt_match_region")
        if not segments or segments[-1][:2] != (blk, tag) or cut:
            segments.append((blk, tag, []))
        segments[-1][2].append(n)
        cut = bool(n.meta.get("ditopt_split_after"))  # a policy decides on this value: end the region

    output_node = next(n for n in graph.nodes if n.op == "output")
    regions = []
    for i, (blk, tag, nodes) in enumerate(segments):
        if tag is not None:
            kind = "match"
        elif blk is not None:
            kind = "block"
        elif i == 0:
            kind = "prologue"
        elif i == len(segments) - 1:
            kind = "epilogue"
        else:
            kind = "glue"
        regions.append(_make_region(gm, i, kind, blk, nodes, order))

    placeholders = [n.name for n in graph.nodes if n.op == "placeholder"]
    slot = {name: i for i, name in enumerate(placeholders)}
    for r in regions:
        for name in r.outputs:
            slot[name] = len(slot)
        r.input_slots = [slot[name] for name in r.inputs]
        r.output_slots = [slot[name] for name in r.outputs]
    final = {slot[n.name] for n in output_node.all_input_nodes}
    last_reader: dict[int, int] = {}
    for r in regions:
        for s in r.input_slots:
            last_reader[s] = r.index
    for s, ri in last_reader.items():
        if s not in final:
            regions[ri].free_after.append(s)
    template = fx.node.map_arg(output_node.args[0], lambda n: _Slot(slot[n.name]))
    return regions, template, slot


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


def _make_region(gm: fx.GraphModule, index: int, kind: str, block: int | None, nodes: list[fx.Node], order) -> Region:
    inside = set(nodes)
    inputs: list[fx.Node] = []
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in inside and a not in inputs:
                inputs.append(a)
    # probes (values a runtime policy reads) are outputs even without a reader outside
    outputs = [n for n in nodes if any(u not in inside for u in n.users) or "ditopt_probe" in n.meta]
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
    return Region(index, kind, block, region_gm, [a.name for a in inputs], [o.name for o in outputs])


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


def compile_graph(gm: fx.GraphModule, example_inputs: list, config: Config) -> Callable:
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

    def __init__(self, config: Config):
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
