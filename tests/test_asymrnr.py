"""AsymRnR: kernels against their references, the split and selection, the pass, the runtime's cache and schedules."""

import itertools
import math
import os
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import ditopt
from ditopt import Config
from ditopt.passes.asymrnr import plans as tm
from ditopt.analysis import analyze, module_path, sdpa_qkv
from ditopt.passes.asymrnr import RatioSchedule, tiers_to_ratios
from ditopt.kernels import gather, matching
from ditopt.harness.bench import euler_loop
from ditopt.harness.models import build, call
from ditopt.passes.asymrnr import rewrite as asymrnr_pass
from ditopt.passes.pipeline import NORMALIZE

from conftest import capture_graphs, compile_ditopt

ops = torch.ops.ditopt
interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                 reason="Triton kernels need a GPU or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"

# ---------------------------------------------------------------------------
# kernels


@interpreted
@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 2), h=st.integers(1, 3), grid=st.tuples(st.integers(1, 4), st.integers(1, 9), st.integers(2, 9)),
       stride=st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)), d=st.sampled_from([8, 12, 16, 40, 64]),
       metric=st.sampled_from(matching.METRICS), dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_matching_kernel_equals_reference(b, h, grid, stride, d, metric, dtype):
    """Over grids the strides need not divide (ragged borders), lengths that are not powers of two."""
    n = math.prod(grid)
    gen = torch.Generator().manual_seed(n * 31 + d)
    x = torch.randn(b, h, n, d, generator=gen).to(dtype).to(DEVICE)
    dst, src = (t.to(DEVICE) for t in tm.split_grid(grid, stride, seed=n))
    if src.numel() == 0:
        return
    near_k, dist_k = matching.nearest_destination_triton(x, src, dst, metric)
    near_r, dist_r = matching.nearest_destination_reference(x, src, dst, metric)
    tol = 1e-4 * (1 + dist_r.abs())
    assert torch.all((dist_k - dist_r).abs() <= tol)
    # the kernel's choice is a true minimum (near-ties may resolve to either destination)
    chosen = _distance_to(x, src, dst[near_k], metric)
    assert torch.all((chosen - dist_r).abs() <= tol)
    assert torch.equal(near_k, near_r) or (near_k != near_r).float().mean() < 0.05


def _distance_to(x, src, chosen_dst, metric):
    """d(x[src_j], x[chosen_dst_j]) per (b, h, j), computed directly."""
    xs = x[:, :, src].float()
    xd = torch.gather(x.float(), 2, chosen_dst.unsqueeze(-1).expand(*chosen_dst.shape, x.shape[-1]))
    if metric == "euclidean":
        return (xs - xd).pow(2).sum(-1)
    dot = (xs * xd).sum(-1)
    if metric == "cosine":
        return -dot / (xs.norm(dim=-1) * xd.norm(dim=-1) + 1e-12)
    return -dot


@interpreted
@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 3), h=st.integers(1, 3), s=st.integers(1, 70), d=st.integers(1, 150),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), data=st.data())
def test_gather_kernel_equals_reference(b, h, s, d, dtype, data):
    k = data.draw(st.integers(1, 2 * s))
    x = torch.randn(b, h, s, d).to(dtype).to(DEVICE)
    index = torch.randint(0, s, (b, h, k)).to(DEVICE)
    if data.draw(st.booleans()):  # non-contiguous input, as q/k/v after a transpose are
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    assert torch.equal(gather.gather_tokens_triton(x, index), gather.gather_tokens_reference(x, index))


def test_merge_is_the_mean_of_each_kept_token_and_its_reduced_sources():
    x = torch.arange(12.0).view(1, 1, 6, 2)
    keep = torch.tensor([[[0, 3]]])
    source = torch.tensor([[[0, 0, 1, 1, 1, 0]]])  # tokens 1, 5 into token 0; 2, 4 into token 3
    out = ops.merge(x, keep, source)
    assert torch.equal(out[0, 0, 0], x[0, 0, [0, 1, 5]].mean(0))
    assert torch.equal(out[0, 0, 1], x[0, 0, [2, 3, 4]].mean(0))


@pytest.mark.parametrize("name", ["merge", "nearest_destination", "token_match"])
def test_opcheck(name):
    x = torch.randn(2, 3, 24, 8)
    args = {
        "merge": (x, torch.tensor([[[0, 5, 9]] * 3] * 2), torch.randint(0, 3, (2, 3, 24))),
        "nearest_destination": (x, torch.arange(4, 24), torch.arange(4), "cosine"),
        "token_match": (x, 0.5, [2, 3, 4], [2, 2, 2], "euclidean", 0),
    }[name]
    torch.library.opcheck(getattr(ops, name).default, args, test_utils=("test_schema", "test_faketensor"))


# ---------------------------------------------------------------------------
# split and selection

grids = st.tuples(st.integers(1, 5), st.integers(1, 7), st.integers(1, 7))
strides = st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3))


@settings(max_examples=60, deadline=None)
@given(grid=grids, stride=strides, seed=st.integers(0, 1000))
def test_split_puts_one_destination_in_each_full_cell(grid, stride, seed):
    dst, src = tm.split_grid(grid, stride, seed)
    F_, H, W = grid
    sf, sh, sw = tm.effective_stride(grid, stride)
    assert torch.equal(torch.cat([dst, src]).sort().values, torch.arange(F_ * H * W))
    assert dst.numel() == tm.num_destinations(grid, stride)
    # one destination in each full cell of a grid of cells shifted by less than the remainder on each axis,
    # so none in the ragged border (which the reference splits at random between the two ends)
    assert _leads(dst, grid, (sf, sh, sw))


@settings(max_examples=60, deadline=None)
@given(grid=grids, stride=strides, ratio=st.floats(0, 0.95), b=st.integers(1, 2), h=st.integers(1, 3),
       seed=st.integers(0, 100))
def test_selection_reduces_the_most_similar_sources_into_their_destinations(grid, stride, ratio, b, h, seed):
    n = math.prod(grid)
    x = torch.randn(b, h, n, 6, generator=torch.Generator().manual_seed(seed))
    dst, src = tm.split_grid(grid, stride, seed)
    nearest, distance = matching.nearest_destination_reference(x, src, dst)
    keep, source = tm.select_tokens(nearest, distance, dst, src, n, ratio)
    kept_len = tm.reduced_length(n, dst.numel(), ratio)
    assert keep.shape == (b, h, kept_len) and source.shape == (b, h, n)
    assert torch.all(keep[..., 1:] > keep[..., :-1])  # ascending, unique
    assert torch.all(torch.isin(dst, keep[0, 0]))  # every destination is kept
    rows = torch.gather(keep, 2, source)  # the token each token's row stands for
    is_kept = torch.zeros(b, h, n, dtype=torch.bool).scatter_(2, keep, True)
    assert torch.equal(rows[is_kept], torch.arange(n).expand(b, h, n)[is_kept])
    src_pos = {t: i for i, t in enumerate(src.tolist())}
    for bi in range(b):
        for hi in range(h):
            reduced = [t for t in range(n) if not is_kept[bi, hi, t]]
            for t in reduced:  # reduced into its nearest destination
                assert int(rows[bi, hi, t]) == int(dst[nearest[bi, hi, src_pos[t]]])
            if reduced:  # and no kept source is more similar than a reduced one
                kept_src = [src_pos[t] for t in src.tolist() if is_kept[bi, hi, t]]
                if kept_src:
                    assert distance[bi, hi, [src_pos[t] for t in reduced]].max() <= distance[bi, hi, kept_src].min()


def test_ratio_zero_plan_is_the_identity():
    x = torch.randn(2, 2, 48, 8)
    keep, source = ops.token_match(x, 0.0, [3, 4, 4], [2, 2, 2], "euclidean", 0)
    assert torch.equal(keep, torch.arange(48).expand(2, 2, 48)) and torch.equal(source, keep)


# ---------------------------------------------------------------------------
# the pass, on traced models


class Rewritten(NamedTuple):
    gm: torch.fx.GraphModule
    report: dict


def _rewritten(family, **asymrnr):
    case = build(family)
    inputs = case.inputs(batch=2)
    gm = capture_graphs(case.model, inputs)[0]
    cfg = Config.from_options({"preset": "lossless", "asymrnr": asymrnr, "lowering": "eager"})
    for _, normalize in NORMALIZE:  # as the backend does: hand-written attention is SDPA by now
        normalize(gm)
    structure = analyze(gm)
    args = gm.example_inputs
    with torch.no_grad():
        reference = gm(*args)
    result = asymrnr_pass.rewrite(gm, structure, cfg.asymrnr)
    return Rewritten(gm, result.report), args, reference


def _values(gm, args):
    """Every node's value in one run of gm (the pass's graph, token_match run standalone)."""
    values = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            values[n] = super().run_node(n)
            return values[n]

    with torch.no_grad():
        Recorder(gm).run(*args)
    return values


@pytest.mark.parametrize("family, sites", [("cogvideox", 2), ("wan", 2), ("hunyuanvideo", 4), ("ltx", 2),
                                           ("latte", 2), ("pixart", 2), ("dit", 2), ("stdit", 2)])
def test_pass_counts_rewritten_sites_and_ratio_zero_is_exact(family, sites):
    result, args, reference = _rewritten(family, q_ratio=0.0, kv_ratio=0.0)
    assert len(result.report["rewritten"]) == sites
    assert len([n for n in result.gm.graph.nodes if n.target is ops.token_match.default]) == 2 * sites
    with torch.no_grad():
        assert torch.equal(result.gm(*args)[0], reference[0])


@pytest.mark.parametrize("family", ["cogvideox", "hunyuanvideo"])  # text first / text last with a key mask
def test_reduced_query_token_output_equals_its_destinations(family):
    result, args, _ = _rewritten(family, q_ratio=0.6, kv_ratio=0.0)
    values = _values(result.gm, args)
    for node in result.gm.graph.nodes:
        if node.target is not ops.restore.default:
            continue
        restored, source = values[node], values[node.args[1]]
        match = node.args[1].args[0]
        keep = values[match][0]
        token = torch.gather(keep, 2, source)  # the token whose output each token now carries
        assert (token != torch.arange(source.shape[-1])).any()  # something was reduced
        expected = torch.gather(restored, 2, token.unsqueeze(-1).expand_as(restored))
        assert torch.equal(restored, expected)


@pytest.mark.parametrize("family", ["cogvideox", "hunyuanvideo", "wan"])
def test_kv_reduction_in_replace_mode_is_attention_over_the_kept_keys(family):
    result, args, _ = _rewritten(family, q_ratio=0.0, kv_ratio=0.5)
    values = _values(result.gm, args)
    checked = 0
    for site in result.report["rewritten"]:
        sdpa = next(n for n in result.gm.graph.nodes if n.target is F.scaled_dot_product_attention
                    and module_path(n) == site["site"])
        q, k, v = (values[a] for a in sdpa_qkv(sdpa))
        reduce_k, reduce_v = (_find(a, ops.reduce.default) for a in sdpa_qkv(sdpa)[1:])
        video_k, video_v = values[reduce_k.args[0]], values[reduce_v.args[0]]
        keep = values[reduce_k.args[1]]
        assert reduce_v.args[1] is reduce_k.args[1]  # K and V share one match
        new_mask = sdpa.kwargs.get("attn_mask")
        mask = values[_find(new_mask, torch.Tensor.expand).args[0]] if new_mask is not None else None
        pre, post, n = site["text_before"], site["text_after"], site["tokens"]
        assert keep.shape[-1] == tm.reduced_length(n, tm.num_destinations(site["grid"], site["stride"]), 0.5)
        for bi in range(q.shape[0]):
            for hi in range(q.shape[1]):
                idx = keep[bi, hi]
                kk = torch.cat([k[bi, hi, :pre], video_k[bi, hi, idx], k[bi, hi, pre + len(idx):]])
                vv = torch.cat([v[bi, hi, :pre], video_v[bi, hi, idx], v[bi, hi, pre + len(idx):]])
                cols = None
                if mask is not None:
                    m = mask[bi, 0, 0]
                    cols = torch.cat([m[:pre], m[pre:pre + n][idx], m[pre + n:]])[None]
                expected = F.scaled_dot_product_attention(q[bi, hi][None], kk[None], vv[None], attn_mask=cols)[0]
                assert torch.allclose(values[sdpa][bi, hi], expected, atol=1e-5)
        checked += 1
    assert checked == len(result.report["rewritten"]) > 0


def _find(node, target):
    """The nearest node with `target` among node and its ancestors (breadth first)."""
    frontier = [node]
    while frontier:
        n = frontier.pop(0)
        if n.target is target:
            return n
        frontier.extend(n.all_input_nodes)
    raise AssertionError(f"no {target} above {node}")


def test_pass_reports_why_sites_are_left_alone():
    result, _, _ = _rewritten("latte", q_ratio=0.5)
    reasons = {s["reason"].split(" (")[0] for s in result.report["skipped"]}
    assert reasons == {"cross attention", "temporal attention"}


# ---------------------------------------------------------------------------
# runtime: the matching cache, schedules, variants


def _loop(inputs, steps, fn):
    return euler_loop(inputs, steps, "hidden_states", call)(fn)


def test_match_is_reused_for_match_every_steps_and_reset_per_generation():
    case = build("cogvideox")
    inputs = case.inputs(batch=1)
    fn = compile_ditopt(case.model, asymrnr={"q_ratio": 0.5, "kv_ratio": 0.3, "match_every": 3})
    _loop(inputs, 7, fn)
    _loop(inputs, 7, fn)  # the timestep goes back up: a new generation
    gens = [g for g in ditopt.stats(case.model)["generations"]]
    assert len(gens) == 2
    sites = 2 * 2  # 2 blocks x (q, kv)
    for g in gens:
        assert g["asymrnr"]["matchings"] == sites * math.ceil(7 / 3)  # steps 0, 3, 6
        assert g["asymrnr"]["reused"] == sites * 7 - g["asymrnr"]["matchings"]


def test_batch_or_dtype_change_never_reuses_a_stale_match():
    from ditopt.passes.asymrnr import MatchPlanner, MatchSite

    cfg = Config.from_options({"asymrnr": {"q_ratio": 0.5, "match_every": 50}}).asymrnr
    planner = MatchPlanner(cfg, {0: MatchSite(0, "attn", "q", (2, 4, 4), (2, 2, 2), "euclidean", (0, 1))}, 1)
    state = planner.new_state()
    for step, x in enumerate((torch.randn(1, 2, 32, 8), torch.randn(2, 2, 32, 8), torch.randn(2, 2, 32, 8).double(),
                              torch.randn(2, 2, 32, 8).double())):
        keep, source = planner.plan(0, x, step, state, cfg.match_every)
        assert keep.shape[0] == source.shape[0] == x.shape[0]
    assert planner.stats(state)["matchings"] == 3  # batch 1, batch 2, float64; then reused


def test_streams_keep_separate_matches():
    case = build("cogvideox")
    inputs = case.inputs(batch=1)
    fn = compile_ditopt(case.model, asymrnr={"q_ratio": 0.5, "match_every": 2})
    with torch.no_grad():
        for t in (900.0, 800.0, 700.0):
            for _ in range(2):  # cond and uncond at the same timestep
                call(fn, {**inputs, "timestep": torch.tensor([t])})
    gens = ditopt.stats(case.model)["generations"]
    assert sorted(g["stream"] for g in gens) == [0, 1]
    assert all(g["asymrnr"]["matchings"] == 4 * 2 for g in gens)  # steps 0 and 2 of each stream


def test_schedule_changing_ratios_over_50_steps_never_recompiles():
    case = build("cogvideox")
    inputs = case.inputs(batch=1)
    levels = [0.0, 0.25, 0.5]
    q_table = [[levels[(s + b) % 3] for s in range(50)] for b in range(2)]
    kv_table = [[levels[(s // 5) % 2] for s in range(50)] for b in range(2)]
    torch._dynamo.utils.counters.clear()
    fn = compile_ditopt(case.model, asymrnr={"schedule": "table", "q_table": q_table, "kv_table": kv_table})
    _loop(inputs, 50, fn)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    runtime = ditopt.runtime.runtimes_of(case.model)[0]
    block_keys = {k for k in runtime._fns if len(k) > 1}  # regions that read match plans
    assert len({k[1:] for k in block_keys}) <= 3 * 2  # at most one variant per (q level, kv level)
    g = ditopt.stats(case.model)["generations"][-1]
    assert g["asymrnr"]["q_plans"] == 100 and abs(g["asymrnr"]["q_ratio_sum"] - sum(map(sum, q_table))) < 1e-9


def test_tier_maps_follow_the_reference_format():
    assert tiers_to_ratios([[5, 6, 7, 9]], {6: 0.4, 7: 0.8}) == [[0.0, 0.4, 0.8, 0.8]]
    cfg = Config.from_options({"asymrnr": {"schedule": "table", "tiers": [[6, 8]], "q_tiers": {"6": 0.4},
                                           "kv_tiers": {8: 0.3}}}).asymrnr
    s = RatioSchedule(cfg, num_blocks=1)
    assert [s.ratio(0, step, "q", None) for step in (0, 1, 5)] == [0.4, 0.4, 0.4]
    assert [s.ratio(0, step, "kv", None) for step in (0, 1)] == [0.0, 0.3]
    with pytest.raises(ValueError, match="one row per block"):
        RatioSchedule(cfg, num_blocks=2)


@settings(max_examples=40, deadline=None)
@given(fraction=st.floats(0, 1), cap=st.sampled_from([0.0, 0.3, 0.5, 0.75, 0.9]))
def test_adaptive_level_is_the_largest_level_under_measurement_and_cap(fraction, cap):
    cfg = Config.from_options({"asymrnr": {"schedule": "adaptive", "q_ratio": cap}}).asymrnr
    level = RatioSchedule(cfg, 1).level_for(fraction, "q")
    assert level in (0.0, *cfg.levels) and level <= min(fraction, cap) + 1e-9
    assert all(lv > min(fraction, cap) + 1e-9 or lv <= level for lv in cfg.levels)


def test_adaptive_schedule_reduces_redundant_tokens_and_not_distinct_ones():
    """Copies of a few tokens are redundant; independent random tokens are not."""
    from ditopt.passes.asymrnr import MatchPlanner, MatchSite

    cfg = Config.from_options({"asymrnr": {"schedule": "adaptive", "q_ratio": 0.75}}).asymrnr
    site = MatchSite(0, "attn", "q", (2, 4, 4), (2, 2, 2), "euclidean", (0, 1))
    planner = MatchPlanner(cfg, {0: site}, 1)
    distinct = torch.randn(1, 2, 32, 16)
    dst, _ = tm.split_grid((2, 4, 4), (2, 2, 2), cfg.seed)
    redundant = distinct.clone()
    redundant[:, :, :] = distinct[:, :, dst[torch.arange(32) % dst.numel()]] + 0.01 * torch.randn(1, 2, 32, 16)
    kept = []
    for x in (distinct, redundant):
        kept.append(planner.plan(0, x, 0, planner.new_state())[0].shape[-1])
    assert kept[0] == 32 and kept[1] == 8  # 0.75 of 32 tokens removed


def test_unsupported_schedule_inputs_are_refused_clearly():
    with pytest.raises(ValueError, match="0 <= ratio < 1"):
        Config.from_options({"asymrnr": {"q_ratio": 1.0}})
    with pytest.raises(ValueError, match="needs q_table"):
        Config.from_options({"asymrnr": {"schedule": "table"}})
    with pytest.raises(ValueError, match="metric 'euclidean' or 'cosine'"):
        Config.from_options({"asymrnr": {"schedule": "adaptive", "metric": "dot"}})
    case = build("cogvideox")
    fn = compile_ditopt(case.model, asymrnr={"schedule": "table", "q_table": [[0.5]]})
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="one row per block"):  # Dynamo wraps it
        call(fn, case.inputs())


@pytest.mark.inductor
@pytest.mark.slow
def test_inductor_lowering_matches_eager_lowering_under_reduction():
    case = build("cogvideox")
    inputs = case.inputs(batch=2)
    opts = {"asymrnr": {"q_ratio": 0.5, "kv_ratio": 0.5}}
    eager = _loop(inputs, 3, compile_ditopt(case.model, **opts))
    torch._dynamo.reset()
    ditopt.reset(case.model)
    fn = torch.compile(case.model, backend="ditopt", options={"preset": "lossless", **opts})
    assert torch.allclose(_loop(inputs, 3, fn), eager, atol=1e-4)


def test_with_adacache_skipped_blocks_make_no_plans():
    case = build("cogvideox")
    inputs = case.inputs(batch=1)
    fn = compile_ditopt(case.model, asymrnr={"q_ratio": 0.5, "kv_ratio": 0.25},
                        adacache={"codebook": {"inf": 3}})  # skip whenever allowed
    out = _loop(inputs, 12, fn)
    g = ditopt.stats(case.model)["generations"][-1]
    assert g["blocks_skipped"] > 0 and torch.isfinite(out).all()
    assert g["asymrnr"]["q_plans"] == g["asymrnr"]["kv_plans"] == g["blocks_computed"]  # one site per block


# ---------------------------------------------------------------------------
# the reference's split: per block and feature, ragged border at random, match_every from the steps


def test_each_block_and_feature_draws_its_own_split():
    case = build("cogvideox")
    fn = compile_ditopt(case.model, asymrnr={"q_ratio": 0.5, "kv_ratio": 0.3})
    _loop(case.inputs(batch=1), 2, fn)
    (rt,) = ditopt.runtime.runtimes_of(case.model)
    (planner,) = [h for h in rt.hooks if h.name == "asymrnr"]
    state = rt.clock.stream(0).state[planner.name]
    splits = [tuple(m.dst.tolist()) for m in state.matches.values()]
    assert len(splits) == 4  # 2 blocks x (q, kv)
    assert len(set(splits)) == len(splits)  # no two share a split


def _leads(dst: torch.Tensor, grid, stride) -> set[tuple]:
    """Every per-axis offset of the cell grid under which dst holds exactly one token per full cell."""
    coords = [(d // (grid[1] * grid[2]), (d // grid[2]) % grid[1], d % grid[2]) for d in dst.tolist()]
    found = set()
    for lead in itertools.product(*(range(g % s + 1) for g, s in zip(grid, stride))):
        cells = [tuple((c - o) // s for c, o, s in zip(xyz, lead, stride)) for xyz in coords]
        inside = all(0 <= (c - o) < (g // s) * s for xyz in coords for c, o, g, s in zip(xyz, lead, grid, stride))
        if inside and len(set(cells)) == len(cells) == math.prod(g // s for g, s in zip(grid, stride)):
            found.add(lead)
    return found


@settings(max_examples=15, deadline=None)
@given(grid=st.tuples(st.integers(3, 5), st.integers(3, 8), st.integers(3, 8)))
def test_ragged_border_is_split_at_random_between_both_ends(grid):
    stride = (3, 3, 3)
    leads = set()
    for seed in range(24):
        dst, src = tm.split_grid(grid, stride, seed)
        assert len(dst) + len(src) == math.prod(grid)
        fits = _leads(dst, grid, stride)
        assert fits  # one destination per full cell of some offset grid
        leads |= fits
    # Like the reference, the cells start at a random offset below the remainder: with a remainder of 2
    # the border is sometimes all at the far end (offset 0), sometimes split between both ends (offset 1).
    for axis in [i for i, (g, s) in enumerate(zip(grid, stride)) if g % s >= 2]:
        assert {0, 1} <= {lead[axis] for lead in leads}


@pytest.mark.parametrize("steps, every", [(30, 3), (50, 5)])
def test_match_every_follows_the_step_count_by_default(steps, every):
    case = build("cogvideox")
    fn = compile_ditopt(case.model, asymrnr={"q_ratio": 0.5, "kv_ratio": 0.3})
    _loop(case.inputs(batch=1), steps, fn)
    _loop(case.inputs(batch=1), steps, fn)  # the second generation knows the first one's length
    sites = 2 * 2
    first, second = ditopt.stats(case.model)["generations"]
    assert second["asymrnr"]["matchings"] == sites * math.ceil(steps / every)
    assert first["asymrnr"]["matchings"] == sites * math.ceil(steps / every)  # from the timestep decrement


@pytest.mark.parametrize("max_noise, reducing_steps", [(0.5, 3), (1.0, 5), (0.0, 1)])
def test_high_noise_steps_reduce_nothing(max_noise, reducing_steps):
    case = build("cogvideox")
    fn = compile_ditopt(case.model, asymrnr={"q_ratio": 0.5, "kv_ratio": 0.3, "max_noise": max_noise})
    _loop(case.inputs(batch=1), 5, fn)  # timesteps 999, 749.25, 499.5, 249.75, 0
    (g,) = ditopt.stats(case.model)["generations"]
    plans_per_step = 2  # one q plan per block
    assert g["asymrnr"]["q_plans"] == 5 * plans_per_step
    assert abs(g["asymrnr"]["q_ratio_sum"] - 0.5 * reducing_steps * plans_per_step) < 1e-9


def test_with_a_skip_guard_matching_runs_on_computed_steps_only_and_plans_outlive_skipped_spans():
    from ditopt.harness import fixture
    from ditopt.runtime import runtimes_of

    model = fixture.load_fixture()
    fn = compile_ditopt(model, preset="fast", asymrnr={"match_every": 100})
    fixture.sample(fn, ["red square moving right"], seed=0, steps=16)
    gen = ditopt.stats(model)["generations"][-1]
    decisions, asym = gen["adacache"]["decisions"], gen["asymrnr"]
    (rt,) = runtimes_of(model)
    match_regions = len(next(h for h in rt.hooks if h.name == "asymrnr").sites)
    computed = decisions.count("C")
    assert "S" in decisions and match_regions > 0
    # every computed step plans each match region once; a skipped step plans nothing
    assert asym["matchings"] + asym["reused"] == computed * match_regions
    # matched once, at the first step: the plans are kept across every skipped span, never dropped
    assert asym["matchings"] == match_regions
