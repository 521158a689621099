"""Step clock, streams, generations, reset, stats; no recompilation over a sampling loop."""

import pytest
import torch
from torch._dynamo.utils import counters

import ditopt
from ditopt.runtime import StepClock
from ditopt.harness.stdit import STDiT

from conftest import compile_ditopt


def _model():
    torch.manual_seed(0)
    model = STDiT(dim=32, heads=2, depth=1, caption_dim=16).eval()
    return model, torch.randn(1, 4, 3, 8, 8), torch.randn(1, 5, 16)


def test_clock_separates_cond_and_uncond_calls_into_streams():
    clock = StepClock()
    seen = [(clock.observe(t).index, clock.streams[0].step) for t in (900.0, 900.0, 800.0, 800.0)]
    assert [s for s, _ in seen] == [0, 1, 0, 1]
    assert clock.streams[0].step == 1 and clock.streams[1].step == 1


def test_clock_starts_a_generation_when_timestep_does_not_decrease():
    clock = StepClock()
    for t in (900.0, 500.0, 100.0, 900.0, 500.0):
        stream = clock.observe(t)
    assert stream.generation == 1 and stream.step == 1
    assert [g.steps for g in clock.all_stats()] == [3, 2]


def test_reset_starts_fresh_generations():
    clock = StepClock()
    clock.observe(900.0)
    clock.observe(800.0)
    clock.reset()
    stream = clock.observe(700.0)  # would continue the old generation without reset
    assert stream.step == 0 and len(clock.all_stats()) == 2


def test_fifty_step_loop_never_recompiles_and_counts_steps():
    model, x, y = _model()
    compiled = compile_ditopt(model)
    counters.clear()
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for t in torch.linspace(999, 0, 50):
            compiled(x, t.reshape(1), y)
            compiled(x, t.reshape(1), torch.zeros_like(y))  # separate uncond call
    assert counters["stats"]["unique_graphs"] == 1
    stats = ditopt.stats(model)
    gens = stats["generations"]
    assert [(g["stream"], g["steps"]) for g in gens] == [(0, 50), (1, 50)]
    assert all(g["blocks_computed"] == 50 * 2 for g in gens)


def test_stats_and_reset_accept_the_compiled_wrapper():
    model, x, y = _model()
    compiled = compile_ditopt(model)
    with torch.no_grad():
        compiled(x, torch.tensor([900.0]), y)
        ditopt.reset(compiled)
        compiled(x, torch.tensor([800.0]), y)
    assert [g["generation"] for g in ditopt.stats(compiled)["generations"]] == [0, 0]
    assert len(ditopt.stats(compiled)["generations"]) == 2


def test_generation_context_manager_resets_on_entry():
    model, x, y = _model()
    compiled = compile_ditopt(model)
    with torch.no_grad():
        compiled(x, torch.tensor([900.0]), y)
        with ditopt.generation(compiled):
            compiled(x, torch.tensor([800.0]), y)
    assert [g["steps"] for g in ditopt.stats(model)["generations"]] == [1, 1]


def test_stats_of_a_model_ditopt_never_saw_is_empty():
    model, _, _ = _model()
    assert ditopt.stats(model) == {"graphs": [], "generations": [], "fallbacks": [], "compiled_variants": 0}
