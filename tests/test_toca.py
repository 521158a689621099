"""ToCa: scores against their materialised definitions, the pass, the runtime's modes, caches and selection."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ditopt
from ditopt import Config
from ditopt.passes.toca import scores as ts
from ditopt.analysis import analyze
from ditopt.harness.models import build, call
from ditopt.passes.pipeline import NORMALIZE, run_pipeline
from ditopt.runtime import count_flops, runtimes_of
from ditopt.passes.toca import quantised_rows, step_factor

from conftest import capture_graphs, compile_ditopt

ops = torch.ops.ditopt

# ---------------------------------------------------------------------------
# scores


def _mask(kind, b, n, m, gen):
    if kind == "none":
        return None
    if kind == "key_bool":  # a text padding mask: at least one key kept per batch element
        keep = torch.rand(b, 1, 1, m, generator=gen) > 0.3
        keep[..., 0] = True
        return keep
    return torch.randn(b, 1, n, m, generator=gen)  # additive, per query


def _head_averaged_map(q, k, attn_mask):
    """The materialised definition: softmax(q k^T / sqrt(d) + mask), averaged over heads, [B, N, M]."""
    logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if attn_mask is not None:
        logits = logits.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else logits + attn_mask
    return logits.softmax(-1).mean(1)


@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 3), h=st.integers(1, 4), n=st.integers(1, 40), m=st.integers(1, 40), d=st.integers(1, 16),
       chunk=st.integers(1, 17), mask=st.sampled_from(["none", "key_bool", "additive"]))
def test_scores_equal_their_materialised_map_definitions(b, h, n, m, d, chunk, mask):
    gen = torch.Generator().manual_seed(b * 1000 + n * 37 + m)
    q, k = torch.randn(b, h, n, d, generator=gen), torch.randn(b, h, m, d, generator=gen)
    attn_mask = _mask(mask, b, n, m, gen)
    probs = _head_averaged_map(q, k, attn_mask)
    column = ts.attention_column_score(q, k, attn_mask, chunk=chunk)
    entropy = ts.attention_entropy(q, k, attn_mask, chunk=chunk)
    assert torch.allclose(column, probs.sum(1), atol=1e-5)
    assert torch.allclose(entropy, -(probs * torch.log(probs + 1e-7)).sum(-1), atol=1e-5)
    # the ops the pass inserts are these functions
    assert torch.allclose(ops.attention_column_score(q, k, attn_mask, None), column, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(grid=st.tuples(st.integers(1, 3), st.integers(1, 7), st.integers(1, 7)),
       cell=st.tuples(st.integers(1, 2), st.integers(1, 4), st.integers(1, 4)), offset=st.integers(0, 3),
       bonus=st.floats(0.1, 1.0))
def test_uniformity_bonus_boosts_the_best_token_of_each_cell_on_any_grid(grid, cell, offset, bonus):
    n = grid[0] * grid[1] * grid[2]
    score = torch.rand(2, offset + n + 2, generator=torch.Generator().manual_seed(n))
    out = ts.uniformity_bonus(score, ts.cell_ids(grid, cell), bonus, offset=offset)
    expected = score.clone()
    for bi in range(2):
        cells: dict = {}
        for i, (f, y, x) in enumerate((f, y, x) for f in range(grid[0]) for y in range(grid[1]) for x in range(grid[2])):
            cells.setdefault((f // cell[0], y // cell[1], x // cell[2]), []).append(offset + i)
        for members in cells.values():
            best = max(members, key=lambda j: float(score[bi, j]))
            expected[bi, best] *= 1 + bonus
    assert torch.allclose(out, expected)


@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 5), n=st.integers(1, 50), data=st.data())
def test_selection_is_the_top_k_in_row_order_and_follows_the_batch_order(b, n, data):
    k = data.draw(st.integers(0, n))
    score = torch.randn(b, n, generator=torch.Generator().manual_seed(b * n))
    rows = ts.select_rows(score, k)
    assert rows.shape == (b, k) and torch.all(rows[:, 1:] > rows[:, :-1])
    if k:
        chosen_min = torch.gather(score, 1, rows).min(1).values
        mask = torch.ones_like(score, dtype=torch.bool).scatter_(1, rows, False)
        assert torch.all(score.masked_fill(~mask, float("-inf")).max(1).values <= chosen_min)
    perm = torch.randperm(b, generator=torch.Generator().manual_seed(n))
    assert torch.equal(ts.select_rows(score[perm], k), rows[perm])


def test_quantised_rows_and_factors():
    assert quantised_rows(0.0, 100, 16, 8) == 0
    assert quantised_rows(0.05, 100, 16, 8) == 8  # up to 1/16: 6.25 rows -> 8
    assert quantised_rows(0.07, 100, 16, 8) == 16  # up to 2/16: 12.5 rows -> 16
    assert quantised_rows(0.2, 4096, 16, 8) == 1024  # rounded up to 4/16
    assert quantised_rows(1.3, 50, 16, 8) == 50
    assert step_factor(0.4, 0.0) == pytest.approx(1.4) and step_factor(0.4, 1.0) == pytest.approx(0.6)


# ---------------------------------------------------------------------------
# the pass


@pytest.mark.parametrize("family, kinds, scores", [
    ("wan", {"self": 2, "cross": 2, "mlp": 2}, {"entropy": 2}), ("pixart", {"self": 2, "cross": 2, "mlp": 2}, {"entropy": 2}),
    ("cogvideox", {"self": 2, "mlp": 2}, {"column": 2}), ("dit", {"self": 2, "mlp": 2}, {"column": 2}),
    ("stdit", {"self": 4, "cross": 4, "mlp": 4}, {"entropy": 4})])
def test_pass_counts_sites_and_scores_and_the_graph_still_computes_the_model(family, kinds, scores):
    case = build(family)
    gm = capture_graphs(case.model, case.inputs(batch=2))[0]
    args = gm.example_inputs
    with torch.no_grad():
        for _, normalize in NORMALIZE:  # the reference is the graph ToCa sees: hand-written attention as SDPA
            normalize(gm)
        reference = gm(*args)[0]
        gm, _, reports = run_pipeline(gm, Config.from_options({"preset": "lossless", "toca": {}}))
        out = gm(*args)[0]
    report = reports["toca"]
    assert {k: sum(s["kind"] == k for s in report["sites"]) for k in kinds} == kinds
    assert {k: sum(s["score"] == k for s in report["scores"]) for k in scores} == scores
    targets = [n.target for n in gm.graph.nodes]
    assert targets.count(ops.toca_update.default) == sum(kinds.values())
    assert targets.count(ops.gather_rows.default) == sum(v for k, v in kinds.items() if k != "self")
    assert torch.equal(out, reference)  # run as is, every row is fresh


def test_score_none_inserts_no_score_op():
    case = build("wan")
    gm = capture_graphs(case.model, case.inputs())[0]
    gm, _, reports = run_pipeline(gm, Config.from_options({"preset": "lossless", "toca": {"score": "none"}}))
    assert reports["toca"]["scores"] == [] and len(reports["toca"]["sites"]) == 6
    assert not any(n.target in (ops.attention_entropy.default, ops.attention_column_score.default) for n in gm.graph.nodes)


def test_pass_reports_sites_it_cannot_cache():
    # temporal attention is a self site (reused whole), but it is never a score source
    case = build("latte")
    gm = capture_graphs(case.model, case.inputs())[0]
    _, _, reports = run_pipeline(gm, Config.from_options({"preset": "lossless", "toca": {}}))
    no_score = [s for s in reports["toca"]["scores"] if s["score"] is None]
    assert no_score and all("no cross-attention or full/spatial self-attention" in s["reason"] for s in no_score)


# ---------------------------------------------------------------------------
# the runtime


def _blocks(model):
    return getattr(model, "blocks", None) or model.transformer_blocks


def _run(fn, inputs, steps, on_step=None):
    """Euler steps over a zoo model; on_step(step) runs before each call."""
    latent = "hidden_states" if "hidden_states" in inputs else "x"
    x = inputs[latent].clone()
    with torch.no_grad():
        for step, t in enumerate(torch.linspace(999, 0, steps)):
            if on_step is not None:
                on_step(step)
            out = call(fn, {**inputs, latent: x, "timestep": t.expand(x.shape[0]).clone()})
            for dim, (got, want) in enumerate(zip(out.shape, x.shape)):
                out = out.narrow(dim, 0, want) if got != want else out  # learned-sigma channels: keep the first
            x = x - out / steps
    return x


def _emulated(model, inputs, steps, reused_at, capture: str | None = None):
    """Plain eager sampling where each block's self-attention output is reused (from the last step that
    computed it) at the steps in `reused_at`; optionally records the module `capture`'s outputs per step."""
    step, saved, captured, handles = {"now": 0}, {}, {}, []
    for i, block in enumerate(_blocks(model)):
        def reuse(module, args, out, i=i):
            if step["now"] in reused_at:
                return saved[i]
            saved[i] = out

        handles.append(block.attn1.register_forward_hook(reuse))
        if capture:
            handles.append(getattr(block, capture).register_forward_hook(
                lambda m, a, out, i=i: captured.__setitem__((step["now"], i), out)))
    try:
        x = _run(model, inputs, steps, on_step=lambda s: step.__setitem__("now", s))
    finally:
        for h in handles:
            h.remove()
    return x, captured


@pytest.mark.parametrize("family", ["wan", "pixart", "cogvideox", "dit", "stdit", "latte", "hunyuanvideo", "ltx"])
def test_interval_one_is_full_compute_exactly(family):
    case = build(family)
    inputs = case.inputs(batch=2)
    reference = _run(compile_ditopt(case.model), inputs, 4)  # lossless: the same graph without ToCa
    torch._dynamo.reset()
    ditopt.reset(case.model)
    fn = compile_ditopt(case.model, toca={"interval": 1, "ratio": 0.3})
    assert torch.equal(_run(fn, inputs, 4), reference)
    assert (reference - _run(case.model, inputs, 4)).abs().max() <= 1e-5
    assert ditopt.stats(case.model)["generations"][-1]["toca"]["computed_fraction"] == 1.0


@pytest.mark.parametrize("family", ["wan", "pixart"])
def test_ratio_one_differs_from_full_compute_only_through_reused_self_attention(family):
    case = build(family)
    inputs = case.inputs(batch=2)
    steps = 7
    expected, _ = _emulated(case.model, inputs, steps, reused_at={1, 2, 4, 5})  # fresh at 0, 3, 6
    fn = compile_ditopt(case.model, toca={"interval": 3, "ratio": 1.0, "module_factors": {"cross": 1.0, "mlp": 1.0}})
    out = _run(fn, inputs, steps)
    assert torch.allclose(out, expected, atol=1e-5)
    assert not torch.allclose(out, _run(case.model, inputs, steps), atol=1e-5)  # the reuse matters
    toca = ditopt.stats(case.model)["generations"][-1]["toca"]
    assert toca["reused"] == 4 * 2 and toca["partial"] == 0  # self-attention of 2 blocks at 4 steps


def test_cache_after_a_partial_step_holds_new_rows_where_selected_and_old_rows_elsewhere():
    case = build("wan")
    inputs = case.inputs(batch=2)
    # cross-attention recomputes every row (factor 4 x 0.25), the MLP a quarter of them
    fn = compile_ditopt(case.model, toca={"interval": 3, "ratio": 0.25, "module_factors": {"cross": 4.0, "mlp": 1.0}})
    snapshots = {}

    def snapshot(step):
        if step == 2:  # after step 1, the first partial step
            planner = runtimes_of(case.model)[0]
            state = planner.clock.stream(0).state["toca"]
            snapshots.update({s.block: (state.sites[s.id].cache.clone(), state.sites[s.id].rows.clone())
                              for ss in next(h for h in planner.hooks if h.name == "toca").sites.values()
                              for s in ss if s.kind == "mlp"})

    _run(fn, inputs, 3, on_step=snapshot)
    _, mlp_out = _emulated(case.model, inputs, 3, reused_at={1, 2}, capture="ffn")
    for block, (cache, rows) in snapshots.items():
        assert rows.shape == (2, 16)  # 48 tokens x 1/4 -> 12, rounded up to 16
        selected = torch.zeros(cache.shape[:2], dtype=torch.bool).scatter_(1, rows, True)
        new, old = mlp_out[(1, block)], mlp_out[(0, block)]
        assert torch.equal(cache[~selected], old[~selected])
        assert not torch.allclose(cache[selected], old[selected])
        if block == 0:  # later blocks' inputs already carry the first block's cached rows: not the emulation's
            assert torch.allclose(cache[selected], new[selected], atol=1e-5)


@pytest.mark.parametrize("cfg_shared", [False, True])
def test_selection_and_output_follow_the_batch_order(cfg_shared):
    case = build("wan")
    a, b = case.inputs(batch=1, seed=1), case.inputs(batch=1, seed=2)
    ab = {k: torch.cat([a[k], b[k]]) if isinstance(a[k], torch.Tensor) else a[k] for k in a}
    ba = {k: torch.cat([b[k], a[k]]) if isinstance(a[k], torch.Tensor) else a[k] for k in a}
    opts = {"interval": 3, "ratio": 0.3, "cfg_shared": cfg_shared, "uniform_bonus": 0.5}
    out_ab = _run(compile_ditopt(case.model, toca=opts), ab, 5)
    torch._dynamo.reset()
    ditopt.reset(case.model)
    out_ba = _run(compile_ditopt(case.model, toca=opts), ba, 5)
    assert torch.allclose(out_ab, out_ba.flip(0), atol=1e-5)


def test_fifty_steps_never_recompile_and_a_second_generation_compiles_nothing():
    case = build("wan")
    inputs = case.inputs(batch=2)
    torch._dynamo.utils.counters.clear()
    fn = compile_ditopt(case.model, toca={"reference": "pixart"})  # k changes with step and layer
    _run(fn, inputs, 50)
    runtime = runtimes_of(case.model)[0]
    variants = len(runtime.variants.variants)
    _run(fn, inputs, 50)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert len(runtime.variants.variants) == variants <= 24
    gens = ditopt.stats(case.model)["generations"]
    assert len(gens) == 2 and gens[0]["toca"] == gens[1]["toca"]
    assert 0.0 < gens[0]["toca"]["computed_fraction"] < 1.0


def test_partial_steps_count_fewer_flops():
    case = build("pixart")
    inputs = case.inputs(batch=2)
    with count_flops() as full:
        _run(compile_ditopt(case.model), inputs, 6)
    torch._dynamo.reset()
    with count_flops() as toca:
        _run(compile_ditopt(case.model, toca={"interval": 3, "ratio": 0.25}), inputs, 6)
    assert toca.flops < full.flops


@pytest.mark.inductor
@pytest.mark.slow
def test_inductor_lowering_matches_eager_lowering_with_partial_steps():
    case = build("wan")
    inputs = case.inputs(batch=2)
    opts = {"toca": {"interval": 3, "ratio": 0.3}}
    eager = _run(compile_ditopt(case.model, **opts), inputs, 4)
    torch._dynamo.reset()
    ditopt.reset(case.model)
    fn = torch.compile(case.model, backend="ditopt", options={"preset": "lossless", **opts})
    assert torch.allclose(_run(fn, inputs, 4), eager, atol=1e-4)


@settings(max_examples=20, deadline=None)
@given(half=st.integers(1, 2), h=st.integers(1, 3), n=st.integers(1, 20), m=st.integers(1, 12),
       mask=st.sampled_from(["none", "key_bool", "additive"]))
def test_cfg_halves_combine_their_attention_before_the_entropy(half, h, n, m, mask):
    b, d = 2 * half, 8
    gen = torch.Generator().manual_seed(half * 100 + n * 7 + m)
    q, k = torch.randn(b, h, n, d, generator=gen), torch.randn(b, h, m, d, generator=gen)
    attn_mask = _mask(mask, b, n, m, gen)
    probs = _head_averaged_map(q, k, attn_mask)
    uncond, cond = probs.chunk(2)
    shared = (uncond + cond) / 2
    want = -(shared * torch.log(shared + 1e-7)).sum(-1).repeat(2, 1)
    assert torch.allclose(ts.attention_entropy(q, k, attn_mask, cfg_halves=True, chunk=5), want, atol=1e-5)
    assert torch.allclose(ops.attention_entropy(q, k, attn_mask, None, True), want, atol=1e-5)


def test_pixart_reference_computes_more_rows_early_than_late():
    case = build("pixart")
    steps = 12
    _run(compile_ditopt(case.model, toca={"reference": "pixart"}), case.inputs(batch=2), steps)
    rows = ditopt.stats(case.model)["generations"][-1]["toca"]["rows_by_step"]
    assert len(rows) == steps
    partial = [s for s in range(steps) if s % 3]  # interval 3: steps 0, 3, 6, 9 compute every row

    def mean_rows(window):
        picked = [rows[s] for s in partial if s in window]
        return sum(picked) / len(picked)

    assert mean_rows(range(steps // 3)) > mean_rows(range(steps - steps // 3, steps)), rows


def test_with_a_skip_guard_toca_refreshes_on_the_steps_its_block_runs_and_computes_the_probed_block_whole():
    case = build("wan")
    inputs = case.inputs(batch=2)
    steps = 11  # AdaCache forced to rate 2: computed at 0, 1, 3, 5, 7 and the last steps (8, 9, 10)
    fn = compile_ditopt(case.model, adacache={"codebook": {1e9: 2}}, toca={"interval": 2, "ratio": 0.3})
    _run(fn, inputs, steps)
    runtime = runtimes_of(case.model)[0]
    planner = next(h for h in runtime.hooks if h.name == "toca")
    gen = ditopt.stats(case.model)["generations"][-1]
    computed = gen["adacache"]["decisions"].count("C")
    assert gen["adacache"]["decisions"] == "CCSCSCSCCCC"
    sites = [s for ss in planner.sites.values() for s in ss]
    probed = [s for s in sites if s.block in planner.probed_blocks]
    assert planner.probed_blocks and probed and len(probed) < len(sites)
    # counted by sampling step, only steps 0, 8 and 10 of the computed ones would refresh (even)
    expected = len(probed) * computed + (len(sites) - len(probed)) * math.ceil(computed / 2)
    assert gen["toca"]["fresh"] == expected


def test_teacache_probe_upstream_of_every_site_leaves_toca_free():
    case = build("wan")
    fn = compile_ditopt(case.model, teacache={"threshold": 0.05}, toca={"interval": 2, "ratio": 0.3})
    _run(fn, case.inputs(batch=2), 6)
    planner = next(h for h in runtimes_of(case.model)[0].hooks if h.name == "toca")
    assert planner.probed_blocks == frozenset()
