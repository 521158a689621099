"""ditopt's custom ops: opcheck (schema, fake impl, autograd registration) and their defining properties."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ditopt.passes.pipeline  # noqa: F401  (registers every method's torch.ops.ditopt ops)

ops = torch.ops.ditopt


def _reduce_plan(b, h, s, keep, gen):
    """A random reduction: `keep` kept tokens per (batch, head); every other token maps to a kept one."""
    kept = torch.stack([torch.randperm(s, generator=gen)[:keep].sort().values for _ in range(b * h)]).view(b, h, keep)
    source = torch.randint(0, keep, (b, h, s), generator=gen)
    source.scatter_(2, kept, torch.arange(keep).expand(b, h, keep).contiguous())
    return kept, source


@pytest.mark.parametrize("name", ["reduce", "restore", "cache_lookup", "skip_guard", "toca_rows", "gather_rows",
                                  "toca_update", "attention_column_score", "attention_entropy"])
def test_opcheck(name):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 10, 4, generator=gen)
    kept, source = _reduce_plan(2, 3, 10, 6, gen)
    args = {
        "reduce": (x, kept),
        "restore": (torch.randn(2, 3, 6, 4, generator=gen), source),
        "cache_lookup": (torch.randn(2, 3, 5, generator=gen), torch.randn(2, 7, 5, generator=gen),
                         torch.tensor([[0, 3, 6], [1, 2, 5]])),
        "skip_guard": (x, 3),
        "toca_rows": (torch.randn(2, 7, 5, generator=gen), 1),
        "gather_rows": (torch.randn(2, 7, 5, generator=gen), torch.tensor([[0, 3, 6], [1, 2, 5]])),
        "toca_update": (torch.randn(2, 7, 5, generator=gen), torch.arange(7).expand(2, 7).contiguous(), 1, 7),
        "attention_column_score": (x, torch.randn(2, 3, 8, 4, generator=gen), None, None),
        "attention_entropy": (x, torch.randn(2, 3, 8, 4, generator=gen), torch.rand(2, 1, 1, 8, generator=gen) > 0.2, 0.3),
    }[name]
    torch.library.opcheck(getattr(ops, name).default, args)


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 3), h=st.integers(1, 4), s=st.integers(1, 37), d=st.integers(1, 9), data=st.data())
def test_restore_of_reduce_keeps_kept_tokens_and_copies_destinations(b, h, s, d, data):
    keep = data.draw(st.integers(1, s))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    x = torch.randn(b, h, s, d, generator=gen)
    kept, source = _reduce_plan(b, h, s, keep, gen)
    restored = ops.restore(ops.reduce(x, kept), source)
    for bi in range(b):
        for hi in range(h):
            for tok in range(s):
                row = int(source[bi, hi, tok])
                expected = x[bi, hi, int(kept[bi, hi, row])]  # itself when kept, its destination otherwise
                assert torch.equal(restored[bi, hi, tok], expected)


@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 3), h=st.integers(1, 3), s=st.integers(1, 20))
def test_ratio_zero_reduce_and_restore_are_the_identity(b, h, s):
    x = torch.randn(b, h, s, 5)
    everything = torch.arange(s).expand(b, h, s).contiguous()
    assert torch.equal(ops.restore(ops.reduce(x, everything), everything), x)


@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 3), n=st.integers(1, 30), c=st.integers(1, 6), data=st.data())
def test_cache_lookup_takes_fresh_rows_at_index_and_cache_elsewhere(b, n, c, data):
    k = data.draw(st.integers(0, n))
    index = torch.stack([torch.randperm(n)[:k] for _ in range(b)]) if k else torch.zeros(b, 0, dtype=torch.long)
    fresh, cache = torch.randn(b, k, c), torch.randn(b, n, c)
    out = ops.cache_lookup(fresh, cache, index)
    chosen = torch.zeros(b, n, dtype=torch.bool).scatter_(1, index, True)
    assert torch.equal(out[~chosen], cache[~chosen])
    assert torch.equal(torch.gather(out, 1, index.unsqueeze(-1).expand(b, k, c)), fresh)


def test_skip_guard_is_the_identity_when_run_unlowered():
    x = torch.randn(3, 4)
    assert torch.equal(ops.skip_guard(x, 0), x)
