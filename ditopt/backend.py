"""The `ditopt` torch.compile backend.

    torch.compile(model, backend="ditopt", options={"preset": "balanced"})

Registered through the `torch_dynamo_backends` entry point (pyproject.toml),
so it works in an interpreter that never imported ditopt.

One flow for every graph: options -> Config -> normalise and analyse -> each
enabled method's rewrite -> lowering into regions -> each method's hook -> one
Runtime that drives the hooks.
"""

from __future__ import annotations

import weakref

import torch
import torch.fx as fx

from . import contexts
from .analysis import OneBlockGraph, UnsupportedGraph, find_timestep
from .config import Config
from .diagnostics import OptionError, failure_reason, warn_once
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
    context = contexts.reader_for(module)
    # the model this graph is part of: a block's forward compiled on its own belongs to its transformer
    model = _model_of(example_inputs)
    model = module if model is None else model
    earlier_break = _BREAKS.get(model) if model is not None else None
    reason = getattr(gm, "compile_subgraph_reason", None)
    if model is not None and reason is not None and getattr(reason, "graph_break", False):
        _BREAKS[model] = describe_break(reason)  # this graph ends at a break: say so for the graphs after it
        gm.meta["ditopt_ends_at_break"] = True
    return _compile(gm, example_inputs, options, mode, context, earlier_break, module)


def _compile(gm: fx.GraphModule, example_inputs, options, mode, context, earlier_break: str | None = None,
             module=None):
    config = Config.from_options(options, mode)  # a bad option is the caller's to fix: it raises
    group = rank_group(gm)  # context parallelism: the ranks that must take the same decisions
    if group is not None:
        group.agree("ditopt options", {k: v for k, v in config.to_dict().items() if k != "export_dir"})
    if is_dynamic(gm):  # symbolic sizes: one static specialisation per concrete shape, at call time
        dispatcher = ShapeDispatcher(gm, lambda concrete, inputs: _compile(concrete, inputs, options, mode, context,
                                                                          earlier_break, module),
                                     lambda: compile_graph(gm, list(example_inputs), config), warn_once)
        register(dispatcher, example_inputs)
        return dispatcher
    original = snapshot(gm)  # the graph as Dynamo gave it: what runs if anything below fails
    exporter = Exporter(config.export_dir)
    stage = ["the start"]
    try:
        return _accelerate(gm, example_inputs, config, context, group, exporter, original, stage, earlier_break,
                           module)
    except OptionError:
        raise  # an option that does not fit this model: the caller's to fix
    except Exception as err:  # noqa: BLE001 - the safety net: ditopt's failure must not reach the caller's loop
        reason = failure_reason(err, stage[0])
        warn_once(f"ditopt: {reason}; compiling this graph with plain {config.lowering} and no acceleration")
        exporter.write_report(structure=None, fallback=reason)
        return _fallback(original, example_inputs, config, reason)


def _accelerate(gm, example_inputs, config, context, group, exporter, original, stage, earlier_break=None,
                module=None):
    from ditopt.passes import block_chain
    from ditopt.passes.pipeline import run_pipeline

    def on_stage(name, graph_module):
        stage[0] = f"the stage after {name}"
        exporter.graph(name, graph_module)

    ends_at_break = gm.meta.get("ditopt_ends_at_break", False)
    exporter.graph("dynamo", gm)
    exporter.write_report(config=config.to_dict())
    try:
        stage[0] = "the pass pipeline"
        gm, structure, reports = run_pipeline(gm, config, on_stage=on_stage)
    except UnsupportedGraph as unsupported:
        why = str(unsupported)
        if isinstance(unsupported, OneBlockGraph):
            stage[0] = "the block chain"
            chained = block_chain.build(original, config, module,
                                        lambda: compile_graph(original, list(example_inputs), config))
            if not isinstance(chained, str):
                register(chained, example_inputs)
                exporter.write_report(structure=None, chained_blocks={"streams": list(chained.streams.inputs),
                                                                      "method": chained.methods})
                return chained
            why = f"{why}; {chained}"
        elif ends_at_break or ("holds no attention" in why and block_chain.chained(_model_of(example_inputs))):
            # A forward's head cut off at a break (its blocks come in later graphs, which warn if they cannot be
            # accelerated), or a part without attention between blocks that run chained: nothing to warn of.
            exporter.write_report(structure=None, fallback=why)
            return _fallback(original, example_inputs, config, why)
        if earlier_break is not None and ("no list of transformer blocks" in why or "no complete transformer" in why
                                          or "holds no attention" in why):
            why = (f"a graph break at {earlier_break} cuts this model's forward before its blocks, so they reach "
                   f"ditopt in graphs of their own ({why.split(':')[0]}); avoid the break there (compute that value "
                   "before calling the model, or make it a tensor op) to keep the blocks in one graph")
        warn_once(f"ditopt: {why}; compiling this graph with plain {config.lowering} and no acceleration")
        exporter.write_report(structure=None, fallback=why)
        return _fallback(original, example_inputs, config, why)

    stage[0] = "the lowering"
    lowered = lower(gm, structure)
    hooks = []
    for method, cfg in config.enabled():
        stage[0] = f"{method.name}'s hook"
        why = reports[method.name].get("nothing")
        hook = method.hook(cfg, lowered) if why is None else why
        if isinstance(hook, str):
            warn_once(f"ditopt: {method.name} is on but {_explain(hook, reports[method.name])}; "
                      f"it does nothing in this graph")
        else:
            hooks.append(hook)
    stage[0] = "the runtime"
    runtime = Runtime(lowered, hooks, config, reports, context, group,
                      plain=lambda: compile_graph(original, list(example_inputs), config))
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


# module -> the graph break the latest graph of its forward ended at (graphs after a break say where it was)
_BREAKS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _model_of(example_inputs) -> torch.nn.Module | None:
    param = next((x for x in example_inputs if isinstance(x, torch.nn.Parameter)), None)
    return contexts.owner_of(param)


def describe_break(reason) -> str:
    """Dynamo's graph-break reason with the user's source line it happened at."""
    where = next((f"{f.filename}:{f.lineno} ({(f.line or '').strip()})" for f in reversed(reason.user_stack or [])),
                 "an unknown line")
    return f"{where}: {str(reason.reason).splitlines()[0][:200]}"


def _fallback(gm: fx.GraphModule, example_inputs, config, reason: str) -> Fallback:
    fallback = Fallback(compile_graph(gm, list(example_inputs), config), reason, _timestep_slot(gm))
    register(fallback, example_inputs)
    return fallback


def snapshot(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of gm's graph (nodes and their meta, shallowly) over the same attributes: the passes rewrite gm
    in place, and this keeps what Dynamo gave, cheaply (no tensor is copied)."""
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    return fx.GraphModule(gm, graph, class_name=type(gm).__name__)


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

