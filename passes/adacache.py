"""AdaCache pass: skip guards around runs of adjacent transformer blocks, and the metric probe.

A span is a maximal run of blocks with nothing between them in the graph.
It is skippable when every value it hands on is a residual update of one of
its inputs (out = in + sum of branches, reached from `out` through adds and
pass-through ops only): then a skipped step computes `out = in + cached`,
with one summed residual per stream for the whole span, exactly what running
each block on its own cached residual would give.

The pass inserts `torch.ops.ditopt.skip_guard(x, span_id)` on each stream
input at the span's entry (the lowering consumes them) and marks the probe
node, the gated attention branch of the probe block, whose change between
computed steps is the AdaCache metric.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

import ditopt.ops  # noqa: F401  (registers torch.ops.ditopt)
from ditopt.analysis import ADD_TARGETS, PASSTHROUGH, DiTStructure, SkipSpan, _matches, example, q_projection_input

PROBE = "adacache"
TEACACHE_PROBE = "teacache"
_RESIDUAL_PATH = ADD_TARGETS | PASSTHROUGH | {"split", "chunk", torch.split, torch.chunk, torch.cat, operator.getitem}


def _runs_of_adjacent_blocks(gm: fx.GraphModule, structure: DiTStructure) -> list[list[int]]:
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    runs: list[list[int]] = []
    for b in structure.blocks:
        if runs:
            prev = structure.blocks[runs[-1][-1]]
            if order[b.first_node] == order[prev.last_node] + 1:
                runs[-1].append(b.index)
                continue
        runs.append([b.index])
    return runs


def _span_nodes(gm: fx.GraphModule, structure: DiTStructure, blocks: list[int]) -> list[fx.Node]:
    nodes = list(gm.graph.nodes)
    order = {n.name: i for i, n in enumerate(nodes)}
    first = order[structure.blocks[blocks[0]].first_node]
    last = order[structure.blocks[blocks[-1]].last_node]
    return nodes[first:last + 1]


def _residual_source(out: fx.Node, inside: set, inputs: set) -> fx.Node | None:
    """The span input that `out` is a residual update of, or None if not exactly one."""
    want = example(out)
    found, frontier, seen = set(), [out], set()
    while frontier:
        node = frontier.pop()
        if node in seen:
            continue
        seen.add(node)
        if node in inputs:
            val = example(node)
            if val is not None and want is not None and val.shape == want.shape and val.dtype == want.dtype:
                found.add(node)
            continue
        if node in inside and _matches(node, _RESIDUAL_PATH):
            frontier.extend(node.all_input_nodes)
    return found.pop() if len(found) == 1 else None


def _probe_node(structure: DiTStructure, config) -> tuple[str | None, str]:
    blocks = structure.blocks
    temporal = [b for b in blocks if any(a.axis == "temporal" and a.branch for a in b.attention)]
    candidates = temporal or [b for b in blocks if any(a.kind in ("self", "joint") and a.branch for a in b.attention)]
    if config.adacache.probe_block is not None:
        if not 0 <= config.adacache.probe_block < len(blocks):
            raise ValueError(f"ditopt: adacache.probe_block={config.adacache.probe_block} is out of range; "
                             f"this model has {len(blocks)} blocks (0..{len(blocks) - 1})")
        candidates = [blocks[config.adacache.probe_block]]
    if not candidates:
        return None, "no block has a self/joint attention residual to probe"
    block = candidates[len(candidates) // 2]
    sites = [a for a in block.attention if a.branch and (a.axis == "temporal" or a.kind in ("self", "joint"))]
    if not sites:
        return None, f"block {block.index} has no attention residual to probe"
    return sites[0].branch, f"{block.path}: {sites[0].name} ({sites[0].kind}, {sites[0].axis})"


def _first_modulated_input(gm: fx.GraphModule, structure: DiTStructure) -> str | None:
    """TeaCache's signal: the input of the first block's first Q projection (the modulated hidden state)."""
    by_name = {n.name: n for n in gm.graph.nodes}
    for site in structure.blocks[0].attention:
        if site.kind in ("self", "joint"):
            node = q_projection_input(by_name[site.sdpa])
            if node is not None:
                return node.name
    return None


def run(gm: fx.GraphModule, structure: DiTStructure, config):
    from . import PassResult

    spans, rejected = [], []
    for blocks in _runs_of_adjacent_blocks(gm, structure):
        nodes = _span_nodes(gm, structure, blocks)
        inside = set(nodes)
        inputs = {a for n in nodes for a in n.all_input_nodes if a not in inside}
        outputs = [n for n in nodes if any(u not in inside for u in n.users)]
        streams = [(src, out) for out in outputs if (src := _residual_source(out, inside, inputs)) is not None]
        if len(streams) != len(outputs) or not streams:
            bad = [o.name for o in outputs if o not in {out for _, out in streams}]
            rejected.append({"blocks": blocks, "reason": f"outputs {bad} are not residual updates of the span's inputs"})
            continue
        span_id = len(spans)
        first = nodes[0]
        for src, _ in streams:
            with gm.graph.inserting_before(first):
                guard = gm.graph.call_function(torch.ops.ditopt.skip_guard.default, (src, span_id))
            guard.meta = {"nn_module_stack": first.meta.get("nn_module_stack", {}), "example_value": example(src)}
            for user in [u for u in list(src.users) if u in inside]:
                user.replace_input_with(src, guard)
        spans.append(SkipSpan(span_id, blocks, [(src.name, out.name) for src, out in streams]))

    if config.adacache.policy == "teacache":
        probe = _first_modulated_input(gm, structure)
        probe_where = f"{structure.blocks[0].path}: input of the first Q projection" if probe else \
            "the first block has no self/joint attention to read a modulated input from"
        if probe is not None and spans:
            node = next(n for n in gm.graph.nodes if n.name == probe)
            node.meta["ditopt_probe"] = TEACACHE_PROBE
            node.meta["ditopt_split_after"] = True  # the decision waits for it: end a region here
            structure.probes[TEACACHE_PROBE] = probe
            first_span = next((s for s in spans if 0 in s.blocks), None)
            if first_span is not None:
                first_span.decide_after = probe
        structure.skip_spans = spans
        gm.recompile()
        return PassResult(gm, structure, _report(spans, rejected, probe, probe_where))
    probe, probe_where = _probe_node(structure, config)
    if probe is not None:
        node = next(n for n in gm.graph.nodes if n.name == probe)
        node.meta["ditopt_probe"] = PROBE
        structure.probes[PROBE] = probe
    structure.skip_spans = spans
    gm.recompile()
    return PassResult(gm, structure, _report(spans, rejected, probe, probe_where))


def _report(spans, rejected, probe, probe_where) -> dict:
    report = {
        "spans": [{"id": s.id, "blocks": s.blocks, "streams": len(s.streams)} for s in spans],
        "guards": sum(len(s.streams) for s in spans),
        "rejected": rejected,
        "probe": probe_where if probe is not None else None,
    }
    if probe is None:
        report["probe_missing"] = probe_where
    return report
