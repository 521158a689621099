"""Step-invariant caching: lossless, fewer FLOPs, and recomputed whenever what it was computed from changes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ditopt
from ditopt.harness import models
from ditopt.runtime import count_flops

from conftest import compile_ditopt



def _steps(fn, inputs: dict, steps: int = 4, change=None) -> torch.Tensor:
    """A short loop over falling timesteps; `change(step, inputs)` may replace inputs before a step."""
    outs = []
    with torch.no_grad():
        for i in range(steps):
            if change is not None:
                inputs = change(i, inputs)
            t = inputs["timestep"]
            outs.append(models.call(fn, {**inputs, "timestep": torch.full_like(t, 900 - 100 * i)}))
    return torch.stack(outs)


def _compiled(model, **options):
    torch._dynamo.reset()
    ditopt.reset(model)
    return compile_ditopt(model, **options)


def _section(model) -> dict:
    """The last generation's invariants counters (its cache size is tests/test_memory.py's)."""
    return _counters(ditopt.stats(model)["generations"][-1]["invariants"])


def _counters(section: dict) -> dict:
    return {k: v for k, v in section.items() if k != "cache_bytes"}


@pytest.mark.parametrize("family", ["wan", "pixart", "stdit"])
def test_lossless_caches_the_invariant_computation_bit_identically_and_saves_flops(family):
    case = models.build(family)
    inputs = case.inputs(batch=2)
    expected = _steps(case.model, inputs)
    with count_flops() as off:
        plain = _steps(_compiled(case.model, invariants=False), inputs)
    with count_flops() as on:
        cached = _steps(_compiled(case.model), inputs)  # the lossless preset includes it
    assert torch.equal(cached, plain)  # the same ops on the same values: bit-identical to ditopt without it
    assert (cached - expected).abs().max() <= 1e-5
    assert _section(case.model) == {"computed": 1, "reused": 3}
    assert on.flops < off.flops


def _text_key(family: str) -> str:
    return "y" if family == "stdit" else "encoder_hidden_states"


@pytest.mark.parametrize("family", ["wan", "pixart"])
def test_a_new_prompt_mid_generation_or_the_text_changed_in_place_is_recomputed(family):
    case = models.build(family)
    key = _text_key(family)
    inputs = case.inputs(batch=2)
    other = case.inputs(batch=2, seed=5)[key]

    def new_prompt(i, inp):
        return {**inp, key: other} if i == 2 else inp

    def in_place(i, inp):
        if i == 2:
            inp[key].mul_(0.5)  # the same tensor object, written in place
        return inp

    for change in (new_prompt, in_place):
        fresh = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        expected = _steps(case.model, dict(fresh), change=change)
        fresh = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        out = _steps(_compiled(case.model), dict(fresh), change=change)
        assert (out - expected).abs().max() <= 1e-5, change.__name__
        assert _section(case.model) == {"computed": 2, "reused": 2}, change.__name__


def test_a_new_batch_and_a_new_generation_recompute():
    case = models.build("wan")
    fn = _compiled(case.model)
    for batch in (1, 2):
        inputs = case.inputs(batch=batch)
        for _ in range(2):  # two generations at each batch size
            out = _steps(fn, inputs)
            assert (out - _steps(case.model, inputs)).abs().max() <= 1e-5
            assert _section(case.model) == {"computed": 1, "reused": 3}


def test_two_streams_keep_their_own_cached_text():
    """Separate cond and uncond calls at each step, with different text: each stream computes once."""
    case = models.build("wan")
    cond, uncond = case.inputs(batch=1), case.inputs(batch=1, seed=3)
    fn = _compiled(case.model)
    with torch.no_grad():
        for i in range(4):
            for inp in (cond, uncond):
                t = torch.full_like(inp["timestep"], 900 - 100 * i)
                got = models.call(fn, {**inp, "timestep": t})
                assert (got - models.call(case.model, {**inp, "timestep": t})).abs().max() <= 1e-5
    sections = [_counters(g["invariants"]) for g in ditopt.stats(case.model)["generations"]]
    assert sections == [{"computed": 1, "reused": 3}, {"computed": 1, "reused": 3}]


class _TextDiT(torch.nn.Module):
    """Blocks with cross-attention to a text that a caption MLP embeds: the K/V are step-invariant."""

    def __init__(self, dim=16, depth=2):
        super().__init__()
        self.embed = torch.nn.Conv3d(4, dim, (1, 2, 2), (1, 2, 2))
        self.caption = torch.nn.Sequential(torch.nn.Linear(8, dim), torch.nn.GELU(), torch.nn.Linear(dim, dim))
        self.t = torch.nn.Linear(1, dim)
        self.q = torch.nn.ModuleList(torch.nn.Linear(dim, dim) for _ in range(depth))
        self.kv = torch.nn.ModuleList(torch.nn.Linear(dim, 2 * dim) for _ in range(depth))
        self.blocks = torch.nn.ModuleList(_CrossBlock(dim) for _ in range(depth))
        self.out = torch.nn.Linear(dim, 16)

    def forward(self, x, timestep, text):
        b, _, f, h, w = x.shape
        c = self.t(torch.sin(timestep)[:, None])
        y = self.caption(text)
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        for block in self.blocks:
            tokens = block(tokens, y, c)
        out = self.out(tokens).view(b, f, h // 2, w // 2, 2, 2, 4)
        return out.permute(0, 6, 1, 2, 4, 3, 5).reshape(b, 4, f, h, w)


class _CrossBlock(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.qkv, self.q, self.kv = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim), torch.nn.Linear(dim, 2 * dim)
        self.fc1, self.fc2 = torch.nn.Linear(dim, 2 * dim), torch.nn.Linear(2 * dim, dim)

    def forward(self, x, y, c):
        q, k, v = (t[:, None] for t in self.qkv(x + c[:, None]).chunk(3, -1))
        x = x + torch.nn.functional.scaled_dot_product_attention(q, k, v)[:, 0]
        k, v = (t[:, None] for t in self.kv(y).chunk(2, -1))
        x = x + torch.nn.functional.scaled_dot_product_attention(self.q(x)[:, None], k, v)[:, 0]
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(x)))


@settings(max_examples=8, deadline=None)
@given(batch=st.integers(1, 2), text=st.integers(1, 6), frames=st.integers(1, 3), change_at=st.integers(0, 3),
       seed=st.integers(0, 99))
def test_cached_steps_equal_eager_for_any_shapes_and_prompt_change(batch, text, frames, change_at, seed):
    torch.manual_seed(seed)
    model = _TextDiT().eval()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, frames, 4, 4, generator=gen)
    prompts = [torch.randn(batch, text, 8, generator=gen) for _ in range(2)]
    fn = _compiled(model)
    with torch.no_grad():
        for i in range(4):
            t, y = torch.full((batch,), 900.0 - 100 * i), prompts[int(i >= change_at)]
            assert torch.allclose(fn(x, t, y), model(x, t, y), atol=1e-5)
    assert _section(model) == {"computed": 1 + (change_at > 0), "reused": 3 - (change_at > 0)}
