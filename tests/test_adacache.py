"""AdaCache: skip guards, the decision policy against the reference formula, streams, calibration."""

import math
from contextlib import nullcontext

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.utils import counters

import ditopt
from ditopt.harness import models
from ditopt.passes.adacache import (
    CODEBOOKS, calibrate_from_metrics, codebook_for_scale, decisions_from_metrics, motion_score, next_rate,
)
from ditopt.analysis import analyze
from ditopt.harness.bench import euler_loop
from ditopt.config import Config
from ditopt.passes.pipeline import run_pipeline
from ditopt.harness.stdit import STDiT

from conftest import capture_graphs, compile_ditopt

NEVER = {math.inf: 1}
ALWAYS_SKIP = {math.inf: 1000}


def _stdit(depth=2, seed=0):
    torch.manual_seed(seed)
    return STDiT(dim=32, heads=2, depth=depth, caption_dim=16).eval()


def _loop(model_fn, x, y, steps=12):
    outs = []
    with torch.no_grad():
        for t in torch.linspace(999, 0, steps):
            out = model_fn(x, t.reshape(1), y)
            outs.append(out)
            x = x - out / steps
    return x, outs


# --- the pass ---------------------------------------------------------------


# CogVideoX (no RoPE) never reads the text stream after its last block: one stream to cache, not two.
@pytest.mark.parametrize("family, spans, streams", [("stdit", 1, 1), ("cogvideox", 1, 1), ("latte", 4, 1),
                                                    ("wan", 1, 1)])
def test_pass_guards_spans_and_their_streams(family, spans, streams):
    case = models.build(family)
    gm = capture_graphs(case.model, case.inputs())[0]
    cfg = Config.from_options({"adacache": True, "lowering": "eager"})
    gm, structure, reports = run_pipeline(gm, cfg)
    report = reports["adacache"]
    assert len(report["spans"]) == spans and report["rejected"] == []
    assert all(s["streams"] == streams for s in report["spans"])
    guards = [n for n in gm.graph.nodes if n.target is torch.ops.ditopt.skip_guard.default]
    assert len(guards) == report["guards"] == spans * streams
    assert report["probe"] is not None


def test_probe_is_the_middle_temporal_attention_when_there_is_one():
    model = _stdit(depth=3)
    inputs = dict(x=torch.randn(1, 4, 3, 8, 8), timestep=torch.tensor([10.0]), y=torch.randn(1, 5, 16))
    gm = capture_graphs(model, inputs)[0]
    _, _, reports = run_pipeline(gm, Config.from_options({"adacache": True}))
    assert reports["adacache"]["probe"].startswith("temporal_blocks.1: temporal_blocks.1.attn (self, temporal)")


# --- equivalences -------------------------------------------------------------


@settings(max_examples=4, deadline=None)
@given(depth=st.integers(1, 3), frames=st.integers(2, 4), seed=st.integers(0, 100))
def test_codebook_that_never_skips_equals_full_compute(depth, frames, seed):
    torch._dynamo.reset()
    model = _stdit(depth, seed)
    x, y = torch.randn(1, 4, frames, 8, 8), torch.randn(1, 5, 16)
    expected, _ = _loop(model, x, y)
    actual, _ = _loop(compile_ditopt(model, adacache={"codebook": NEVER}), x, y)
    assert torch.equal(actual, expected)
    (gen,) = ditopt.stats(model)["generations"]
    assert gen["blocks_skipped"] == 0 and set(gen["adacache"]["decisions"]) == {"C"}


def test_skipped_step_output_is_input_plus_cached_residual():
    model = _stdit(depth=2)
    x, y = torch.randn(1, 4, 3, 8, 8), torch.randn(1, 5, 16)
    compiled = compile_ditopt(model, adacache={"codebook": ALWAYS_SKIP, "last_steps": 0})
    ts = [torch.tensor([900.0]), torch.tensor([800.0]), torch.tensor([700.0])]
    with torch.no_grad():
        compiled(x, ts[0], y)
        compiled(x, ts[1], y)  # second computed step: stores the residual of all blocks
        skipped = compiled(x, ts[2], y)
        # expected, by hand from the model's parts: residual of the block stack at step 1, replayed at step 2
        residual = _blocks(model, x, ts[1], y)[1] - _blocks(model, x, ts[1], y)[0]
        expected = _head(model, x, ts[2], _blocks(model, x, ts[2], y)[0] + residual)
    assert ditopt.stats(model)["generations"][0]["adacache"]["decisions"] == "CCS"
    torch.testing.assert_close(skipped, expected, rtol=1e-5, atol=1e-5)


def test_forecast_extrapolates_the_residual_in_the_timestep():
    """forecast=1: a skipped step adds the line through the last two computed residuals, at its own t."""
    model = _stdit(depth=2)
    x, y = torch.randn(1, 4, 3, 8, 8), torch.randn(1, 5, 16)
    compiled = compile_ditopt(model, adacache={"codebook": ALWAYS_SKIP, "last_steps": 0, "forecast": 1})
    ts = [torch.tensor([900.0]), torch.tensor([800.0]), torch.tensor([600.0])]
    with torch.no_grad():
        compiled(x, ts[0], y)
        compiled(x, ts[1], y)
        skipped = compiled(x, ts[2], y)
        r900, r800 = ((lambda b: b[1] - b[0])(_blocks(model, x, t, y)) for t in ts[:2])
        residual = r800 + (r800 - r900) * (600.0 - 800.0) / (800.0 - 900.0)
        expected = _head(model, x, ts[2], _blocks(model, x, ts[2], y)[0] + residual)
    assert ditopt.stats(model)["generations"][0]["adacache"]["decisions"] == "CCS"
    torch.testing.assert_close(skipped, expected, rtol=1e-4, atol=1e-4)


@settings(max_examples=40, deadline=None)
@given(degree=st.integers(1, 2), coefficients=st.lists(st.floats(-3, 3), min_size=3, max_size=3),
       gaps=st.lists(st.floats(1, 100), min_size=3, max_size=3), ahead=st.floats(1, 200))
def test_extrapolation_weights_reproduce_polynomials_of_their_degree(degree, coefficients, gaps, ahead):
    from ditopt.passes.skipping import extrapolation_weights

    ts = [1000.0 - sum(gaps[:i]) for i in range(degree + 1)]  # decreasing, as a sampler's timesteps
    t = ts[-1] - ahead
    p = lambda s: sum(c * (s / 1000) ** k for k, c in enumerate(coefficients[:degree + 1]))  # noqa: E731
    weights = extrapolation_weights(ts, t)
    assert sum(weights) == pytest.approx(1.0)
    assert sum(w * p(s) for w, s in zip(weights, ts)) == pytest.approx(p(t), abs=1e-6 * max(1, *map(abs, weights)))
    assert extrapolation_weights([5.0, 5.0], 1.0) is None


def _blocks(model, x, t, y):
    """(hidden states entering the first block, leaving the last block) of an STDiT call."""
    from ditopt.harness.stdit import timestep_embedding

    b, _, frames, height, width = x.shape
    h = model.x_embedder(x).flatten(2).transpose(1, 2)
    t_mod = model.t_block(model.t_embedder(timestep_embedding(t, model.dim)))
    ye = model.y_embedder(y)
    out = h
    for sb, tb in zip(model.spatial_blocks, model.temporal_blocks):
        out = tb(sb(out, ye, t_mod, frames, (height // 2) * (width // 2)), ye, t_mod, frames, (height // 2) * (width // 2))
    return h, out


def _head(model, x, t, hidden):
    from ditopt.harness.stdit import timestep_embedding

    b, _, frames, height, width = x.shape
    tt = model.t_embedder(timestep_embedding(t, model.dim))
    shift, scale = (model.final_table[None] + tt[:, None]).chunk(2, dim=1)
    out = model.final_proj(model.final_norm(hidden) * (1 + scale) + shift)
    hp, wp, p = height // 2, width // 2, model.patch
    out = out.view(b, frames, hp, wp, p, p, model.out_channels)
    return out.permute(0, 6, 1, 2, 4, 3, 5).reshape(b, model.out_channels, frames, height, width)


# --- decisions ----------------------------------------------------------------


def _reference_schedule(metrics_at, num_steps, codebook, first=2, last=2):
    """The reference's loop as methods.md states it: a countdown after each computed step."""
    out, countdown, prev_rate, cached = [], 0, 1, False
    for step in range(num_steps):
        compute = step < first or step >= num_steps - last or countdown <= 0
        if compute:
            if cached:
                metric = metrics_at(step, prev_rate) / prev_rate
                rate = 1
                for threshold in sorted(codebook):
                    if metric < threshold:
                        rate = codebook[threshold]
                        break
                else:
                    rate = codebook[sorted(codebook)[-1]]
            else:
                rate = 1
            cached, prev_rate, countdown = True, rate, rate
        countdown -= 1
        out.append(compute)
    return out


@settings(max_examples=200, deadline=None)
@given(metrics=st.lists(st.floats(0, 0.6), min_size=3, max_size=60),
       book=st.sampled_from(sorted(CODEBOOKS)))
def test_decisions_equal_the_reference_formula_on_recorded_metrics(metrics, book):
    def metric_at(step, rate):
        return metrics[step] * rate

    codebook = CODEBOOKS[book]
    assert decisions_from_metrics(metric_at, len(metrics), codebook) == _reference_schedule(
        metric_at, len(metrics), codebook)


def test_next_rate_uses_ascending_thresholds():
    book = CODEBOOKS["opensora-30-fast"]
    assert [next_rate(m, book) for m in (0.0, 0.079, 0.08, 0.2, 0.39, 0.41, 5.0)] == [6, 6, 5, 4, 2, 1, 1]


def test_runtime_decisions_follow_the_metrics_it_measured():
    model = _stdit(depth=1)
    x, y = torch.randn(1, 4, 3, 8, 8), torch.randn(1, 5, 16)
    codebook = {0.2: 3, 0.5: 2, math.inf: 1}
    _loop(compile_ditopt(model, adacache={"codebook": codebook, "num_steps": 20}), x, y, steps=20)
    (gen,) = ditopt.stats(model)["generations"]
    measured = iter(gen["adacache"]["metrics"][1:])  # metrics at computed steps after the first
    recorded = {}

    def metric_at(step, rate):
        recorded[step] = next(measured)
        return recorded[step] * rate

    plan = decisions_from_metrics(metric_at, 20, codebook)
    assert "".join("C" if c else "S" for c in plan) == gen["adacache"]["decisions"]
    assert gen["blocks_skipped"] == 2 * plan.count(False)


def test_streams_and_generations_never_share_state():
    model = _stdit(depth=1)
    x, y = torch.randn(1, 4, 3, 8, 8), torch.randn(1, 5, 16)
    options = {"codebook": {0.3: 3, math.inf: 1}}
    alone = compile_ditopt(model, adacache=options)
    cond_alone, _ = _loop(alone, x, y)
    torch._dynamo.reset()
    ditopt.reset(model)
    both = compile_ditopt(model, adacache=options)
    outs = []
    with torch.no_grad():
        xc, xu = x.clone(), x.clone()
        for t in torch.linspace(999, 0, 12):
            oc = both(xc, t.reshape(1), y)  # stream 0
            ou = both(xu, t.reshape(1), torch.zeros_like(y))  # stream 1, same timestep
            xc, xu = xc - oc / 12, xu - ou / 12
    assert torch.equal(xc, cond_alone)  # the uncond stream did not disturb the cond stream
    second, _ = _loop(both, x, y)  # a new generation: no stale cache from the first
    assert torch.equal(second, cond_alone)


def test_fifty_steps_with_skipping_never_recompile():
    model = _stdit(depth=1)
    x, y = torch.randn(1, 4, 3, 8, 8), torch.randn(1, 5, 16)
    compiled = compile_ditopt(model, adacache={"codebook": {0.5: 4, math.inf: 2}})
    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        _loop(compiled, x, y, steps=50)
    assert counters["stats"]["unique_graphs"] == 1
    assert ditopt.stats(model)["generations"][0]["blocks_skipped"] > 0


# --- MoReg and calibration ------------------------------------------------------


def test_motion_score_is_zero_for_static_and_positive_for_moving_residuals():
    static = torch.randn(2, 1, 5, 8).expand(2, 3, 5, 8).reshape(2, 15, 8)
    assert motion_score(static, frames=3).item() == 0.0
    assert motion_score(torch.randn(2, 15, 8), frames=3).item() > 0.2


def test_motion_score_is_the_reference_single_ratio_over_frame_shifted_residuals():
    r = torch.zeros(1, 3, 2)  # 3 frames of 1 token, 2 channels
    r[0, 0], r[0, 1], r[0, 2] = torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0]), torch.tensor([9.0, 9.0])
    # |r1 - r0| + |r2 - r1| = 0 + 16; |r1| + |r2| + |r0| + |r1| = 2 + 18 + 2 + 2 = 24
    assert motion_score(r.reshape(1, 3, 2), frames=3).item() == pytest.approx(16 / 24)
    # a mean of per-pair ratios (0 and 16/20) would be 0.4: the quiet pair would weigh as much as the loud one
    assert motion_score(r.reshape(1, 3, 2), frames=3).item() != pytest.approx(0.4)


def test_synced_probe_blocks_average_their_metrics():
    torch.manual_seed(0)
    x, y = torch.randn(1, 4, 3, 8, 8), torch.randn(1, 5, 16)
    metrics = {}
    for blocks in ((0,), (1,), (0, 1)):
        model = _stdit(depth=1)  # one spatial and one temporal block: block indices 0 and 1
        torch._dynamo.reset()
        _loop(compile_ditopt(model, adacache={"codebook": NEVER, "probe_blocks": blocks}), x, y)
        metrics[blocks] = ditopt.stats(model)["generations"][-1]["adacache"]["metrics"]
    for m0, m1, both in zip(metrics[(0,)][1:], metrics[(1,)][1:], metrics[(0, 1)][1:]):
        assert both == pytest.approx((m0 + m1) / 2, rel=1e-3, abs=1e-5)
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="probe_blocks .*out of range"):
        _loop(compile_ditopt(_stdit(depth=1), adacache={"probe_blocks": (7,)}), x, y)


def test_moreg_changes_the_metric_and_needs_frames():
    model = _stdit(depth=1)
    x, y = torch.randn(1, 4, 3, 8, 8), torch.randn(1, 5, 16)
    _loop(compile_ditopt(model, adacache={"moreg": True, "codebook": NEVER}), x, y)
    with_moreg = ditopt.stats(model)["generations"][0]["adacache"]["metrics"]
    torch._dynamo.reset()
    ditopt.reset(model)
    _loop(compile_ditopt(model, adacache={"moreg": False, "codebook": NEVER}), x, y)
    plain = ditopt.stats(model)["generations"][-1]["adacache"]["metrics"]
    assert with_moreg[0] is None and with_moreg[1:] != plain[1:]
    pix = models.build("pixart")  # one frame: no motion to measure
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="moreg needs video"):  # Dynamo wraps it
        models.call(compile_ditopt(pix.model, adacache={"moreg": True}), pix.inputs())


@settings(max_examples=30, deadline=None)
@given(metrics=st.lists(st.floats(0.01, 0.5), min_size=20, max_size=50), target=st.floats(1.2, 3.0))
def test_calibrated_codebook_reaches_about_the_target(metrics, target):
    codebook, predicted = calibrate_from_metrics(metrics, target)
    assert list(codebook.values()) == [6, 5, 4, 3, 2, 1]
    n = len(metrics)
    best = n / (2 + 2 + math.ceil((n - 4) / 6))  # most skipping the codebook family allows
    assert predicted >= min(target, best) - 1e-9 or predicted >= best * 0.75


def test_codebook_for_scale_is_the_reference_shape():
    assert codebook_for_scale(0.08) == CODEBOOKS["opensora-30-fast"]


# --- the TeaCache policy on the same guards -------------------------------------


def test_teacache_region_split_and_probe():
    model = _stdit(depth=2)
    x, y = torch.randn(1, 4, 3, 8, 8), torch.randn(1, 5, 16)
    compiled = compile_ditopt(model, teacache={"threshold": 1e-9}, invariants=False)  # the regions TeaCache cuts
    expected, _ = _loop(model, x, y)
    actual, _ = _loop(compiled, x, y)
    assert torch.equal(actual, expected)  # a threshold nothing stays under: never skips
    (rt,) = ditopt.runtime.runtimes_of(model)
    kinds = [(r.kind, r.block) for r in rt.regions]
    assert kinds[:3] == [("prologue", None), ("block", 0), ("block", 0)]  # block 0 cut after the probe
    (hook,) = rt.hooks
    assert hook.spans[0].decide_at == 2  # the decision waits for region 1, which ends at the probe
    (gen,) = ditopt.stats(model)["generations"]
    assert gen["blocks_computed"] == 4 * 12 and gen["teacache"]["decisions"] == "C" * 12


@settings(max_examples=100, deadline=None)
@given(changes=st.lists(st.floats(0, 0.3), min_size=3, max_size=40), threshold=st.floats(0.01, 1.0))
def test_teacache_decisions_accumulate_until_the_threshold(changes, threshold):
    from ditopt.passes.teacache import teacache_decisions

    seq = [None, *changes]
    plan = teacache_decisions(seq, threshold, (1.0, 0.0), first_steps=1, last_steps=1)
    acc = 0.0
    for s, (change, compute) in enumerate(zip(seq, plan)):
        if s == 0 or s == len(seq) - 1:
            assert compute
            acc = 0.0
            continue
        acc += change
        assert compute == (acc >= threshold)
        if compute:
            acc = 0.0


def test_teacache_runtime_follows_its_recorded_changes():
    from ditopt.passes.teacache import teacache_decisions

    model = _stdit(depth=1)
    x, y = torch.randn(1, 4, 3, 8, 8), torch.randn(1, 5, 16)
    _loop(compile_ditopt(model, teacache={"threshold": 0.4, "num_steps": 12}), x, y)
    (gen,) = ditopt.stats(model)["generations"]
    plan = teacache_decisions(gen["teacache"]["changes"], 0.4, (1.0, 0.0), first_steps=2, last_steps=2)
    assert gen["teacache"]["decisions"] == "".join("C" if c else "S" for c in plan)
    assert "S" in gen["teacache"]["decisions"]


# --- a block whose attention ditopt cannot rewrite still gets guards ---------------


def test_linear_attention_blocks_get_skip_guards_and_skip_steps():
    from linear_dit import LinearDiT

    torch.manual_seed(0)
    model = LinearDiT().eval()
    x = torch.randn(1, 4, 3, 8, 8)

    def loop(fn, steps=10):
        out = x
        with torch.no_grad():
            for t in torch.linspace(999, 0, steps):
                out = out - fn(out, t.reshape(1)) / steps
        return out

    expected = loop(model)
    assert torch.allclose(loop(compile_ditopt(model)), expected, atol=1e-5)  # lossless
    torch._dynamo.reset()
    structure = analyze(capture_graphs(model, dict(x=x, timestep=torch.tensor([999.0])))[0])
    assert [a.kind for b in structure.blocks for a in b.attention] == ["linear"] * 3
    ditopt.reset(model)
    torch._dynamo.reset()
    with pytest.warns(UserWarning, match="toca is on but|asymrnr is on but") as warned:
        fn = compile_ditopt(model, adacache={"codebook": {1e9: 3}}, asymrnr=True)
        loop(fn)
    assert any("blocks.0.attn, blocks.1.attn, blocks.2.attn: linear attention" in str(w.message) for w in warned)
    gen = ditopt.stats(model)["generations"][-1]
    assert gen["blocks_skipped"] > 0 and "S" in gen["adacache"]["decisions"]
    (rt,) = ditopt.runtime.runtimes_of(model)
    assert "output residual" in rt.report["adacache"]["probe"]


def test_linear_attention_guarded_loop_cuts_flops_below_0_8():
    from linear_dit import LinearDiT

    from ditopt.runtime import count_flops

    torch.manual_seed(0)
    model = LinearDiT(depth=4).eval()
    x = torch.randn(1, 4, 3, 8, 8)

    def flops(options):
        torch._dynamo.reset()
        ditopt.reset(model)
        fn = compile_ditopt(model, **options)
        out = x
        with torch.no_grad(), count_flops() as tally:
            for t in torch.linspace(999, 0, 10):
                out = out - fn(out, t.reshape(1)) / 10
        return tally.flops

    assert flops({"adacache": {"codebook": {1e9: 3}}}) < 0.8 * flops({})


def test_calibrate_checks_its_target_and_leaves_other_compiled_models_alone(monkeypatch):
    from ditopt.passes.adacache import calibrate

    model, other = _stdit(depth=2), _stdit(depth=1, seed=3)
    x, y = torch.randn(1, 4, 3, 8, 8), torch.randn(1, 5, 16)
    other_fn = compile_ditopt(other)
    _loop(other_fn, x, y)
    monkeypatch.setattr(torch._dynamo, "reset", lambda: pytest.fail("calibrate reset Dynamo for every model"))
    with pytest.raises(ValueError, match="a speed-up"):
        calibrate(model, lambda fn: _loop(fn, x, y), target_speedup=0)
    result = calibrate(model, lambda fn: _loop(fn, x, y), target_speedup=2.0)
    assert len(result["metrics"]) == 12 and result["predicted_speedup"] > 1.0
    with torch._dynamo.config.patch(error_on_recompile=True):
        _loop(other_fn, x, y)  # the other model's compiled code is still there


def test_separate_cond_and_uncond_calls_take_one_decision_per_step():
    model = _stdit(depth=2)
    x, y_cond, y_uncond = torch.randn(1, 4, 3, 8, 8), torch.randn(1, 5, 16), torch.zeros(1, 5, 16)
    fn = compile_ditopt(model, adacache={"codebook": {0.33: 2, math.inf: 1}})  # metrics here: 0.29 to 0.37
    with torch.no_grad():
        for t in torch.linspace(999, 0, 12):
            cond, uncond = fn(x, t.reshape(1), y_cond), fn(x, t.reshape(1), y_uncond)  # two streams
            x = x - (uncond + 2.0 * (cond - uncond)) / 12
    gens = sorted(ditopt.stats(model)["generations"], key=lambda g: g["stream"])
    assert [g["stream"] for g in gens] == [0, 1]
    assert gens[0]["adacache"]["decisions"] == gens[1]["adacache"]["decisions"]
    assert "S" in gens[1]["adacache"]["decisions"] and gens[1]["blocks_skipped"] == gens[0]["blocks_skipped"]


def test_separate_cond_and_uncond_calls_decide_what_the_batched_call_decides():
    from ditopt.harness import fixture

    model = fixture.load_fixture()
    prompts = list(fixture.PROMPTS[:2])
    outs, gens = {}, {}
    for batched in (True, False):
        torch._dynamo.reset()
        ditopt.reset(model)
        fn = torch.compile(model, backend="ditopt", options={"preset": "balanced", "lowering": "eager"})
        outs[batched] = fixture.sample(fn, prompts, seed=2, steps=20, cfg_batched=batched)
        gens[batched] = sorted(ditopt.stats(model)["generations"], key=lambda g: g["stream"])
    (batched,), (cond, uncond) = gens[True], gens[False]
    assert "S" in batched["adacache"]["decisions"]
    assert cond["adacache"]["decisions"] == uncond["adacache"]["decisions"] == batched["adacache"]["decisions"]
    # the lead stream's metric is the batched call's: the change of both streams' probes together (but at the
    # last step, which no later step re-decides: it decides nothing)
    assert cond["adacache"]["metrics"][1:-1] == pytest.approx(batched["adacache"]["metrics"][1:-1], rel=1e-4)
    assert cond["adacache"]["metrics"][-1] != pytest.approx(batched["adacache"]["metrics"][-1], rel=1e-4)
    assert (outs[False] - outs[True]).abs().max() < 1e-2  # the same schedule: float noise of batched matmuls


@settings(max_examples=6, deadline=None)
@given(first=st.integers(0, 3), last=st.integers(0, 3), method=st.sampled_from(["adacache", "teacache"]))
def test_compute_first_and_last_leave_those_blocks_computed(first, last, method):
    """DBCache's Fn / Bn: the first and last blocks of the run always compute; a skipped step skips exactly the
    blocks between, and when none are left the method says why instead of skipping."""
    from convention_dit import ConventionDiT

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = ConventionDiT(depth=4).eval()
    settings_ = {"compute_first": first, "compute_last": last}
    settings_.update({"codebook": ALWAYS_SKIP} if method == "adacache" else {"threshold": 1e9})
    fn = compile_ditopt(model, **{method: settings_})
    x, ctx = torch.randn(1, 4, 2, 8, 8), torch.randn(1, 5, 16)
    said = pytest.warns(UserWarning, match="leave none of its 4 blocks") if first + last >= 4 else nullcontext()
    with torch.no_grad(), said:
        for t in torch.linspace(999, 0, 6):
            fn(x=x, text=ctx, t=t.reshape(1))
    (gen,) = ditopt.stats(model)["generations"]
    span = list(range(first, 4 - last))
    report = [r for r in ditopt.runtime.runtimes_of(model) if hasattr(r, "report")][-1].report[method]
    if not span:
        assert report["spans"] == [] and "leave none of its 4 blocks" in report["rejected"][0]["reason"]
        assert gen["blocks_skipped"] == 0
    else:
        assert [s["blocks"] for s in report["spans"]] == [span]
        skipped_steps = gen[method]["decisions"].count("S")
        assert skipped_steps > 0 and gen["blocks_skipped"] == skipped_steps * len(span)


@given(metrics=st.lists(st.floats(0.01, 0.6), min_size=6, max_size=40), scale=st.floats(0.05, 20.0))
def test_relative_thresholds_decide_the_same_whatever_the_scale_of_the_change(metrics, scale):
    """relative=True: a model whose changes run k times larger (or smaller) gets the same schedule."""
    book = CODEBOOKS["opensora-30-fast"]

    def at(series):
        return lambda step, rate: series[step] * rate

    scaled = [m * scale for m in metrics]
    same = decisions_from_metrics(at(metrics), len(metrics), book, relative=True)
    assert decisions_from_metrics(at(scaled), len(metrics), book, relative=True) == same


def test_relative_metrics_are_the_changes_over_the_first_one_and_drive_the_codebook():
    model = _stdit(depth=2)
    x, y = torch.randn(1, 4, 3, 8, 8), torch.randn(1, 5, 16)
    _loop(compile_ditopt(model, adacache={"codebook": NEVER, "last_steps": 0}), x, y)
    absolute = ditopt.stats(model)["generations"][-1]["adacache"]["metrics"]
    torch._dynamo.reset()
    ditopt.reset(model)
    book = {0.95: 3, math.inf: 1}  # a change below 95% of the first one computes every third step
    _loop(compile_ditopt(model, adacache={"codebook": book, "relative": True}), x, y)
    gen = ditopt.stats(model)["generations"][-1]["adacache"]
    first_skip = gen["decisions"].index("S")
    assert first_skip > 2  # the steps before it computed as the always-computing run did
    for got, full in zip(gen["metrics"][1:first_skip], absolute[1:first_skip]):
        assert got == pytest.approx(full / absolute[1], rel=1e-3)
    assert next_rate(gen["metrics"][first_skip - 1], book) == 3


@settings(max_examples=4, deadline=None)
@given(span_blocks=st.integers(1, 4), first=st.integers(0, 1))
def test_span_blocks_give_each_span_its_own_probe_and_schedule(span_blocks, first):
    """span_blocks=n: spans of at most n blocks, each skipped on the decisions its own probe makes; the blocks a
    generation skipped are exactly each span's skipped steps times its size."""
    from convention_dit import ConventionDiT

    torch._dynamo.reset()
    torch.manual_seed(1)
    model = ConventionDiT(depth=4).eval()
    fn = compile_ditopt(model, adacache={"codebook": {0.5: 3, math.inf: 1}, "span_blocks": span_blocks,
                                         "compute_first": first})
    x, ctx = torch.randn(1, 4, 2, 8, 8), torch.randn(1, 5, 16)
    with torch.no_grad():
        for t in torch.linspace(999, 0, 12):
            fn(x=x, text=ctx, t=t.reshape(1))
    report = [r for r in ditopt.runtime.runtimes_of(model) if hasattr(r, "report")][-1].report["adacache"]
    blocks = list(range(first, 4))
    expected = [blocks[i:i + span_blocks] for i in range(0, len(blocks), span_blocks)]
    assert [s["blocks"] for s in report["spans"]] == expected
    assert report["probe"].count("span [") == len(expected)
    (gen,) = ditopt.stats(model)["generations"]
    per_span = gen["adacache"]["span_decisions"]
    assert gen["blocks_skipped"] == sum(per_span[str(i)].count("S") * len(s) for i, s in enumerate(expected))
    assert gen["blocks_skipped"] > 0
