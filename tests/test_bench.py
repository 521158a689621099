"""`ditopt bench` on a tiny config: every row measured, JSON and markdown written."""

import inspect
import json
import math

import pytest
import torch

from ditopt.harness import bench, fixture, models


@pytest.mark.slow
def test_bench_measures_every_configuration_and_writes_json(tmp_path):
    case = models.build("wan")
    generate = bench.euler_loop(case.inputs(1, 0), 6, "hidden_states", models.call)
    skipping = "ditopt:" + json.dumps({"adacache": {"codebook": {"inf": 3}}})  # skips whenever it may
    configs = ["eager", "lossless", skipping, *bench.PEERS]
    with torch.no_grad():
        results = bench.measure(case.model, generate, configs, repeats=1)
    bench.write(results, tmp_path, "tiny wan")
    rows = json.loads((tmp_path / "bench.json").read_text())
    assert [r["config"] for r in rows] == configs
    eager, lossless, skipping, fbcache, *peers, textkv, dbcache = rows
    assert eager["speedup_vs_eager"] == 1.0 and eager["flop_ratio"] == 1.0 and eager["psnr_db"] is None  # inf: null
    assert 0.5 < lossless["flop_ratio"] < 1.0 and lossless["psnr_db"] > 60  # invariant work once; other kernels
    assert skipping["blocks_skipped_fraction"] > 0 and skipping["flop_ratio"] < 1.0
    assert fbcache["how"] == "eager + diffusers hooks" and fbcache["gflops_per_generation"] > 0
    assert all(0 < p["flop_ratio"] <= 1 and p["psnr_db"] > 0 for p in peers)
    assert textkv["config"] == "textkvcache" and textkv["psnr_db"] is None  # exact: an infinite PSNR is null
    assert dbcache["how"] == "eager + cache-dit hooks" and 0 < dbcache["flop_ratio"] <= 1
    assert "| lossless | ditopt (inductor) |" in (tmp_path / "bench.md").read_text()


def test_fastercache_skips_the_unconditional_half_of_batched_cfg_on_some_steps():
    model = fixture.load_fixture()
    clock = bench._Clock()
    batches = []
    hook = model.blocks[0].register_forward_pre_hook(lambda _, args: batches.append(args[0].shape[0]))
    model.enable_cache(bench.peer_config("fastercache", clock, cfg_batched=True))
    try:
        with torch.no_grad():
            fixture.sample(model, ["red square moving left"], steps=10, on_step=lambda t: setattr(clock, "t", float(t)))
    finally:
        model.disable_cache()
        hook.remove()
    assert batches[0] == 2 and 1 in batches  # CFG's two halves at first, the conditional one alone later


def test_magcache_ratios_have_one_entry_per_model_call():
    case = models.build("wan")
    generate = bench.euler_loop(case.inputs(1, 0), 5, "hidden_states", models.call)
    with torch.no_grad():
        ratios = bench.magcache_ratios(case.model, generate)
    assert len(ratios) == 5 and ratios[0] == 1.0 and all(r > 0 for r in ratios)


def test_a_peer_that_does_not_apply_is_left_out_with_a_warning():
    case = models.build("stdit")  # plain PyTorch: no diffusers cache hooks
    generate = bench.euler_loop(case.inputs(1, 0), 2, "x", models.call)
    with torch.no_grad(), pytest.warns(UserWarning, match="fbcache does not apply to STDiT"):
        results = bench.measure(case.model, generate, ["eager", "fbcache"], repeats=1, flops=False)
    assert [r.config for r in results] == ["eager"]


def test_unknown_configuration_lists_the_valid_ones():
    with pytest.raises(ValueError, match="use eager, inductor, lossless"):
        bench.compile_config(torch.nn.Linear(2, 2), "turbo")


def test_runtime_flop_count_of_lossless_equals_the_eager_count():
    case = models.build("cogvideox")
    generate = bench.euler_loop(case.inputs(1, 0), 3, "hidden_states", models.call)
    eager = bench.count_generation_flops(case.model, "eager", generate)
    uncached = bench.count_generation_flops(case.model, 'ditopt:{"preset": "lossless", "invariants": false}', generate)
    assert eager[0] > eager[1] > 0 and uncached == eager  # (total, attention) equal
    lossless = bench.count_generation_flops(case.model, "lossless", generate)  # step-invariant work done once
    assert lossless[0] < eager[0] and lossless[1] == eager[1]


def test_attention_flops_fall_to_the_kept_pairs_under_asymrnr():
    case = models.build("cogvideox")
    generate = bench.euler_loop(case.inputs(1, 0), 2, "hidden_states", models.call)
    name = 'ditopt:{"preset": "lossless", "asymrnr": {"q_ratio": 0.5, "kv_ratio": 0.5, "max_noise": 1.0}}'
    full, reduced = (bench.count_generation_flops(case.model, c, generate)[1] for c in ("eager", name))
    # tiny CogVideoX: 2 x 8 x 8 latent -> 32 video tokens (4 x 4 x 2), 8 text tokens first, both attend jointly
    n, text, kept = 32, 8, 16
    assert reduced / full == pytest.approx((text + kept) ** 2 / (text + n) ** 2)


def test_plot_has_one_point_per_configuration_with_a_speedup_lossless_included(tmp_path):
    def row(name, speedup, db, how="ditopt (inductor)"):
        return bench.Result(name, how, 1.0, speedup, None, 0.0, None, None, db, None, None, None)

    rows = [row("inductor", 1.0, math.inf, "inductor"), row("lossless", 1.02, 131.8), row("fast", 2.9, 24.8),
            row("a<b", 1.4, 37.8), row("eager", None, 99.0, "eager")]
    fig = bench.plot(rows, "fixture")
    (ax,) = fig.axes
    points = [tuple(c.get_offsets()[0]) for c in ax.collections if len(c.get_offsets())]
    labels = [t.get_text() for t in ax.texts]
    assert sorted(labels) == sorted(["inductor", "lossless", "fast", "a<b"])  # eager has no speed-up
    exact = max(x for x, _ in points)
    assert {y for x, y in points if x == exact} == {1.0, 1.02}  # infinite and 131.8 dB share the exact column
    assert (24.8, 2.9) in [(round(float(x), 2), round(float(y), 2)) for x, y in points]
    assert "exact" in ax.get_xticklabels()[-1].get_text()
    spelled = 'ditopt:{"preset": "lossless", "adacache": {"codebook": {"0.086": 6, "inf": 1}, "forecast": 1}}'
    fig = bench.plot([*rows, row(spelled, 2.6, 26.2)], "fixture")
    assert "[1]" in [t.get_text() for t in fig.axes[0].texts] and spelled not in [t.get_text() for t in fig.axes[0].texts]
    assert [" ".join(t.get_text().split()) for t in fig.texts] == [f"[1] {spelled}"]  # listed whole, under the axes
    bench.write(rows, tmp_path, "fixture")
    assert json.loads((tmp_path / "bench.json").read_text())[0]["psnr_db"] is None  # strict JSON
    assert (tmp_path / "bench.png").stat().st_size > 10_000


def test_peak_memory_is_reset_per_configuration_and_read_after_the_timed_generations(monkeypatch):
    # the CUDA allocator's peak, faked: every generation "allocates" 1 MiB more than the one before
    events = []
    model = torch.nn.Conv2d(3, 3, 1)

    def generate(fn):
        events.append("generate")
        return fn(torch.ones(1, 3, 16, 16))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: events.append("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 2**20 * events.count("generate"))
    with torch.no_grad():
        rows = bench.measure(model, generate, ["eager", "eager"], repeats=2)
    # per configuration: warm-up, reset, two timed generations, read; then the FLOP count's generation
    assert events == ["generate", "reset", "generate", "generate", "generate"] * 2
    # read after generation 3 and 7: read after the FLOP count, they would be 4 and 8
    assert [r.peak_memory_mb for r in rows] == [3.0, 7.0]


def test_cli_refuses_a_bad_configuration_before_any_work_and_lists_the_names():
    import subprocess
    import sys
    import time

    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ditopt", "bench", "--configs", "inductor", "foo"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown configuration 'foo'" in proc.stderr and "toca-dit" in proc.stderr
    assert time.perf_counter() - start < 15  # refused before loading a model or compiling
    bad = subprocess.run([sys.executable, "-m", "ditopt", "bench", "--configs", 'ditopt:{"adacache": {"x": 1}}'],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown key(s) ['x']" in bad.stderr
    helptext = subprocess.run([sys.executable, "-m", "ditopt", "bench", "--help"], capture_output=True, text=True).stdout
    flat = "".join(helptext.split())  # argparse wraps lines, at hyphens too
    assert "asymrnr-adaptive" in flat and "ditopt:<optionsasJSON>" in flat


def test_a_peer_name_with_settings_builds_its_config_with_them_and_a_bad_key_is_refused():
    bench.check_configs(['fbcache:{"threshold": 0.3}', "seacache", "textkvcache"])
    assert bench.peer_of('fbcache:{"threshold": 0.3}') == ("fbcache", {"threshold": 0.3})
    assert bench.peer_of("balanced") is None
    assert bench.peer_config("fbcache", settings={"threshold": 0.3}).threshold == 0.3
    assert bench.peer_config("taylorseer", settings={"cache_interval": 2}).cache_interval == 2
    with pytest.raises(ValueError, match=r"\['thresh'\] are not FirstBlockCacheConfig arguments; valid: \['threshold'\]"):
        bench.check_configs(['fbcache:{"thresh": 0.3}'])
    with pytest.raises(ValueError, match="not JSON"):
        bench.check_configs(["fbcache:{threshold}"])


def test_a_compiled_peer_name_is_parsed_and_a_bad_suffix_is_refused_naming_the_forms():
    assert bench.peer_of('seacache@inductor:{"threshold": 0.15}') == ("seacache", {"threshold": 0.15})
    assert bench.peer_compiled('seacache@inductor:{"threshold": 0.15}') and not bench.peer_compiled("seacache")
    bench.check_configs(["fbcache@inductor", 'taylorseer@inductor:{"cache_interval": 4}'])
    with pytest.raises(ValueError, match=r"runs eagerly \(fbcache\) or with its blocks compiled \(fbcache@inductor\)"):
        bench.check_configs(["fbcache@eager"])


def test_a_compiled_peer_runs_its_hooks_around_inductor_blocks_with_the_eager_peers_output():
    case = models.build("wan")
    generate = bench.euler_loop(case.inputs(1, 0), 6, "hidden_states", models.call)
    with torch.no_grad():
        rows = bench.measure(case.model, generate, ["eager", "fbcache", "fbcache@inductor"], repeats=1)
    eager, hooks, compiled = rows
    assert compiled.how == "inductor blocks + diffusers hooks"
    assert abs(compiled.psnr_db - hooks.psnr_db) < 1.0  # the same hooks' decisions, on Inductor's kernels
    blocks = [m for m in case.model.modules() if type(m).__name__ in case.model._repeated_blocks]
    # the blocks are left running their own eager forward (diffusers' hook removal may leave it bound on the
    # instance; what matters is that no compiled wrapper stays behind)
    assert blocks and all(inspect.ismethod(b.forward) and b.forward.__func__ is type(b).forward for b in blocks)


def test_cache_dit_runs_as_a_peer_with_a_fresh_context_each_generation():
    """cache-dit's DBCache + TaylorSeer on the bare transformer (its BlockAdapter): it skips blocks, its
    settings are checked, and every generation starts from a fresh context (the same seed gives the same
    output twice)."""
    pytest.importorskip("cache_dit")
    bench.check_configs(['dbcache:{"Fn_compute_blocks": 1, "taylorseer_order": 0}'])
    with pytest.raises(ValueError, match=r"\['Fn'\] are not cache-dit DBCacheConfig fields"):
        bench.check_configs(['dbcache:{"Fn": 1}'])
    model = fixture.load_fixture()
    prompts = ["red square moving left"]
    calls = [0] * len(model.blocks)
    hooks = [b.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, b in enumerate(model.blocks)]
    try:
        with torch.no_grad(), bench.peer_enabled(model, "dbcache", {"Fn_compute_blocks": 1,
                                                                    "residual_diff_threshold": 0.2,
                                                                    "max_warmup_steps": 2}) as refresh:
            outs = []
            for _ in range(2):
                refresh()
                outs.append(fixture.sample(model, prompts, seed=0, steps=12))
    finally:
        for h in hooks:
            h.remove()
    assert calls[0] == 24 and calls[-1] < 24  # block 0 always computes; the others are cached on some steps
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    with torch.no_grad():  # its hooks are gone: the model computes what it computed before
        torch.testing.assert_close(fixture.sample(model, prompts, seed=0, steps=12),
                                   fixture.sample(fixture.load_fixture(), prompts, seed=0, steps=12), rtol=0, atol=0)


def test_a_diffusers_peer_starts_each_generation_fresh_as_a_pipeline_call_does(monkeypatch):
    """Without the reset a pipeline makes after each call, SeaCache read the next generation's first step as a
    jump in its trajectory ("non-adjacent scheduler steps; running full"); with it, no step is forced full
    and the same seed gives the same output twice."""
    from diffusers.hooks import sea_cache

    fail_open = []
    monkeypatch.setattr(sea_cache.SeaCacheSharedState, "mark_fail_open", lambda self, message: fail_open.append(message))
    model = fixture.load_fixture()
    prompts = ["red square moving left"]
    with torch.no_grad(), bench.peer_enabled(model, "seacache", {"threshold": 0.4}) as refresh:
        outs = []
        for _ in range(2):
            refresh()
            outs.append(fixture.sample(model, prompts, seed=0, steps=12,
                                       on_step=lambda t: setattr(bench.CLOCK, "t", float(t))))
    assert fail_open == []
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
