"""ditopt's graph passes and the one ordered pipeline that runs them.

Every pass is a module in this package with one function of one signature:

    run(gm: GraphModule, structure: DiTStructure, config: Config) -> PassResult

It returns the rewritten graph, the structure (updated if the pass changed
what the structure describes) and a report of what it matched, which tests
count and `export_dir` writes out.  Nodes a pass inserts copy the
`nn_module_stack` of the site they belong to, so the lowering still knows
which block they are in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch.fx as fx

from ditopt.analysis import DiTStructure, analyze
from ditopt.config import Config

from . import adacache, asymrnr, remove_inference_noops, toca


@dataclass
class PassResult:
    gm: fx.GraphModule
    structure: DiTStructure
    report: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Pass:
    name: str
    run: Callable[[fx.GraphModule, DiTStructure, Config], PassResult]
    enabled: Callable[[Config], bool]
    reanalyze: bool = False  # the pass renames nodes: derive the structure again afterwards


PIPELINE: tuple[Pass, ...] = (
    Pass("remove_inference_noops", remove_inference_noops.run, lambda c: True, reanalyze=True),
    # ToCa before AsymRnR: its scores read each attention's full Q and K, before tokens are reduced.
    Pass("toca", toca.run, lambda c: c.toca.enabled),
    Pass("asymrnr", asymrnr.run, lambda c: c.asymrnr.enabled),
    Pass("adacache", adacache.run, lambda c: c.adacache.enabled),
)


def run_pipeline(gm: fx.GraphModule, structure: DiTStructure, config: Config, on_pass=None):
    """Run every enabled pass in order; returns (gm, structure, {pass name: report})."""
    reports = {}
    for p in PIPELINE:
        if not p.enabled(config):
            continue
        result = p.run(gm, structure, config)
        gm, structure = result.gm, result.structure
        if p.reanalyze:
            structure = analyze(gm)
        reports[p.name] = result.report
        if on_pass is not None:
            on_pass(p.name, gm)
    return gm, structure, reports
