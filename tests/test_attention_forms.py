"""Attention in every form research code writes it is an attention site, and every method acts on it.

Forms: SDPA; hand-written (`q @ k^T`, softmax, `@ v`); flash-attn's dense and packed (varlen) entry points;
xformers' packed batch with a BlockDiagonalMask; the same mask dense for SDPA; linear attention.  The
models are the project's STDiT3 re-implementation (interleaved spatial and temporal lists, a RoPE table
the first temporal block caches, packed cross-attention, the sampler's call that graph-breaks), a
packed-self-attention DiT, the original DiT's structure and a linear-attention DiT, all tiny and random.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import ditopt
from ditopt.harness.stdit3 import STDiT3
from ditopt.passes import packed_attention
from ditopt.patterns import SDPA_TARGETS, is_call
from ditopt.runtime import count_flops

import attention_libs
from conftest import capture_graphs, compile_ditopt

STEPS = 10


def _stdit3_call(sampler: bool):
    torch.manual_seed(1)
    x, y = torch.randn(2, 4, 3, 8, 8), torch.randn(2, 1, 6, 32)
    extra = {}
    if sampler:  # Open-Sora's sampler: a padded text mask and fps / height / width tensors
        mask = torch.ones(2, 6, dtype=torch.long)
        mask[0, 4:] = 0
        extra = dict(mask=mask, fps=torch.tensor([24.0, 24.0]), height=torch.tensor([64.0, 64.0]),
                     width=torch.tensor([64.0, 64.0]))
    return lambda fn, t: fn(x, t, y, **extra)


def _plain_call(channels=4):
    torch.manual_seed(1)
    x = torch.randn(2, channels, 2, 8, 8)
    return lambda fn, t: fn(x, t)


def _dit_call():
    torch.manual_seed(1)
    x, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 10])
    return lambda fn, t: fn(x, t, y)[:, :4]


def _case(name):
    """(model, call, libraries installed, expected forms of the self- and cross-attention sites)."""
    from linear_dit import LinearDiT
    from packed_dit import PackedDiT
    from timm_dit import DiT

    torch.manual_seed(0)
    if name == "stdit3_hand_written_dense_mask":
        return STDiT3().eval(), _stdit3_call(False), False, {"hand-written", "sdpa_block_mask"}
    if name == "stdit3_hand_written_xformers":
        return STDiT3().eval(), _stdit3_call(False), True, {"hand-written", "xformers::efficient_attention_forward_cutlass"}
    if name == "stdit3_flash_xformers":
        return (STDiT3(enable_flash_attn=True).eval(), _stdit3_call(False), True,
                {"flash_attn::_flash_attn_forward", "xformers::efficient_attention_forward_cutlass"})
    if name == "stdit3_sampler_call":
        return STDiT3().eval(), _stdit3_call(True), True, {"hand-written", "xformers::efficient_attention_forward_cutlass"}
    if name == "flash_varlen_self":
        return PackedDiT().eval(), _plain_call(), True, {"flash_attn::_flash_attn_varlen_forward"}
    if name == "dit_sdpa":
        return DiT(fused=True).eval(), _dit_call(), False, {"sdpa"}
    if name == "linear":
        return LinearDiT().eval(), _plain_call(), False, {"linear"}
    raise KeyError(name)


CASES = ["stdit3_hand_written_dense_mask", "stdit3_hand_written_xformers", "stdit3_flash_xformers",
         "stdit3_sampler_call", "flash_varlen_self", "dit_sdpa", "linear"]


@pytest.fixture
def case(request):
    needs_libs = request.param in ("stdit3_hand_written_xformers", "stdit3_flash_xformers", "stdit3_sampler_call",
                                   "flash_varlen_self")
    if needs_libs:
        attention_libs.install()  # before the model is built: STDiT3 looks xformers up at construction
    try:
        yield _case(request.param)
    finally:
        attention_libs.uninstall()


def _loop(fn, call):
    out = []
    with torch.no_grad():
        for t in torch.linspace(999, 0, STEPS):
            out.append(call(fn, t.expand(2)))
    return torch.stack(out)


def _reset(model):
    torch._dynamo.reset()
    ditopt.reset(model)
    if hasattr(model, "rope"):
        model.rope.cached_freqs = None  # the first call computes the RoPE table again


def _run(model, call, tmp_path=None, **options):
    _reset(model)
    if tmp_path is not None:
        options["export_dir"] = str(tmp_path)
    fn = compile_ditopt(model, **options)
    with count_flops() as tally:
        out = _loop(fn, call)
    generations = [g for r in ditopt.stats(model)["graphs"] for g in r.get("generations", [])]
    return out, tally.flops, generations


def _reports(tmp_path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(tmp_path.glob("graph_*/report.json"))]


@pytest.mark.parametrize("case", CASES, indirect=True)
def test_every_form_is_accelerated_and_lossless_stays_exact(case, tmp_path):
    model, call, _, forms = case
    _reset(model)
    expected = _loop(model, call)
    out, full, _ = _run(model, call, tmp_path / "lossless")
    assert (out - expected).abs().max() <= 1e-5
    accelerated = [r for r in _reports(tmp_path / "lossless") if r.get("structure")]
    assert len(accelerated) >= 1
    sites = [a for r in accelerated for b in r["structure"]["blocks"] for a in b["attention"]]
    assert {a["form"] for a in sites} == forms and all(a["kind"] != "other" for a in sites)
    listed = [n for r in accelerated for n in r["structure"]["attention_nodes"]]  # every attention node, found or not
    assert {n["node"] for n in listed if "kind" in n} == {a["sdpa"] for a in sites}
    assert all(n["form"] and ("kind" in n or n["left_alone"]) for n in listed)

    _, skipped, generations = _run(model, call, adacache={"codebook": {1e9: 3}})
    assert skipped < 0.8 * full and sum(g["blocks_skipped"] for g in generations) > 0

    _, cached, _ = _run(model, call, tmp_path / "toca", toca={"interval": 3})
    toca = [r["passes"]["toca"] for r in _reports(tmp_path / "toca") if r.get("structure")]
    if forms == {"linear"}:  # reusing rows of a linear attention is not exact per row: declined, with the reason
        assert all("linear attention" in s["reason"] for t in toca for s in t["skipped"] if "attn" in s["site"])
    else:
        assert cached < full

    _, _, _ = _run(model, call, tmp_path / "asymrnr", asymrnr={})
    for r in _reports(tmp_path / "asymrnr"):
        if not r.get("structure"):
            continue
        # every self-attention over a frame or the whole video (temporal ones span a few frames: declined)
        self_sites = {a["name"] for b in r["structure"]["blocks"] for a in b["attention"]
                      if a["kind"] == "self" and a["axis"] != "temporal"}
        report = r["passes"]["asymrnr"]
        assert {s["site"] for s in report["rewritten"]} == self_sites
        assert all(s["reason"] for s in report["skipped"])
        if forms == {"linear"}:
            assert all("linear" in s["reason"] for s in report["skipped"])


def test_stdit3_structure_interleaves_its_spatial_and_temporal_lists_and_keeps_the_first_temporal_block():
    model = STDiT3(depth=3).eval()
    gm = capture_graphs(model, dict(x=torch.randn(2, 4, 3, 8, 8), timestep=torch.tensor([500.0, 500.0]),
                                    y=torch.randn(2, 1, 6, 32)))[0]
    from ditopt.analysis import analyze
    from ditopt.passes.pipeline import NORMALIZE

    reports = {name: run(gm) for name, run in NORMALIZE}
    s = analyze(gm)
    assert [b.path for b in s.blocks] == [f"{kind}_blocks.{i}" for i in range(3) for kind in ("spatial", "temporal")]
    assert [(a.kind, a.axis) for a in s.blocks[1].attention] == [("self", "temporal"), ("cross", "full")]
    assert s.excluded_blocks == []
    # the RoPE table temporal_blocks.0 computes and caches moved out of it, for its siblings to read
    assert [h["module"].split(".")[0:2] for h in reports["hoist_block_constants"]["hoisted"]] == [["temporal_blocks", "0"]]


def test_a_forward_cut_by_graph_breaks_shares_one_generation_across_its_graphs():
    attention_libs.install()
    try:
        model, call, _, _ = _case("stdit3_sampler_call")
        _reset(model)
        fn = compile_ditopt(model, adacache={"codebook": {1e9: 3}})
        _loop(fn, call)
        _loop(fn, call)  # a second generation: the timestep rises again
    finally:
        attention_libs.uninstall()
    graphs = [g for g in ditopt.stats(model)["graphs"] if "blocks" in g]
    # The blocks' graph has no timestep input: it takes the step the earlier graph of the same call read, so the
    # second generation starts afresh there.  (Its first call traced the graph once more: the RoPE table cached.)
    assert [[g["steps"] for g in r["generations"]] for r in graphs] == [[1], [STEPS - 1, STEPS]]
    assert all(g["blocks_skipped"] > 0 for g in graphs[1]["generations"])


# --- packed attention: the rewrite is exact for every segmentation ---------------------------


class _Packed(torch.nn.Module):
    def __init__(self, form, q_lens, k_lens):
        super().__init__()
        self.form, self.q_lens, self.k_lens = form, q_lens, k_lens

    def forward(self, q, k, v):  # [1, T, H, D] packed
        if self.form == "xformers":
            import xformers.ops as xops

            bias = xops.fmha.BlockDiagonalMask.from_seqlens(self.q_lens, self.k_lens)
            return xops.memory_efficient_attention(q, k, v, attn_bias=bias)
        if self.form == "varlen":
            from flash_attn import flash_attn_varlen_func

            cu_q = torch.tensor([sum(self.q_lens[:i]) for i in range(len(self.q_lens) + 1)], dtype=torch.int32)
            cu_k = torch.tensor([sum(self.k_lens[:i]) for i in range(len(self.k_lens) + 1)], dtype=torch.int32)
            return flash_attn_varlen_func(q[0], k[0], v[0], cu_q, cu_k, max(self.q_lens), max(self.k_lens))[None]
        mask = torch.block_diag(*[torch.ones(a, b, dtype=torch.bool) for a, b in zip(self.q_lens, self.k_lens)])
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              attn_mask=mask).transpose(1, 2)


@settings(max_examples=30, deadline=None)
@given(form=st.sampled_from(["xformers", "varlen", "dense"]), samples=st.integers(1, 3), n=st.integers(1, 6),
       k_lens=st.lists(st.integers(1, 5), min_size=3, max_size=3), heads=st.integers(1, 3), dim=st.integers(1, 8),
       seed=st.integers(0, 99))
def test_packed_attention_becomes_per_sample_sdpa_with_the_same_result(form, samples, n, k_lens, heads, dim, seed):
    attention_libs.install()
    try:
        k_lens = k_lens[:samples]
        gen = torch.Generator().manual_seed(seed)
        q = torch.randn(1, samples * n, heads, dim, generator=gen)
        k, v = (torch.randn(1, sum(k_lens), heads, dim, generator=gen) for _ in range(2))
        gm = capture_graphs(_Packed(form, [n] * samples, k_lens), dict(q=q, k=k, v=v))[0]
        args = gm.example_inputs
        with torch.no_grad():
            before = gm(*args)[0]
            report = packed_attention.run(gm)
            after = gm(*args)[0]
    finally:
        attention_libs.uninstall()
    if form == "dense" and samples == 1:  # one block is a plain attention, not a packed batch
        assert report["rewritten"] == [] and "one block" in report["declined"][0]["reason"]
        return
    assert len(report["rewritten"]) == 1 and report["rewritten"][0]["key_lengths"] == k_lens
    sdpa = [node for node in gm.graph.nodes if is_call(node, SDPA_TARGETS)]
    assert len(sdpa) == 1 and tuple(sdpa[0].meta["example_value"].shape) == (samples, heads, n, dim)
    assert torch.allclose(after, before, atol=1e-5, rtol=1e-5)


def test_packed_attention_that_is_not_per_sample_is_left_with_the_reason():
    attention_libs.install()
    try:
        q, k, v = torch.randn(1, 7, 2, 4), torch.randn(1, 6, 2, 4), torch.randn(1, 6, 2, 4)
        unequal = _declined(_Packed("xformers", [3, 4], [2, 4]), q, k, v)
        assert "query segments differ in length" in unequal
        gm = capture_graphs(_FromInputs(), dict(q=q, k=k, v=v, cu=torch.tensor([0, 3, 7], dtype=torch.int32)))[0]
        reason = packed_attention.run(gm)["declined"][0]["reason"]
        assert "not a graph constant" in reason
    finally:
        attention_libs.uninstall()


class _FromInputs(torch.nn.Module):
    def forward(self, q, k, v, cu):
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func(q[0], k[0], v[0], cu, torch.tensor([0, 2, 6], dtype=torch.int32), 4, 4)


def _declined(model, q, k, v) -> str:
    gm = capture_graphs(model, dict(q=q, k=k, v=v))[0]
    report = packed_attention.run(gm)
    assert report["rewritten"] == []
    return report["declined"][0]["reason"]


def test_block_diagonal_segments_reads_the_blocks_of_a_mask_and_refuses_others():
    mask = torch.block_diag(torch.ones(2, 3), torch.ones(3, 1), torch.ones(1, 2)).bool()
    assert packed_attention.block_diagonal_segments(mask) == ([0, 2, 5, 6], [0, 3, 4, 6])
    with pytest.raises(packed_attention.Declined, match="contiguous"):
        packed_attention.block_diagonal_segments(torch.tensor([[True, False, True]]))
    with pytest.raises(packed_attention.Declined, match="tile"):
        packed_attention.block_diagonal_segments(torch.tensor([[True, False], [True, True]]))


@settings(max_examples=5, deadline=None)
@given(depth=st.integers(1, 3), frames=st.integers(2, 4), heads=st.sampled_from([1, 2]), seed=st.integers(0, 99))
def test_hoisting_block_constants_keeps_the_graph_exact_and_moves_them_before_every_block(depth, frames, heads, seed):
    from ditopt.analysis import _block_path_of
    from ditopt.passes import hoist_block_constants

    torch.manual_seed(seed)
    model = STDiT3(depth=depth, num_heads=heads).eval()
    gm = capture_graphs(model, dict(x=torch.randn(1, 4, frames, 4, 4), timestep=torch.tensor([float(seed)]),
                                    y=torch.randn(1, 1, 3, 32)))[0]
    args = gm.example_inputs
    with torch.no_grad():
        before = gm(*args)
        report = hoist_block_constants.run(gm)
        after = gm(*args)
    assert all(torch.equal(a, b) for a, b in zip(after, before))
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    hoisted = [n for n in gm.graph.nodes if n.meta.get("ditopt_hoisted")]
    first_block = min(order[n] for n in gm.graph.nodes
                      if n.op == "call_function" and _block_path_of(n) and not n.meta.get("ditopt_hoisted"))
    assert report["hoisted"] and hoisted and max(order[n] for n in hoisted) < first_block
    assert all(h["module"].startswith("temporal_blocks.0.") for h in report["hoisted"])


# --- block layouts: a stack of two blocks per list item, a block list cut by a data-dependent break ----


class _Block(torch.nn.Module):
    def __init__(self, dim=32, heads=2):
        super().__init__()
        self.heads = heads
        self.norm = torch.nn.LayerNorm(dim, elementwise_affine=False)
        self.qkv, self.proj = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)
        self.fc1, self.fc2 = torch.nn.Linear(dim, 2 * dim), torch.nn.Linear(2 * dim, dim)
        self.modulation = torch.nn.Linear(dim, 2 * dim)

    def forward(self, x, c):
        b, n, d = x.shape
        gate1, gate2 = self.modulation(F.silu(c))[:, None].chunk(2, dim=-1)
        q, k, v = self.qkv(self.norm(x)).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        x = x + gate1 * self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))
        return x + gate2 * self.fc2(F.gelu(self.fc1(self.norm(x))))


class _Pair(torch.nn.Module):
    """Two blocks run as one list item (a spatial-temporal pair in one module)."""

    def __init__(self, dim):
        super().__init__()
        self.first, self.second = _Block(dim), _Block(dim)

    def forward(self, x, c):
        return self.second(self.first(x, c), c)


class _LayoutDiT(torch.nn.Module):
    """Blocks as pairs in one list ("stack"), or one list with a data-dependent break after block 1 ("cut")."""

    def __init__(self, layout: str, depth: int = 4, dim: int = 32):
        super().__init__()
        self.layout, self.dim = layout, dim
        self.embed = torch.nn.Conv3d(4, dim, (1, 2, 2), (1, 2, 2))
        self.t_mlp = torch.nn.Linear(dim, dim)
        self.blocks = torch.nn.ModuleList(_Pair(dim) if layout == "stack" else _Block(dim) for _ in range(depth))
        self.out = torch.nn.Linear(dim, 16)

    def forward(self, x, timestep):
        b, _, f, h, w = x.shape
        freqs = torch.exp(-9.21 * torch.arange(self.dim // 2, dtype=torch.float32) / (self.dim // 2))
        c = self.t_mlp(torch.cat([torch.cos(timestep[:, None] * freqs), torch.sin(timestep[:, None] * freqs)], -1))
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        if self.layout == "cut":
            for block in self.blocks[:2]:
                tokens = block(tokens, c)
            if tokens.isnan().any():  # a data-dependent branch: a graph break between blocks
                tokens = tokens.nan_to_num()
            for block in self.blocks[2:]:
                tokens = block(tokens, c)
        else:
            for block in self.blocks:
                tokens = block(tokens, c)
        out = self.out(tokens).view(b, f, h // 2, w // 2, 2, 2, 4)
        return out.permute(0, 6, 1, 2, 4, 3, 5).reshape(b, 4, f, h, w)


@pytest.mark.parametrize("layout", ["stack", "cut"])
def test_stacked_blocks_and_blocks_cut_across_graphs_are_accelerated(layout):
    torch.manual_seed(0)
    model = _LayoutDiT(layout).eval()
    call = _plain_call()
    _reset(model)
    expected = _loop(model, call)
    out, full, _ = _run(model, call)
    assert (out - expected).abs().max() <= 1e-5
    graphs = [g for g in ditopt.stats(model)["graphs"] if "blocks" in g]
    assert [g["blocks"] for g in graphs] == ([4] if layout == "stack" else [2, 2])  # each graph with whole blocks
    _reset(model)
    fn = compile_ditopt(model, adacache={"codebook": {1e9: 3}})
    with count_flops() as tally:
        _loop(fn, call)
        _loop(fn, call)
    assert tally.flops < 0.8 * 2 * full
    graphs = [g for g in ditopt.stats(model)["graphs"] if "adacache" in g.get("methods", [])]
    assert len(graphs) == (1 if layout == "stack" else 2)
    # one generation per loop in every graph: the graph after the break takes the step the first one read
    assert all([g["steps"] for g in r["generations"]] == [STEPS, STEPS] for r in graphs)
    assert all(g["blocks_skipped"] > 0 for r in graphs for g in r["generations"])


@torch.library.custom_op("ditopt_test::fused_attention_forward", mutates_args=())
def _unknown_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v)


@_unknown_attention.register_fake
def _(q, k, v):
    return torch.empty_like(q)


def test_an_attention_op_without_a_rule_is_the_fallback_reason_naming_the_node_and_op():
    import warnings

    from linear_dit import LinearDiT

    class Unknown(torch.nn.Module):
        def forward(self, x):
            b, n, c = x.shape
            q = x.view(b, n, 2, -1).transpose(1, 2)
            return torch.ops.ditopt_test.fused_attention_forward(q, q, q).transpose(1, 2).reshape(b, n, c)

    model = LinearDiT().eval()
    for block in model.blocks:
        block.attn = Unknown()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _loop(compile_ditopt(model), _plain_call())
    reasons = [str(w.message) for w in caught if "ditopt" in str(w.message)]
    assert len(reasons) == 1 and "calls ditopt_test::fused_attention_forward" in reasons[0]
    assert "blocks.0.attn" in reasons[0]
