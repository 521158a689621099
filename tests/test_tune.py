"""`ditopt.tune` and the `config` option: the choice, what it writes, its errors, and its search helpers."""

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ditopt
from ditopt import Config
from ditopt.harness import cli, fixture
from ditopt.harness.metrics import psnr
from ditopt.passes.teacache.hook import teacache_decisions
from ditopt.runtime import count_flops
from ditopt.tune import TOCA_LADDER, Candidate, _pareto, _Search, teacache_threshold, tune

STEPS = 12
PROMPTS = list(fixture.PROMPTS[:1])


@pytest.fixture(scope="module")
def model():
    return fixture.load_fixture()


def _sample(fn, seed):
    return fixture.sample(fn, PROMPTS, seed=seed, steps=STEPS)


def _measure(model, options, seed):
    """PSNR against full compute and the runtime's FLOPs of one generation with `options`."""
    full = _sample(model, seed)
    torch._dynamo.reset()
    ditopt.reset(model)
    fn = torch.compile(model, backend="ditopt", options={**options, "lowering": "eager"})
    with count_flops() as tally:
        out = _sample(fn, seed)
    return psnr(out, full), tally.flops


def test_the_choice_is_the_fastest_candidate_meeting_the_budget_and_its_file_reproduces_it(model, tmp_path):
    result = tune(model, _sample, 25.0, cases=[0], methods=["adacache"], margin=0.0, out=tmp_path / "tuned.json",
                  plot=tmp_path / "tuned.png", progress=False)
    assert result.met and result.chosen.worst >= 25.0 and result.chosen.flop_ratio < 1.0
    meeting = [c for c in result.candidates if c.stage != "reference" and c.worst >= 25.0]
    assert max(c.speedup() for c in meeting) == result.chosen.speedup()
    assert any(c.worst < 25.0 for c in result.candidates)  # the search went past the budget
    depths = {(c.options["adacache"].get("compute_first", 0), c.options["adacache"].get("compute_last", 0))
              for c in result.candidates if "adacache" in c.options}
    assert depths == {(0, 0), (1, 0), (1, 1)}  # whole runs, then the first (and last) blocks kept computed
    assert (tmp_path / "tuned.png").stat().st_size > 0
    saved = json.loads((tmp_path / "tuned.json").read_text())
    assert saved["tune"]["chosen"]["worst"] == round(result.chosen.worst, 4)
    # the file loads as options and gives the measured output again
    value, flops = _measure(model, {"config": str(tmp_path / "tuned.json")}, 0)
    assert value == pytest.approx(result.chosen.worst, abs=1e-6)
    _, full_flops = _measure(model, {"preset": "lossless", "invariants": False}, 0)
    assert flops / full_flops == pytest.approx(result.chosen.flop_ratio, rel=1e-9)


def test_a_budget_no_candidate_meets_returns_the_closest_with_a_warning(model):
    with pytest.warns(UserWarning, match="no candidate meets psnr >= 502"):  # the default margin: 2 dB
        result = tune(model, _sample, 500.0, cases=[0], methods=["teacache"], progress=False)
    assert result.budget == 502.0
    assert not result.met
    tried = [c for c in result.candidates if c.stage != "reference"]
    assert tried and result.chosen.worst == max(c.worst for c in tried)


def test_bad_input_is_a_value_error_that_says_what_to_change(model):
    with pytest.raises(ValueError, match=r"'lpips' is not valid; choose one of \['psnr', 'ssim'\]"):
        tune(model, _sample, 30.0, metric="lpips")
    with pytest.raises(ValueError, match=r"not valid; choose among \['adacache', 'teacache', 'toca', 'asymrnr'\]"):
        tune(model, _sample, 30.0, methods=["adacahe"])
    with pytest.raises(ValueError, match="SSIM budget is in"):
        tune(model, _sample, 30.0, metric="ssim")
    with pytest.raises(ValueError, match="never called the model it was given"):
        tune(model, lambda fn, seed: torch.zeros(3), 30.0, progress=False)
    with pytest.raises(ValueError, match="must return the sampler's output as a tensor"):
        tune(model, lambda fn, seed: [_sample(fn, seed)], 30.0, progress=False)


def test_config_option_loads_a_file_and_keys_given_beside_it_win(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"options": {"preset": "lossless", "adacache": {"codebook": {"0.1": 3, "inf": 1},
                                                                               "forecast": 1}}, "tune": {}}))
    cfg = Config.from_options({"config": str(path), "adacache": {"forecast": 2}, "lowering": "eager"})
    assert cfg.adacache.enabled and cfg.adacache.codebook == {0.1: 3, math.inf: 1} and cfg.adacache.forecast == 2
    assert cfg.preset == "lossless" and cfg.lowering == "eager"
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"toca": {"interval": 2}}))
    assert Config.from_options({"config": plain}).toca.interval == 2
    with pytest.raises(ValueError, match="does not exist"):
        Config.from_options({"config": str(tmp_path / "missing.json")})
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not JSON"):
        Config.from_options({"config": str(tmp_path / "bad.json")})
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        Config.from_options({"config": str(tmp_path / "list.json")})
    (tmp_path / "typo.json").write_text(json.dumps({"adacahe": {}}))
    with pytest.raises(ValueError, match="unknown option"):
        Config.from_options({"config": str(tmp_path / "typo.json")})


@pytest.mark.slow
def test_tune_runs_end_to_end_on_a_diffusers_tiny_config_that_is_not_the_fixture(tmp_path, capsys):
    out = tmp_path / "tuned.json"
    rc = cli.main(["tune", "--model", "cogvideox", "--steps", "10", "--psnr", "20", "--seeds", "0",
                   "--out", str(out), "--plot", str(tmp_path / "tuned.png")])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out.split("\nwrote")[0])
    assert printed["candidates"] > 1 and printed["worst"] != "inf"
    Config.from_options({"config": str(out)})  # what it wrote is valid options


@settings(max_examples=60, deadline=None)
@given(changes=st.lists(st.floats(0.001, 1.0), min_size=6, max_size=40), target=st.floats(1.05, 4.0))
def test_teacache_threshold_reaches_the_target_at_the_edge(changes, target):
    values = [None, *changes]
    n = len(values)
    threshold, predicted = teacache_threshold(values, target)
    assert predicted == pytest.approx(n / sum(teacache_decisions(values, threshold, (1.0, 0.0), 2, 2)))
    reachable = n / sum(teacache_decisions(values, sum(changes), (1.0, 0.0), 2, 2)) >= target
    if reachable:
        assert predicted >= target
        assert n / sum(teacache_decisions(values, threshold * (1 - 1e-6), (1.0, 0.0), 2, 2)) < target


@settings(max_examples=100, deadline=None)
@given(points=st.lists(st.tuples(st.floats(1.0, 60.0), st.floats(0.05, 1.0)), min_size=1, max_size=20))
def test_the_pareto_front_holds_exactly_the_undominated_candidates(points):
    cands = [Candidate({"i": i}, "x", [q], r) for i, (q, r) in enumerate(points)]
    front = _pareto(cands, None)

    def dominates(a, b):
        return a.worst >= b.worst and a.speedup() >= b.speedup() and (a.worst, a.speedup()) != (b.worst, b.speedup())

    assert all(not dominates(c, f) for f in front for c in cands)
    assert all(any(f.worst >= c.worst and f.speedup() >= c.speedup() for f in front) for c in cands)


def test_importing_ditopt_alone_counts_attention_flops_on_the_cpu():
    import subprocess
    import sys

    code = ("import torch, ditopt\nfrom torch.utils.flop_counter import flop_registry\n"
            "print(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu in flop_registry)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True"  # tune, fidelity and every FLOP ratio see attention without the bench


class _Scripted(_Search):
    """A search whose candidates score by a rule of their options instead of running a model."""

    def __init__(self, rule, floor):
        super().__init__(None, None, "psnr", [0], "flops", floor, progress=False)
        self.rule = rule

    def measure(self, options, stage):
        cand = Candidate(options, stage, [self.rule(options)], 0.5)
        self.candidates.append(cand)
        return cand


@pytest.mark.parametrize("better", ["auto", "none"])
def test_toca_runs_on_bases_forecasting_at_order_1_at_most_with_the_score_that_kept_more(better):
    codebook = {"0.1": 2, "inf": 1}
    skip = [Candidate({"preset": "lossless", "adacache": {"codebook": codebook, "forecast": order, "tag": tag}},
                      "adacache", [worst], ratio)
            for tag, order, worst, ratio in [("q", 2, 44.0, 0.45), ("l", 1, 40.0, 0.5), ("r", 0, 36.0, 0.4),
                                             ("miss", 1, 20.0, 0.3)]]

    def rule(options):  # the better score keeps 3 dB more; each rung costs 1 dB
        base = options.get("adacache", {}).get("tag")
        start = {None: 45.0, "q": 44.0, "l": 40.0, "r": 36.0}[base]
        toca = options["toca"]
        return start - TOCA_LADDER.index((toca["interval"], toca["ratio"])) - (toca["score"] != better) * 3.0

    search = _Scripted(rule, floor=30.0)
    search.toca_stage(skip)
    by_base = {}
    for cand in search.candidates:
        by_base.setdefault(cand.options.get("adacache", {}).get("tag"), []).append(cand.options["toca"])
    assert set(by_base) == {None, "l", "r"}  # not the order-2 forecast, nor the base under the floor
    for base, tocas in by_base.items():
        assert {t["score"] for t in tocas[:2]} == {"auto", "none"}  # both scores on the gentlest rung
        assert all((t["interval"], t["ratio"]) == TOCA_LADDER[0] for t in tocas[:2])
        assert tocas[2:] and all(t["score"] == better for t in tocas[2:])  # the rest with the one that kept more
