"""AdaCache's rewrite: skip guards on every skippable span, and the probe whose change is the metric.

The probe is the gated attention branch of one block (the middle temporal block where there is
one, else the middle block with self or joint attention), or of each block in `probe_blocks`
(averaged, the reference's "synced" layers); its relative change between computed steps is
AdaCache's distance metric.  A block whose attention has no such branch (a linear attention) is
probed by its own output residual, out - in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from ditopt.analysis import DiTStructure
from ditopt.method import Rewrite

from ditopt.patterns import nodes_between
from ditopt.diagnostics import OptionError

from ..skipping import insert_guards, mark_probe, no_spans_reason, residual_streams, spans_report
from .config import AdaCacheConfig

NAME = "adacache"


@dataclass(frozen=True)
class Probe:
    """What the policy reads: an attention branch, or a block's output residual (out - in)."""

    where: str
    branch: fx.Node | None = None
    block_in: fx.Node | None = None
    block_out: fx.Node | None = None


def _attention_probe(block) -> Probe | None:
    sites = [a for a in block.attention if a.branch is not None and (a.axis == "temporal" or a.kind in ("self", "joint"))]
    temporal = [a for a in sites if a.axis == "temporal"]
    site = (temporal or sites or [None])[0]
    if site is None:
        return None
    return Probe(f"{block.path}: {site.name} ({site.kind}, {site.axis})", branch=site.branch)


def _residual_probe(gm: fx.GraphModule, block) -> Probe | None:
    """The block's own output residual, where the block hands on exactly one residual update of its input."""
    outputs, streams = residual_streams(nodes_between(gm.graph, block.first_node, block.last_node))
    if len(streams) != 1 or len(outputs) != 1 or streams[0][0].op == "placeholder":
        return None
    src, out = streams[0]
    return Probe(f"{block.path}: the block's output residual (its attention cannot be probed: "
                 f"{', '.join(sorted({a.kind for a in block.attention}))})", block_in=src, block_out=out)


def probes_for(gm: fx.GraphModule, structure: DiTStructure, cfg: AdaCacheConfig) -> tuple[list[Probe], str]:
    """The probes whose changes make the metric; none and why when there are none.

    Default: the middle temporal block's attention branch if there is one, else the middle block with a
    self/joint attention branch, else (a linear or other attention) the middle block's output residual."""
    blocks = structure.blocks
    if cfg.probe_blocks:
        bad = [b for b in cfg.probe_blocks if b >= len(blocks)]
        if bad:
            raise OptionError(f"ditopt: adacache.probe_blocks {bad} are out of range; "
                             f"this model has {len(blocks)} blocks (0..{len(blocks) - 1})")
        chosen = [blocks[b] for b in cfg.probe_blocks]
    else:
        temporal = [b for b in blocks if any(a.axis == "temporal" and a.branch for a in b.attention)]
        candidates = temporal or [b for b in blocks if _attention_probe(b) is not None] or blocks
        chosen = [candidates[len(candidates) // 2]]
    found = [_attention_probe(b) or _residual_probe(gm, b) for b in chosen]
    missing = [b.path for b, p in zip(chosen, found) if p is None]
    if missing:
        return [], f"{', '.join(missing)} has no attention branch to probe and no single residual stream"
    return found, "; ".join(p.where for p in found)


def span_probes(gm: fx.GraphModule, structure: DiTStructure, spans) -> tuple[list[Probe], str]:
    """span_blocks: each span's own probe, its middle block's (as probes_for chooses within one block)."""
    found = []
    for span in spans:
        block = structure.blocks[span.blocks[len(span.blocks) // 2]]
        probe = _attention_probe(block) or _residual_probe(gm, block)
        if probe is None:
            return [], f"{block.path} (the middle of span {span.blocks}) has no attention branch or residual to probe"
        found.append(probe)
    return found, "; ".join(f"span {s.blocks}: {p.where}" for s, p in zip(spans, found))


def rewrite(gm: fx.GraphModule, structure: DiTStructure, cfg: AdaCacheConfig) -> Rewrite:
    spans, rejected = insert_guards(gm, structure, NAME, cfg.compute_first, cfg.compute_last, cfg.span_blocks)
    if cfg.span_blocks:
        probes, where = span_probes(gm, structure, spans)
        names = [f"span{s.id}" for s in spans]
    else:
        probes, where = probes_for(gm, structure, cfg)
        names = [f"probe{i}" for i in range(len(probes))]
    for name, probe in zip(names, probes):
        if probe.branch is not None:
            mark_probe(probe.branch, NAME, name)
        else:
            mark_probe(probe.block_in, NAME, f"{name}:in")
            mark_probe(probe.block_out, NAME, f"{name}:out")
    report = {**spans_report(spans, rejected), "probe": where if probes else None}
    nothing = None
    if not spans:
        nothing = no_spans_reason(rejected)
    elif not probes:
        nothing = where
        report["probe_missing"] = where
    return Rewrite(report, nothing)
