"""The analysis finds every family's blocks, sites and token layout from the Dynamo graph alone."""

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ditopt.harness import models
from ditopt.analysis import UnsupportedGraph, analyze
from ditopt.harness.stdit import STDiT

from conftest import capture_graphs


def _normalised(gm):
    """The graph as the analysis sees it in the backend: after the normalisation stage."""
    from ditopt.passes.pipeline import NORMALIZE

    for _, run in NORMALIZE:
        run(gm)
    return gm

# family -> (blocks, attention kinds of the first block, MLPs in the first block, grid)
EXPECTED = {
    "cogvideox": (2, [("joint", "full")], 1, (2, 4, 4)),
    "wan": (2, [("self", "full"), ("cross", "full")], 1, (3, 4, 4)),
    "hunyuanvideo": (4, [("joint", "full")], 2, (2, 4, 4)),
    "ltx": (2, [("self", "full"), ("cross", "full")], 1, None),
    "latte": (4, [("self", "spatial"), ("cross", "spatial")], 1, (3, 4, 4)),
    "pixart": (2, [("self", "full"), ("cross", "full")], 1, (1, 4, 4)),
    "dit": (2, [("self", "full")], 1, (1, 4, 4)),
    "stdit": (4, [("self", "spatial"), ("cross", "full")], 1, (3, 4, 4)),
}


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_family_structure(family):
    case = models.build(family)
    graphs = capture_graphs(case.model, case.inputs())
    assert len(graphs) == 1
    s = analyze(_normalised(graphs[0]))
    n_blocks, kinds, n_mlps, grid = EXPECTED[family]
    assert len(s.blocks) == n_blocks
    assert [(a.kind, a.axis) for a in s.blocks[0].attention] == kinds
    assert len(s.blocks[0].mlps) == n_mlps
    assert s.layout.grid == grid
    assert s.timestep_input is not None and "timestep" in s.timestep_input.name
    # every block's self/joint attention and MLP ends in a residual add
    for b in s.blocks:
        assert all(m.residual_add for m in b.mlps)
        assert all(a.residual_add for a in b.attention if a.kind in ("self", "joint"))


def test_joint_attention_text_span_is_found_where_the_model_puts_text():
    cog = analyze(capture_graphs(*_case("cogvideox"))[0]).blocks[0].attention[0]
    assert cog.video_span == (8, 32)  # CogVideoX: 8 text tokens first
    hun = analyze(capture_graphs(*_case("hunyuanvideo"))[0]).blocks[0].attention[0]
    assert hun.video_span == (0, 32)  # HunyuanVideo: video first, text after


def test_stdit_alternates_spatial_and_temporal_blocks():
    s = analyze(_normalised(capture_graphs(*_case("stdit"))[0]))
    axes = [b.attention[0].axis for b in s.blocks]
    assert axes == ["spatial", "temporal", "spatial", "temporal"]
    assert s.blocks[1].attention[0].q_len == 3  # temporal attention over the 3 frames


def test_hunyuan_text_refiner_blocks_are_excluded_with_a_reason():
    s = analyze(capture_graphs(*_case("hunyuanvideo"))[0])
    assert any("refiner" in e["path"] and "no video tokens" in e["reason"] for e in s.excluded_blocks)


def test_graph_without_blocks_is_unsupported():
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
    gm = capture_graphs(mlp, {"input": torch.randn(2, 3, 8)})[0]
    with pytest.raises(UnsupportedGraph):
        analyze(gm)


def _case(family):
    case = models.build(family)
    return case.model, case.inputs()


@settings(max_examples=8, deadline=None)
@given(
    depth=st.integers(1, 4),
    heads=st.sampled_from([1, 2, 4]),
    head_dim=st.sampled_from([8, 16]),
    mlp_ratio=st.sampled_from([2.0, 3.0, 4.0]),
    frames=st.integers(2, 4),
    side=st.sampled_from([2, 4, 6]),
    text=st.integers(1, 7),
)
@example(depth=1, heads=1, head_dim=8, mlp_ratio=2.0, frames=4, side=2, text=1)  # F == H*W: shapes alone are ambiguous
def test_random_block_stacks_are_found_exactly(depth, heads, head_dim, mlp_ratio, frames, side, text):
    dim = heads * head_dim
    model = STDiT(in_channels=4, out_channels=4, dim=dim, heads=heads, depth=depth, patch=2, caption_dim=16,
                  mlp_ratio=mlp_ratio).eval()
    inputs = dict(x=torch.randn(1, 4, frames, 2 * side, 2 * side), timestep=torch.tensor([10.0]),
                  y=torch.randn(1, text, 16))
    s = analyze(capture_graphs(model, inputs)[0])
    assert len(s.blocks) == 2 * depth
    assert s.layout.grid == (frames, side, side) and s.layout.text_tokens == text
    for i, b in enumerate(s.blocks):
        self_attn, cross = b.attention
        assert self_attn.axis == ("temporal" if i % 2 else "spatial")
        assert self_attn.q_len == (frames if i % 2 else side * side) and self_attn.heads == heads
        assert (cross.kind, cross.q_len, cross.kv_len) == ("cross", frames * side * side, text)
        assert [m.hidden for m in b.mlps] == [int(dim * mlp_ratio)]
        assert self_attn.gate and b.mlps[0].gate
