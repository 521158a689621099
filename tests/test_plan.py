"""`ditopt plan`: real configurations on the meta device, through ditopt's analysis, passes and lowering."""

from __future__ import annotations

import pytest
import torch

from ditopt.harness import plan

SCHEDULE = {"fast": "CCSSCSSCSS" * 5, "balanced": "CCSCSCSCSC" * 5}


@pytest.fixture(scope="module")
def wan_1_3b():
    return plan.plan("wan2.1-1.3b-480p", presets=("lossless", "balanced", "fast"), decisions=SCHEDULE)


def test_wan_1_3b_counts_566_tflop_per_call_as_flop_counter_mode_does(wan_1_3b):
    """Within 2% of FlopCounterMode on the meta model, counted here on its own."""
    from torch.utils.flop_counter import FlopCounterMode

    model, inputs = plan.build("wan2.1-1.3b-480p")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**inputs)
    assert wan_1_3b.call.total == pytest.approx(counter.get_total_flops(), rel=0.02)
    assert 560e12 < wan_1_3b.call.total < 572e12
    assert len(wan_1_3b.blocks) == 30 and sum(t for t, _ in wan_1_3b.call.per_block) < wan_1_3b.call.total


def test_preset_flops_follow_their_schedule_exactly(wan_1_3b):
    call, spans = wan_1_3b.call, wan_1_3b.spans
    skippable = sum(call.per_block[b][0] for s in spans for b in s)
    fast = wan_1_3b.presets["fast"]
    skips = SCHEDULE["fast"].count("S")
    assert fast["flops"] == 50 * call.total - skips * skippable
    assert wan_1_3b.presets["lossless"]["flops"] == 50 * call.total
    assert wan_1_3b.presets["lossless"]["flop_ratio"] == 1.0 > fast["flop_ratio"]


def test_plan_reports_memory_time_and_lowering(wan_1_3b):
    fast = wan_1_3b.presets["fast"]
    assert fast["cache_mb"]["adacache"] > 0 and fast["cache_mb"]["invariants"] > 0
    assert fast["fits"] == {"H100": True, "H200": True}
    h100, h200 = fast["seconds"]["H100"], fast["seconds"]["H200"]
    assert h100["total_s"] == pytest.approx(h100["gemm_s"] + h100["attention_s"], abs=0.02)
    assert h200["total_s"] <= h100["total_s"] and h100["total_s"] < wan_1_3b.presets["lossless"]["seconds"]["H100"]["total_s"]
    assert wan_1_3b.regions >= 30 and 1 <= wan_1_3b.compiled_variants < wan_1_3b.regions


def test_a_cache_budget_is_kept_in_the_plan():
    budget = 700.0
    p = plan.plan("wan2.1-1.3b-480p", presets=("fast",), decisions=SCHEDULE, max_cache_mb=budget)
    fast = p.presets["fast"]
    assert sum(fast["cache_mb"].values()) <= budget and fast["shed"]


@pytest.mark.slow
def test_every_real_model_plans():
    for name in plan.MODELS:
        p = plan.plan(name, presets=("lossless", "fast"), decisions={"fast": "CCSSCSSCSS" * 5})
        assert p.blocks and p.presets["fast"]["flops"] < p.presets["lossless"]["flops"], name
