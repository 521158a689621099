"""Hand-written attention becomes SDPA exactly; everything else is left as written, with the reason."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

import ditopt
from ditopt.analysis import analyze
from ditopt.passes import normalize_attention, remove_inference_noops
from ditopt.patterns import SDPA_TARGETS, is_call

from conftest import capture_graphs, compile_ditopt


class HandWritten(nn.Module):
    """One attention written by hand, in one of the forms research code uses."""

    def __init__(self, scale_at: str, mask: str, upcast: bool, dim_name: bool, einsum: bool = False):
        super().__init__()
        self.scale_at, self.mask, self.upcast, self.dim_name, self.einsum = scale_at, mask, upcast, dim_name, einsum
        self.drop = nn.Dropout(0.2)

    def forward(self, q, k, v, m):
        d = q.shape[-1]
        if self.scale_at == "q":
            q = q * d ** -0.5
        if self.einsum:
            s = torch.einsum("bhqd,bhkd->bhqk", q, k)
        else:
            s = q @ k.transpose(-2, -1) if self.dim_name else torch.matmul(q, k.permute(0, 1, 3, 2))
        if self.scale_at == "mul":
            s = s * d ** -0.5
        elif self.scale_at == "div":
            s = s / math.sqrt(d)
        if self.mask == "additive":
            s = s + m
        elif self.mask == "boolean":
            s = s.masked_fill(~m, float("-inf"))
        if self.upcast:
            s = s.float()
        p = s.softmax(dim=-1) if self.dim_name else F.softmax(s, dim=-1)
        p = self.drop(p.to(v.dtype))
        return torch.einsum("bhqk,bhkd->bhqd", p, v) if self.einsum else p @ v


def _inputs(b, h, n, m, d, mask, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, length, d, generator=gen).to(dtype) for length in (n, m, m))
    if mask == "boolean":
        keep = torch.rand(b, 1, 1, m, generator=gen) > 0.3
        keep[..., 0] = True
        return dict(q=q, k=k, v=v, m=keep)
    return dict(q=q, k=k, v=v, m=torch.randn(b, 1, n, m, generator=gen).to(dtype))


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 2), h=st.integers(1, 3), n=st.integers(1, 12), m=st.integers(1, 12), d=st.integers(1, 16),
       scale_at=st.sampled_from(["q", "mul", "div", "none"]), mask=st.sampled_from(["none", "additive", "boolean"]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), dim_name=st.booleans(), einsum=st.booleans(),
       seed=st.integers(0, 99))
@example(b=2, h=2, n=8, m=6, d=11, scale_at="none", mask="additive", dtype=torch.bfloat16, dim_name=False,
         einsum=False, seed=57)
def test_hand_written_attention_becomes_one_sdpa_node_with_the_same_result(b, h, n, m, d, scale_at, mask, dtype,
                                                                           dim_name, einsum, seed):
    model = HandWritten(scale_at, mask, upcast=dtype != torch.float32, dim_name=dim_name, einsum=einsum).eval()
    inputs = _inputs(b, h, n, m, d, mask, dtype, seed)
    gm = capture_graphs(model, inputs)[0]
    args = gm.example_inputs
    with torch.no_grad():
        before = gm(*args)[0]
        remove_inference_noops.run(gm)
        report = normalize_attention.run(gm)
        after = gm(*args)[0]
    assert len(report["rewritten"]) == 1 and report["declined"] == []
    assert [n for n in gm.graph.nodes if is_call(n, normalize_attention.SOFTMAX)] == []
    assert len([n for n in gm.graph.nodes if is_call(n, SDPA_TARGETS)]) == 1
    if dtype == torch.float32:
        assert torch.allclose(after, before, atol=1e-5, rtol=1e-5)
    else:  # bf16: SDPA rounds elsewhere than the hand-written ops; it must be as close to exact as they are
        exact = HandWritten(scale_at, mask, upcast=False, dim_name=dim_name, einsum=einsum).eval()(
            *(x.double() if x.is_floating_point() else x for x in inputs.values()))
        err_after, err_before = ((y.double() - exact).abs().max() for y in (after, before))
        assert err_after <= 2 * err_before + 2 ** -8, (err_after, err_before)


def _declined(model, inputs):
    gm = capture_graphs(model, inputs)[0]
    remove_inference_noops.run(gm)
    return normalize_attention.run(gm)


def test_attention_that_sdpa_would_not_reproduce_is_left_with_the_reason():
    class MapReturned(nn.Module):
        def forward(self, q, k, v):
            p = (q @ k.transpose(-2, -1)).softmax(-1)
            return p @ v, p

    class HalfSoftmax(nn.Module):
        def forward(self, q, k, v):
            return (q @ k.transpose(-2, -1)).softmax(-1) @ v

    class OtherAxis(nn.Module):
        def forward(self, q, k, v):
            return (q @ k.transpose(-2, -1)).softmax(-2) @ v

    q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    cases = [(MapReturned(), dict(q=q, k=k, v=v), "read 2 times"),
             (HalfSoftmax(), dict(q=q.bfloat16(), k=k.bfloat16(), v=v.bfloat16()), "taken in torch.bfloat16"),
             (OtherAxis(), dict(q=q, k=k, v=v), "not over the last axis")]
    for model, inputs, why in cases:
        report = _declined(model, inputs)
        assert report["rewritten"] == [] and len(report["declined"]) == 1
        assert why in report["declined"][0]["reason"]


# --- the original DiT's structure, with timm's hand-written attention -----------------------


def _dit(fused):
    from timm_dit import DiT

    torch.manual_seed(0)
    return DiT(fused=fused).eval()


def _dit_loop(fn, steps=10):
    torch.manual_seed(1)
    x, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 10])  # 10: the null class
    with torch.no_grad():
        for t in torch.linspace(999, 0, steps):
            x = x - fn(x, t.expand(2), y)[:, :4] / steps
    return x


@pytest.mark.parametrize("fused", [True, False])
def test_dit_structure_is_found_whether_timm_fuses_attention_or_not(fused):
    model = _dit(fused)
    gm = capture_graphs(model, dict(x=torch.randn(2, 4, 8, 8), t=torch.tensor([500.0, 500.0]), y=torch.tensor([1, 2])))[0]
    remove_inference_noops.run(gm)
    normalize_attention.run(gm)
    s = analyze(gm)
    assert len(s.blocks) == 3 and [a.kind for a in s.blocks[0].attention] == ["self"]
    assert s.layout.grid == (1, 4, 4) and s.timestep_input is not None


def test_hand_written_dit_is_accelerated_and_lossless_stays_exact():
    from ditopt.runtime import count_flops

    model = _dit(fused=False)
    expected = _dit_loop(model)
    assert torch.allclose(_dit_loop(compile_ditopt(model)), expected, atol=1e-5)

    def flops(**options):
        torch._dynamo.reset()
        ditopt.reset(model)
        fn = compile_ditopt(model, **options)
        _dit_loop(fn)  # compiles
        ditopt.reset(model)
        with count_flops() as tally:
            _dit_loop(fn)
        return tally.flops, ditopt.stats(model)["generations"][-1]

    full, _ = flops()
    skipped, gen = flops(adacache={"codebook": {1e9: 3}})
    assert skipped < 0.8 * full and gen["blocks_skipped"] > 0
    cached, gen = flops(toca={"interval": 3, "ratio": 0.1})
    assert cached < full and gen["toca"]["computed_fraction"] < 1.0
    _, gen = flops(asymrnr={"q_ratio": 0.5, "kv_ratio": 0.3})
    assert gen["asymrnr"]["q_plans"] > 0 and gen["asymrnr"]["video_attention_fraction"] < 1.0
