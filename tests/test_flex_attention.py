"""The flex_attention normalisation rule (passes/flex_attention.py): rewritten to SDPA exactly when its
score_mod returns the score and its mask admits every pair; left as it is, with the reason, otherwise."""

from __future__ import annotations

import warnings

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from ditopt.passes import flex_attention as rule

from conftest import capture_graphs


def _identity(score, b, h, q, k):
    return score


def _bias(score, b, h, q, k):
    return score + (q - k).float() * 0.01


def _noop(b, h, q, k):  # flex's own no-op mask
    return b.new_ones(size=(), dtype=torch.bool, device=b.device)


def _always_true(b, h, q, k):  # true for every pair, but computed: the rule cannot prove it and declines
    return q >= 0


def _causal(b, h, q, k):
    return q >= k


class Flex(torch.nn.Module):
    def __init__(self, score_mod, mask_mod, scale):
        super().__init__()
        self.score_mod, self.mask_mod, self.scale = score_mod, mask_mod, scale

    def forward(self, q, k, v):
        mask = None
        if self.mask_mod is not None:
            mask = create_block_mask(self.mask_mod, None, None, q.shape[2], k.shape[2], device="cpu")
        return flex_attention(q, k, v, score_mod=self.score_mod, block_mask=mask, scale=self.scale)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=st.integers(1, 2), h=st.integers(1, 3), n=st.sampled_from([8, 16, 24]), m=st.sampled_from([8, 16]),
       d=st.sampled_from([8, 16]), scale=st.sampled_from([None, 0.5]), score=st.sampled_from(["identity", "bias"]),
       mask=st.sampled_from(["none", "noop", "computed", "causal"]), seed=st.integers(0, 99))
def test_flex_is_rewritten_exactly_when_it_is_sdpa(b, h, n, m, d, scale, score, mask, seed):
    if mask == "causal":
        m = n
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, length, d, generator=gen) for length in (n, m, m))
    model = Flex({"identity": _identity, "bias": _bias}[score],
                 {"none": None, "noop": _noop, "computed": _always_true, "causal": _causal}[mask], scale)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = model(q, k, v)
        (gm,) = capture_graphs(model, dict(q=q, k=k, v=v))
        report = rule.run(gm)
        got = gm(*gm.example_inputs)
    exact = score == "identity" and mask in ("none", "noop")
    assert len(report["rewritten"]) == (1 if exact else 0), report
    if not exact:
        assert report["declined"] and report["declined"][0]["reason"]
    out = got[0] if isinstance(got, (list, tuple)) else got
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    if exact:
        assert not any(rule.is_flex(n) for n in gm.graph.nodes)
