"""The safety net: an exception anywhere in ditopt's compile, or in a region's lazy compile at run time, makes
that graph run as plain lowering would, with exactly one warning naming the exception; the caller's loop
never sees it, and the output is the model's."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

import ditopt
import ditopt.passes.pipeline as pipeline
from ditopt import backend, lowering
from ditopt.harness import models

from conftest import capture_graphs

STEPS = (900.0, 800.0, 700.0, 600.0)


class Injected(RuntimeError):
    pass


def boom(*args, **kwargs):
    raise Injected("injected fault")


def _normalize_fault(index):
    def inject(monkeypatch):
        stages = list(pipeline.NORMALIZE)
        stages[index] = (stages[index][0], boom)
        monkeypatch.setattr(pipeline, "NORMALIZE", tuple(stages))
    return inject


def _method_fault(name, part):
    def inject(monkeypatch):
        methods = tuple(dataclasses.replace(m, **{part: boom}) if m.name == name else m for m in pipeline.METHODS)
        monkeypatch.setattr(pipeline, "METHODS", methods)
    return inject


FAULTS = {
    **{f"normalize:{name}": _normalize_fault(i) for i, (name, _) in enumerate(pipeline.NORMALIZE)},
    "analysis": lambda mp: mp.setattr(pipeline, "analyze", boom),
    **{f"rewrite:{m}": _method_fault(m, "rewrite") for m in ("invariants", "adacache")},
    "lowering": lambda mp: mp.setattr(backend, "lower", boom),
    **{f"hook:{m}": _method_fault(m, "hook") for m in ("invariants", "adacache")},
    "region lazy compile": lambda mp: mp.setattr(lowering.VariantCache, "get", boom),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_fault_in_any_stage_runs_the_graph_plain_with_one_warning(fault, monkeypatch):
    case = models.build("wan")
    inputs = case.inputs()
    expected = []
    with torch.no_grad():
        for t in STEPS:
            expected.append(models.call(case.model, {**inputs, "timestep": torch.full_like(inputs["timestep"], t)}))
    FAULTS[fault](monkeypatch)
    compiled = torch.compile(case.model, backend="ditopt", options={"preset": "fast", "lowering": "eager"})
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        got = [models.call(compiled, {**inputs, "timestep": torch.full_like(inputs["timestep"], t)}) for t in STEPS]
    ours = [str(w.message) for w in caught if str(w.message).startswith("ditopt:")]
    assert len(ours) == 1, ours
    assert "Injected" in ours[0] and "injected fault" in ours[0]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-5)
    s = ditopt.stats(case.model)
    assert any("Injected" in f for f in s["fallbacks"]), s["fallbacks"]
    assert "Injected" in ditopt.explain(case.model)


def test_the_warning_names_the_node_a_pass_failed_on(monkeypatch):
    def failing_pass(gm):
        for node in gm.graph.nodes:
            if node.op == "call_function":
                raise ValueError("cannot handle this node")
        return {}

    stages = list(pipeline.NORMALIZE)
    stages[1] = (stages[1][0], failing_pass)
    monkeypatch.setattr(pipeline, "NORMALIZE", tuple(stages))
    case = models.build("wan")
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        models.call(torch.compile(case.model, backend="ditopt", options={"lowering": "eager"}), case.inputs())
    (message,) = [str(w.message) for w in caught if str(w.message).startswith("ditopt:")]
    first = next(n for n in _dynamo_graph(case) if n.op == "call_function")
    assert f"ValueError in the stage after {stages[0][0]} at node {first.name}" in message


def _dynamo_graph(case):
    (gm,) = capture_graphs(case.model, case.inputs())
    torch._dynamo.reset()
    return list(gm.graph.nodes)


def test_an_error_of_the_model_itself_still_reaches_the_caller():
    """The net catches ditopt's failures, not the model's: a bad input fails as it would without ditopt."""
    case = models.build("wan")
    compiled = torch.compile(case.model, backend="ditopt", options={"lowering": "eager"})
    inputs = case.inputs()
    with torch.no_grad():
        models.call(compiled, inputs)
        with pytest.raises(Exception):
            models.call(compiled, {**inputs, "encoder_hidden_states": inputs["encoder_hidden_states"][..., :3]})
