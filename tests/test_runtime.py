"""Step clock, streams, generations, reset, stats; no recompilation over a sampling loop."""

import pytest
import torch
from torch._dynamo.utils import counters

import ditopt
import ditopt.shapes
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


def test_clock_names_streams_by_cache_context_whatever_the_call_order():
    clock = StepClock()
    order = [(900.0, "cond"), (900.0, "uncond"), (800.0, "uncond"), (800.0, "cond"), (700.0, "cond")]
    seen = [(clock.observe(t, name).name, clock.streams[name].step) for t, name in order]
    assert seen == [("cond", 0), ("uncond", 0), ("uncond", 1), ("cond", 1), ("cond", 2)]
    assert clock.streams["cond"].index == 0 and clock.streams["uncond"].index == 1


def test_streams_come_from_diffusers_cache_context():
    """A Wan transformer called cond / uncond in an order that changes each step: each named stream
    takes the decisions it takes when it is called alone, which counting calls cannot give."""
    from ditopt.harness import models

    case = models.build("wan")
    options = {"lowering": "eager", "adacache": {"codebook": {0.5: 2, 1e9: 3}, "joint_streams": False}}
    cond, uncond = case.inputs(1), case.inputs(1)
    uncond["encoder_hidden_states"] = torch.zeros_like(uncond["encoder_hidden_states"])

    def loop(fn, streams, model=case.model):
        outs = {name: [] for name, _ in streams}
        with torch.no_grad():
            for i, t in enumerate(torch.linspace(999, 0, 8)):
                for name, inputs in (streams if i % 2 == 0 else streams[::-1]):
                    with model.cache_context(name):
                        outs[name].append(models.call(fn, {**inputs, "timestep": t.reshape(1)}))
        return outs

    both = loop(torch.compile(case.model, backend="ditopt", options=options), [("cond", cond), ("uncond", uncond)])
    gens = ditopt.stats(case.model)["generations"]
    assert sorted(g["name"] for g in gens) == ["cond", "uncond"] and all(g["steps"] == 8 for g in gens)
    assert any(g["blocks_skipped"] > 0 for g in gens)
    torch._dynamo.reset()
    alone = models.build("wan").model  # the same weights
    for name, inputs in [("cond", cond), ("uncond", uncond)]:
        ref = loop(torch.compile(alone, backend="ditopt", options=options), [(name, inputs)], alone)[name]
        assert all(torch.equal(a, b) for a, b in zip(both[name], ref)), name
        ditopt.reset(alone)


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


# --- shape changes under torch.compile's default dynamic=None ---------------------------


def _shaped_calls(fn, model, shapes, steps, y):
    """A short sampling loop per (frames, batch); returns (max difference to eager, per shape)."""
    diffs = []
    for frames, batch in shapes:
        torch.manual_seed(frames * 10 + batch)
        x = torch.randn(batch, 4, frames, 8, 8)
        ref = x.clone()
        yb = y.expand(batch, -1, -1)
        with torch.no_grad():
            for t in torch.linspace(999, 0, steps):
                tb = t.expand(batch).clone()
                x = x - fn(x, tb, yb) / steps
                ref = ref - model(ref, tb, yb) / steps
        diffs.append(float((x - ref).abs().max()))
    return diffs


def test_frame_count_and_batch_changes_stay_accelerated_and_exact():
    model, _, y = _model()
    shapes = [(3, 1), (5, 1), (3, 1), (3, 2), (3, 1)]
    diffs = _shaped_calls(compile_ditopt(model), model, shapes, 2, y)
    assert max(diffs) <= 1e-5, diffs
    s = ditopt.stats(model)
    assert s["fallbacks"] == []
    runtimes = [r for r in ditopt.runtime.runtimes_of(model) if isinstance(r, ditopt.runtime.Runtime)]
    assert {len(r.structure.blocks) for r in runtimes} == {2}  # every shape: both blocks accelerated
    assert sum(g["steps"] for g in s["generations"]) == 2 * len(shapes)  # every call ran through a runtime
    dynamic = [g for g in s["graphs"] if g.get("dynamic")]
    assert dynamic and all(g["shapes_specialised"] <= ditopt.shapes.MAX_SHAPES for g in dynamic)


def test_a_skip_preset_keeps_skipping_after_a_shape_change():
    model, _, y = _model()
    fn = compile_ditopt(model, adacache={"codebook": {1e9: 3}})
    _shaped_calls(fn, model, [(3, 1), (5, 1), (3, 1)], 8, y)
    gens = ditopt.stats(model)["generations"]
    assert len(gens) == 3 and all(g["blocks_skipped"] > 0 for g in gens)


@pytest.mark.parametrize("family", ["wan", "cogvideox"])  # CogVideoX writes its position embedding in place
def test_diffusers_models_stay_exact_across_frame_counts(family):
    from ditopt.harness import models

    case = models.build(family)
    fn = compile_ditopt(case.model)
    frames_dim = 2 if family == "wan" else 1
    for frames in (3, 5, 3):
        inputs = case.inputs(1)
        shape = list(inputs["hidden_states"].shape)
        shape[frames_dim] = frames
        inputs["hidden_states"] = torch.randn(shape)
        with torch.no_grad():
            assert torch.equal(models.call(fn, inputs), models.call(case.model, inputs))
    assert ditopt.stats(case.model)["fallbacks"] == []


def test_apply_compiles_a_pipelines_transformer_with_checked_options():
    from types import SimpleNamespace

    from ditopt.harness import models

    case = models.build("wan")
    with pytest.raises(ValueError, match="unknown option"):
        ditopt.apply(SimpleNamespace(transformer=case.model), options={"presett": "fast"})
    with pytest.raises(ValueError, match="has no transformer"):
        ditopt.apply(SimpleNamespace(unet=case.model))
    pipe = ditopt.apply(SimpleNamespace(transformer=case.model, vae=None), preset="lossless",
                        options={"lowering": "eager"})
    with torch.no_grad():
        out = models.call(pipe.transformer, case.inputs(1))
        assert torch.equal(out, models.call(case.model, case.inputs(1)))
    assert len(ditopt.stats(case.model)["generations"]) == 1


def test_calibrate_a_pipeline_from_its_own_call_and_leave_it_as_it_was():
    from ditopt.harness import models

    case = models.build("wan")

    class Pipe:  # the part of a diffusers pipeline calibrate relies on: a transformer, called by __call__
        transformer = case.model

        def __call__(self, num_inference_steps):
            inputs = case.inputs(1)
            with torch.no_grad():
                for t in torch.linspace(999, 0, num_inference_steps):
                    with self.transformer.cache_context("cond"):
                        out = models.call(self.transformer, {**inputs, "timestep": t.reshape(1)})
                    inputs["hidden_states"] = inputs["hidden_states"] - out / num_inference_steps

    pipe = Pipe()
    result = ditopt.calibrate(pipe, 2.0, num_inference_steps=12)
    assert pipe.transformer is case.model
    assert len(result["metrics"]) == 12 and 1.5 <= result["predicted_speedup"] <= 2.5
    assert all(isinstance(k, float) and v >= 1 for k, v in result["codebook"].items())
    with pytest.raises(ValueError, match="has no module"):
        ditopt.calibrate(pipe, 2.0, component="unet")
