"""Regions: a partition of the graph in order; identical blocks share one compiled variant."""

import torch

from ditopt.analysis import analyze
from ditopt.lowering import graph_key, split_regions
from ditopt.runtime import runtimes_of
from ditopt.harness.stdit import STDiT

from conftest import capture_graphs, compile_ditopt


def _stdit(depth):
    torch.manual_seed(0)
    model = STDiT(dim=32, heads=2, depth=depth, caption_dim=16).eval()
    inputs = dict(x=torch.randn(1, 4, 3, 8, 8), timestep=torch.tensor([500.0]), y=torch.randn(1, 5, 16))
    return model, inputs


def test_regions_cover_every_node_once_in_order():
    model, inputs = _stdit(2)
    gm = capture_graphs(model, inputs)[0]
    s = analyze(gm)
    regions, _, _ = split_regions(gm, s)
    body = [n.name for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    copied = [n.name for r in regions for n in r.gm.graph.nodes if n.op not in ("placeholder", "output")]
    assert copied == body
    assert [r.kind for r in regions] == ["prologue", "block", "block", "block", "block", "epilogue"]
    assert [r.block for r in regions if r.kind == "block"] == [0, 1, 2, 3]


def test_spatial_and_temporal_blocks_have_two_distinct_keys():
    model, inputs = _stdit(3)
    gm = capture_graphs(model, inputs)[0]
    regions, _, _ = split_regions(gm, analyze(gm))
    keys = {graph_key(r.gm) for r in regions if r.kind == "block"}
    assert len(keys) == 2


def test_compiled_variants_do_not_grow_with_depth():
    counts = {}
    for mode in ("block", "none"):
        for depth in (2, 5):
            torch._dynamo.reset()
            model, inputs = _stdit(depth)
            with torch.no_grad():
                compile_ditopt(model, fuse_regions=mode)(**inputs)
            (rt,) = runtimes_of(model)
            counts[mode, depth] = rt.stats()["compiled_variants"]
    # fused within blocks: the invariant region, prologue + first spatial block, temporal, spatial,
    # last temporal block + epilogue; unfused: the invariant region, prologue, spatial, temporal, epilogue
    assert counts == {("block", 2): 5, ("block", 5): 5, ("none", 2): 5, ("none", 5): 5}
