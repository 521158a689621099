"""The `ditopt` torch.compile backend.

    torch.compile(model, backend="ditopt", options={"preset": "balanced"})

Registered through the `torch_dynamo_backends` entry point (pyproject.toml),
so it works in an interpreter that never imported ditopt.
"""

from __future__ import annotations

import warnings

import torch.fx as fx

from .analysis import UnsupportedGraph, analyze
from .config import Config
from .export import Exporter
from .lowering import compile_graph, consume_guards, plan_spans, split_regions
from .runtime import Runtime, register


def ditopt_backend(gm: fx.GraphModule, example_inputs, options=None, mode: str | None = None):
    """Analyse a Dynamo graph, run the pass pipeline, lower it by regions; returns the runtime callable.

    A graph without DiT structure is lowered unchanged with one warning that names the reason.
    """
    from ditopt.passes import run_pipeline

    config = Config.from_options(options, mode)
    exporter = Exporter(config.export_dir)
    exporter.graph("dynamo", gm)
    exporter.write_report(config=config.to_dict())
    try:
        structure = analyze(gm)
    except UnsupportedGraph as why:
        _warn_once(f"ditopt: {why}; compiling this graph with plain {config.lowering} and no acceleration")
        exporter.write_report(structure=None, fallback=str(why))
        return compile_graph(gm, list(example_inputs), config)

    gm, structure, reports = run_pipeline(gm, structure, config, on_pass=exporter.graph)
    guarded = consume_guards(gm)
    regions, template, slot = split_regions(gm, structure)
    spans = plan_spans(structure, regions, slot, guarded)
    timestep_slot = slot[structure.timestep_input] if structure.timestep_input else None
    probe_slots = {name: slot[node] for name, node in structure.probes.items()}
    policies = _policies(config, structure, reports)
    planner = None
    if config.asymrnr.enabled:
        from .asymrnr import build_planner

        planner = build_planner(config.asymrnr, regions, len(structure.blocks))
        if planner is None:
            _warn_once(f"ditopt: asymrnr is on but no attention site could be reduced "
                       f"({_skipped_reasons(reports['asymrnr'], 'no self-attention over video tokens')}); attention runs on every token")
    toca = None
    if config.toca.enabled:
        from .toca import build_planner as build_toca

        toca = build_toca(config.toca, regions, structure)
        if toca is None:
            _warn_once(f"ditopt: toca is on but no site could be cached "
                       f"({_skipped_reasons(reports['toca'], 'no attention or MLP site in the blocks')}); every step computes every token")
    runtime = Runtime(structure, regions, template, config, timestep_slot, spans, probe_slots, policies, reports,
                      planner, toca)
    register(runtime, example_inputs)
    exporter.lowered(regions)
    exporter.write_report(
        structure=structure.to_json(),
        passes=reports,
        regions=[{"name": r.name, "kind": r.kind, "block": r.block, "inputs": len(r.inputs),
                  "outputs": len(r.outputs)} for r in regions],
    )
    return runtime


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    """One warning per reason per process: a model that breaks into many graphs warns once."""
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, stacklevel=3)


def _skipped_reasons(report: dict, none_found: str) -> str:
    reasons = sorted({s["reason"] for s in report.get("skipped", [])})
    return "; ".join(reasons) or none_found


def _policies(config: Config, structure, reports: dict) -> list:
    policies = []
    if config.adacache.enabled:
        from .adacache import make_policy

        policy = make_policy(config.adacache, structure)
        if policy is not None:
            policies.append(policy)
        else:
            _warn_once(f"ditopt: adacache is on but {reports['adacache'].get('probe_missing', 'nothing can be skipped')};"
                       " blocks are always computed")
    return policies
