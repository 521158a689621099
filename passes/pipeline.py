"""ditopt's pass pipeline: normalisation, then analysis, then each enabled method's rewrite.

    NORMALIZE   graph -> graph clean-ups every method relies on (run on every graph)
    METHODS     the acceleration methods, one package each, in pipeline order

A method is one `ditopt.method.Method`; adding one is a package here and one line in
METHODS.  A rewrite changes the graph and returns its report; it never changes the
structure it was given, so the structure stays valid for the next method.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch.fx as fx

from ditopt.analysis import DiTStructure, analyze

from . import (adacache, asymrnr, flex_attention, hoist_block_constants, invariants, normalize_attention,
               packed_attention, remove_inference_noops, teacache, toca)

NORMALIZE: tuple[tuple[str, Callable[[fx.GraphModule], dict]], ...] = (
    ("remove_inference_noops", remove_inference_noops.run),  # first: dropout between softmax and V goes
    ("normalize_attention", normalize_attention.run),  # hand-written attention -> SDPA, where exact
    ("packed_attention", packed_attention.run),  # flash-attn / xformers calls, packed batches -> per-sample SDPA
    ("flex_attention", flex_attention.run),  # flex attention without score or mask mods -> SDPA
    ("hoist_block_constants", hoist_block_constants.run),  # weight-only values blocks hand on -> graph head
)

METHODS = (
    invariants.METHOD,  # first: it only moves computation on step-invariant inputs to the head, for the others
    toca.METHOD,  # before AsymRnR: its scores read each attention's full Q and K, before tokens are reduced
    asymrnr.METHOD,
    adacache.METHOD,  # skip guards last: they wrap whole blocks, whatever the methods above put inside
    teacache.METHOD,
)


class Pipeline(NamedTuple):
    gm: fx.GraphModule
    structure: DiTStructure
    reports: dict  # stage or method name -> its report


def run_pipeline(gm: fx.GraphModule, config, on_stage=None) -> Pipeline:
    """Normalise gm, analyse it, run every enabled method's rewrite in order (gm changes in place).

    Raises UnsupportedGraph when the analysis finds no DiT structure.  `on_stage(name, gm)` sees the
    graph after each stage (the exporter writes it)."""
    reports = {}
    for name, run in NORMALIZE:
        reports[name] = run(gm)
        if on_stage is not None:
            on_stage(name, gm)
    structure = analyze(gm)
    for method, cfg in config.enabled():
        result = method.rewrite(gm, structure, cfg)
        reports[method.name] = result.report
        if result.nothing is not None:
            reports[method.name] = {**result.report, "nothing": result.nothing}
        if on_stage is not None:
            on_stage(method.name, gm)
    return Pipeline(gm, structure, reports)
