"""The pass pipeline: declared order, counted matches, and (all methods off) exact equivalence."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ditopt import Config
from ditopt.analysis import analyze
from ditopt.passes import PIPELINE, run_pipeline
from ditopt.stdit import STDiT

from conftest import capture_graphs


def test_pipeline_is_declared_once_in_order():
    assert [p.name for p in PIPELINE] == ["remove_inference_noops", "toca", "asymrnr", "adacache"]


@settings(max_examples=5, deadline=None)
@given(layers=st.integers(1, 3), heads=st.integers(1, 2), frames=st.integers(1, 3))
def test_noop_removal_counts_wan_dropouts_and_preserves_output(layers, heads, frames):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=8, in_channels=4,
                                  out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=layers,
                                  rope_max_seq_len=16).eval()
    inputs = dict(hidden_states=torch.randn(1, 4, frames, 4, 4), timestep=torch.tensor([300.0]),
                  encoder_hidden_states=torch.randn(1, 3, 16), return_dict=False)
    gm = capture_graphs(model, inputs)[0]
    flat = [n for n in gm.graph.nodes if n.op == "placeholder"]
    args = _example_args(gm)
    with torch.no_grad():
        before = gm(*args)[0]
        gm2, structure, reports = run_pipeline(gm, analyze(gm), Config.from_options({"lowering": "eager"}))
        after = gm2(*args)[0]
    assert reports["remove_inference_noops"]["removed"]["dropout"] == 3 * layers
    assert len(structure.blocks) == layers
    assert len([n for n in gm2.graph.nodes if n.op == "placeholder"]) == len(flat)
    assert torch.equal(before, after)


def _example_args(gm):
    return gm.example_inputs


@settings(max_examples=5, deadline=None)
@given(depth=st.integers(1, 3), frames=st.integers(1, 4))
def test_pipeline_output_equals_input_graph_on_stdit(depth, frames):
    torch.manual_seed(depth)
    model = STDiT(dim=32, heads=2, depth=depth, caption_dim=16).eval()
    inputs = dict(x=torch.randn(1, 4, frames, 8, 8), timestep=torch.tensor([250.0]), y=torch.randn(1, 4, 16))
    gm = capture_graphs(model, inputs)[0]
    args = _example_args(gm)
    with torch.no_grad():
        before = gm(*args)[0]
        gm2, _, reports = run_pipeline(gm, analyze(gm), Config.from_options({"lowering": "eager"}))
        assert torch.equal(gm2(*args)[0], before)
    assert reports["remove_inference_noops"]["removed"] == {"float": 1}  # timestep.float() on a float tensor
