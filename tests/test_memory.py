"""Every method's caches are counted per stream and generation, and `max_cache_mb` bounds them: the method
holding most gives something up in a stated way (a lower forecast order, fewer cached spans or sites,
invariants recomputed), with one warning; what is given up is recomputed, so the output stays finite and
the lossless parts exact."""

from __future__ import annotations

import warnings

import pytest
import torch

import ditopt
from ditopt.harness import models

STEPS = 8


def run(options: dict):
    case = models.build("wan")
    torch._dynamo.reset()
    fn = torch.compile(case.model, backend="ditopt", options={"lowering": "eager", **options})
    inputs = case.inputs()
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [models.call(fn, {**inputs, "timestep": t.expand_as(inputs["timestep"])})
                for t in torch.linspace(999, 0, STEPS)]
    return case.model, outs, [str(w.message) for w in caught if "max_cache_mb" in str(w.message)]


@pytest.mark.parametrize("options", [{"preset": "quality"}, {"preset": "lossless", "toca": {"interval": 3}},
                                     {"preset": "lossless", "asymrnr": True}])
def test_every_method_cache_is_counted(options):
    model, _, _ = run(options)
    g = ditopt.stats(model)["generations"][-1]
    methods = [m for m in ("invariants", "adacache", "toca", "asymrnr") if m in g]
    assert methods and all(g[m]["cache_bytes"] > 0 for m in methods), {m: g[m]["cache_bytes"] for m in methods}
    assert g["peak_cache_mb"] >= g["cache_mb"] > 0
    assert g["cache_mb"] == pytest.approx(sum(g[m]["cache_bytes"] for m in methods) / 2**20, abs=1e-3)


@pytest.mark.parametrize("options", [{"preset": "quality"}, {"preset": "lossless", "toca": {"interval": 3}},
                                     {"preset": "lossless", "asymrnr": True}])
def test_a_budget_bounds_the_caches_with_one_warning(options):
    model, free, _ = run(options)
    unbounded = ditopt.stats(model)["generations"][-1]["peak_cache_mb"]
    budget = unbounded / 3
    model, outs, warned = run({**options, "max_cache_mb": budget})
    graph = next(g for g in ditopt.stats(model)["graphs"] if "shed" in g)
    assert graph["shed"] and len(warned) == 1 and graph["shed"][0] in warned[0]
    last = ditopt.stats(model)["generations"][-1]
    assert last["cache_mb"] <= budget
    assert all(torch.isfinite(o).all() for o in outs)


def test_a_budget_the_caches_keep_changes_nothing():
    model, free, _ = run({"preset": "quality"})
    model, outs, warned = run({"preset": "quality", "max_cache_mb": 1000})
    assert warned == [] and ditopt.stats(model)["graphs"][-1]["shed"] == []
    for a, b in zip(outs, free):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_max_cache_mb_is_checked():
    with pytest.raises(ValueError, match="max_cache_mb"):
        ditopt.Config.from_options({"max_cache_mb": -1})
