"""TeaCache's rewrite: skip guards on every skippable span, and the first block's modulated input as
the probe, read before the blocks run (the region ends after it, so the decision can wait for it)."""

from __future__ import annotations

import torch.fx as fx

from ditopt.analysis import DiTStructure, q_projection_input
from ditopt.method import Rewrite

from ..skipping import insert_guards, mark_probe, no_spans_reason, spans_report
from .config import TeaCacheConfig

NAME = "teacache"


def modulated_input(structure: DiTStructure) -> fx.Node | None:
    """The input of the first block's first self/joint Q projection (the modulated hidden state)."""
    for site in structure.blocks[0].attention:
        if site.kind in ("self", "joint"):
            node = q_projection_input(site.sdpa)
            if node is not None:
                return node
    return None


def rewrite(gm: fx.GraphModule, structure: DiTStructure, cfg: TeaCacheConfig) -> Rewrite:
    spans, rejected = insert_guards(gm, structure, NAME, cfg.compute_first, cfg.compute_last)
    probe = modulated_input(structure)
    where = (f"{structure.blocks[0].path}: input of the first Q projection" if probe is not None else
             "the first block has no self/joint attention to read a modulated input from")
    report = {**spans_report(spans, rejected), "probe": where if probe is not None else None}
    if not spans:
        return Rewrite(report, no_spans_reason(rejected))
    if probe is None:
        report["probe_missing"] = where
        return Rewrite(report, where)
    mark_probe(probe, NAME, "modulated_input", decide_here=True)
    first = next((s for s in spans if 0 in s.blocks), None)
    if first is not None:
        first.decide_after = probe
    return Rewrite(report)
