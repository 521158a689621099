"""Region fusion: runs of neighbouring regions no hook separates compile as one, with the same results."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ditopt
from ditopt.analysis import analyze
from ditopt.config import Config
from ditopt.harness import fixture
from ditopt.harness.stdit import STDiT
from ditopt.lowering import fuse_regions, lower
from ditopt.method import Hook
from ditopt.runtime import Runtime, runtimes_of

from conftest import capture_graphs, compile_ditopt


def _stdit(depth=3):
    torch.manual_seed(0)
    model = STDiT(dim=32, heads=2, depth=depth, caption_dim=16).eval()
    inputs = dict(x=torch.randn(1, 4, 3, 8, 8), timestep=torch.tensor([500.0]), y=torch.randn(1, 5, 16))
    return model, inputs


def _lowered(depth=3):
    model, inputs = _stdit(depth)
    gm = capture_graphs(model, inputs)[0]
    args = gm.example_inputs  # lowering changes the graph, not its inputs
    return lower(gm, analyze(gm)), args


@settings(max_examples=40, deadline=None)
@given(data=st.data(), mode=st.sampled_from(["block", "all"]))
def test_fused_runs_respect_cuts_claims_and_blocks(data, mode):
    lowered, _ = _LOWERED
    n = len(lowered.regions)
    cuts = data.draw(st.sets(st.integers(0, n)))
    unfusable = data.draw(st.sets(st.integers(0, n - 1)))
    fused = fuse_regions(lowered, cuts, unfusable, mode)
    covered = [i for r in fused.values() for i in range(r.index, r.last + 1)]
    assert len(covered) == len(set(covered))  # runs do not overlap
    for r in fused.values():
        members = range(r.index, r.last + 1)
        assert len(members) >= 2
        assert not set(members) & unfusable
        assert not set(members[1:]) & cuts
        if mode == "block":
            assert len({lowered.regions[i].block for i in members} - {None}) <= 1
        nodes = [n for i in members for n in lowered.regions[i].nodes]
        assert [n.name for n in r.nodes] == [n.name for n in nodes]
    # maximal: two neighbours left apart have a reason to be
    starts = {i: r for r in fused.values() for i in range(r.index, r.last + 1)}
    for i in range(1, n):
        a, b = starts.get(i - 1), starts.get(i)
        if a is not None and a is b:
            continue
        blocks = {lowered.regions[j].block for j in (range(a.index, a.last + 1) if a else [i - 1])} - {None}
        other_block = (mode == "block" and lowered.regions[i].block is not None
                       and bool(blocks - {lowered.regions[i].block}))
        assert i in cuts or i in unfusable or i - 1 in unfusable or other_block


_LOWERED = _lowered(3)


@pytest.mark.parametrize("mode", ["block", "all"])
def test_fusion_cuts_region_calls_and_keeps_lossless_output_identical(mode):
    model, inputs = _stdit(3)
    with torch.no_grad():
        expected = model(**inputs)
        calls = {}
        for m in ("none", mode):
            torch._dynamo.reset()
            compiled = compile_ditopt(model, fuse_regions=m)
            out = compiled(**inputs)
            assert torch.equal(out, expected)
            rt = runtimes_of(model)[-1]  # the newest: the earlier compile may still be alive
            calls[m] = rt.stats()["region_calls"]
            ditopt.reset(model)
    assert calls[mode] < calls["none"]


def test_fused_skip_preset_takes_the_same_decisions_and_output():
    model = fixture.load_fixture()
    runs = {}
    for mode in ("none", "all"):
        torch._dynamo.reset()
        fn = torch.compile(model, backend="ditopt", options={"preset": "fast", "lowering": "eager",
                                                               "fuse_regions": mode})
        video = fixture.sample(fn, ["red square moving right"], seed=0, steps=16)
        rt = runtimes_of(model)[-1]
        gen = ditopt.stats(model)["generations"][-1]
        runs[mode] = video, gen["adacache"]["decisions"], rt.stats()
        ditopt.reset(model)
    (v0, d0, s0), (v1, d1, s1) = runs["none"], runs["all"]
    assert "S" in d0  # the preset skips here, so the fused path was taken around skipped spans
    assert d0 == d1 and torch.equal(v0, v1)
    assert s1["fused"] and s1["region_calls"] < s0["region_calls"]


class _Unaware(Hook):
    """A hook that does not say where it acts: the runtime must fuse nothing around it."""

    name = "unaware"


class _JumpsInside(Hook):
    """Says it needs no cuts, then jumps after the first region of a run: a contract violation."""

    name = "liar"

    def cuts(self):
        return set()

    def claims(self):
        return set()

    def after_region(self, call, index):
        return index + 2 if index == 1 else None


def _runtime(hook, mode="all"):
    lowered, args = _lowered(2)
    cfg = Config.from_options({"preset": "lossless", "lowering": "eager", "fuse_regions": mode})
    return Runtime(lowered, [hook], cfg, {}), args


def test_a_hook_that_names_no_cuts_or_claims_prevents_fusion():
    rt, _ = _runtime(_Unaware())
    assert rt.fused == {}


def test_a_hook_jumping_inside_a_fused_run_is_an_error_naming_the_fix():
    rt, args = _runtime(_JumpsInside())
    assert any(r.index <= 1 < r.last for r in rt.fused.values())
    with torch.no_grad(), pytest.raises(RuntimeError, match="cuts\\(\\) must name 2"):
        rt(*args)


def test_fuse_regions_rejects_an_unknown_mode_naming_the_valid_ones():
    with pytest.raises(ValueError, match="block.*all.*none"):
        Config.from_options({"fuse_regions": "everything"})
