"""The `ditopt` torch.compile backend.

    torch.compile(model, backend="ditopt", options={"preset": "balanced"})

Registered through the `torch_dynamo_backends` entry point (pyproject.toml),
so it works in an interpreter that never imported ditopt.

One flow for every graph: options -> Config -> normalise and analyse -> each
enabled method's rewrite -> lowering into regions -> each method's hook -> one
Runtime that drives the hooks.
"""

from __future__ import annotations

import torch.fx as fx

from . import contexts
from .analysis import UnsupportedGraph, find_timestep
from .config import Config
from .diagnostics import warn_once
from .export import Exporter
from .lowering import compile_graph, lower
from .parallel import rank_group
from .runtime import Fallback, Runtime, register
from .shapes import ShapeDispatcher, is_dynamic


def ditopt_backend(gm: fx.GraphModule, example_inputs, options=None, mode: str | None = None):
    """Analyse a Dynamo graph, run the pass pipeline, lower it by regions; returns the runtime callable.

    A graph without DiT structure is lowered unchanged with one warning that names the reason.
    """
    module = contexts.module_being_compiled()
    contexts.remember(module)
    return _compile(gm, example_inputs, options, mode, contexts.reader_for(module))


def _compile(gm: fx.GraphModule, example_inputs, options, mode, context):
    from ditopt.passes.pipeline import run_pipeline

    config = Config.from_options(options, mode)
    group = rank_group(gm)  # context parallelism: the ranks that must take the same decisions
    if group is not None:
        group.agree("ditopt options", {k: v for k, v in config.to_dict().items() if k != "export_dir"})
    if is_dynamic(gm):  # symbolic sizes: one static specialisation per concrete shape, at call time
        dispatcher = ShapeDispatcher(gm, lambda concrete, inputs: _compile(concrete, inputs, options, mode, context),
                                     lambda: compile_graph(gm, list(example_inputs), config), warn_once)
        register(dispatcher, example_inputs)
        return dispatcher
    exporter = Exporter(config.export_dir)
    exporter.graph("dynamo", gm)
    exporter.write_report(config=config.to_dict())
    try:
        gm, structure, reports = run_pipeline(gm, config, on_stage=exporter.graph)
    except UnsupportedGraph as why:
        warn_once(f"ditopt: {why}; compiling this graph with plain {config.lowering} and no acceleration")
        exporter.write_report(structure=None, fallback=str(why))
        fallback = Fallback(compile_graph(gm, list(example_inputs), config), str(why), _timestep_slot(gm))
        register(fallback, example_inputs)
        return fallback

    lowered = lower(gm, structure)
    hooks = []
    for method, cfg in config.enabled():
        why = reports[method.name].get("nothing")
        hook = method.hook(cfg, lowered) if why is None else why
        if isinstance(hook, str):
            warn_once(f"ditopt: {method.name} is on but {_explain(hook, reports[method.name])}; "
                       f"it does nothing in this graph")
        else:
            hooks.append(hook)
    runtime = Runtime(lowered, hooks, config, reports, context, group)
    register(runtime, example_inputs)
    exporter.lowered(lowered.regions, runtime.fused)
    exporter.write_report(
        structure=structure.to_json(),
        passes=reports,
        regions=[{"name": r.name, "kind": r.kind, "block": r.block, "inputs": len(r.inputs),
                  "outputs": len(r.outputs)} for r in lowered.regions],
        fused=[{"name": r.name, "regions": [r.index, r.last], "inputs": len(r.inputs), "outputs": len(r.outputs)}
               for r in runtime.fused.values()],
    )
    return runtime


def _timestep_slot(gm: fx.GraphModule) -> int | None:
    """Where a graph without DiT structure takes the timestep, if it does (a forward cut by graph breaks)."""
    try:
        timestep = find_timestep(gm.graph)
    except Exception:  # noqa: BLE001 - a graph ditopt cannot read at all has no timestep to share
        return None
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return placeholders.index(timestep) if timestep is not None else None


def _explain(why: str, report: dict) -> str:
    """The reason, with the sites the method declined and why, where its report lists them."""
    by_reason: dict[str, list[str]] = {}
    for s in report.get("skipped", []):
        by_reason.setdefault(s["reason"], []).append(s["site"])
    declined = [f"{', '.join(sites)}: {reason}" for reason, sites in sorted(by_reason.items())]
    return f"{why} ({'; '.join(declined)})" if declined else why

