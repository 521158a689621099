"""Context parallelism: the ranks' decisions agree, lossless stays exact, bad input fails on every rank."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ditopt.parallel import check_split
from ditopt.passes.adacache.hook import motion_score, motion_sums
from ditopt.passes.skipping import relative_l1_sums

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "context_parallel.py"


def _torchrun(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(EXAMPLE), *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_two_ranks_take_the_same_decisions_and_lossless_equals_one_process():
    run = _torchrun("--steps", "16")  # balanced computes every one of 12 steps on the fixture
    lines = [line for line in run.stdout.splitlines() if line.startswith("[rank")]
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    decisions = {line.split()[1]: line.split("decisions ")[1].split()[0] for line in lines if " decisions " in line
                 and line.split()[2] == "balanced"}
    assert set(decisions) == {"0]", "1]"} and len(set(decisions.values())) == 1
    assert "S" in next(iter(decisions.values()))  # balanced skips: the agreement is about real decisions
    assert sum("lossless" in line and "max |difference| to one process 0.00e+00" in line for line in lines) == 2


def test_options_that_differ_between_ranks_are_refused_on_every_rank_not_a_hang():
    run = _torchrun("--rank-options-differ", timeout=90)
    refused = [line for line in run.stdout.splitlines() if "refused: ValueError" in line and "differ" in line]
    assert run.returncode == 0 and len(refused) == 2, run.stdout[-3000:] + run.stderr[-3000:]


def test_heads_that_ulysses_cannot_split_are_a_clear_error():
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(num_attention_heads=3, attention_head_dim=8, in_channels=4, out_channels=4,
                                  text_dim=16, freq_dim=16, ffn_dim=32, num_layers=1)
    with pytest.raises(ValueError, match="3 attention heads.*2 ranks"):
        check_split(model, 2)
    check_split(model, 3)


@settings(max_examples=30, deadline=None)
@given(frames=st.integers(2, 6), tokens=st.integers(1, 5), channels=st.integers(1, 4), seed=st.integers(0, 99))
def test_metric_sums_of_frame_aligned_shards_add_up_to_the_whole(frames, tokens, channels, seed):
    """What a rank contributes to the all-reduce: shards split at frame boundaries sum to the one-process
    sums for the relative L1 exactly, and for the motion score up to the frame pairs that straddle shards."""
    gen = torch.Generator().manual_seed(seed)
    now, cached = (torch.randn(2, frames * tokens, channels, generator=gen) for _ in range(2))
    cut = (frames // 2) * tokens
    shards = [slice(0, cut), slice(cut, None)]
    l1 = sum(relative_l1_sums(now[:, s], cached[:, s]) for s in shards)
    exact = (now - cached).abs().sum() / cached.abs().sum()
    assert torch.allclose(l1, relative_l1_sums(now, cached)) and torch.allclose(l1[0] / l1[1], exact)
    full = motion_sums(now, frames, tokens)
    assert torch.allclose(full[0] / full[1], motion_score(now, frames))
    parts = sum(motion_sums(now[:, s], frames, tokens) for s in shards)
    straddling = motion_sums(now[:, cut - tokens:cut + tokens], 2, tokens)  # the one pair across the cut
    assert torch.allclose(parts + straddling, full, atol=1e-4)
