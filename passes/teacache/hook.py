"""TeaCache's decision policy on the shared skip guards.

Before the blocks run, the relative L1 change of the first block's modulated
input since the previous step is rescaled by a polynomial and accumulated;
while the sum stays below the threshold the blocks are skipped (each skipped
span adds its cached residual), and a computed step resets the sum.  The
first and last steps always compute.  The rescaling polynomial TeaCache fits
per model is an option (`teacache_coefficients`); the default is the identity.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..skipping import (SkipHook, guarded_spans, in_last_steps, plan_spans, probe_slots, ratio,
                        relative_l1_sums)
from .config import TeaCacheConfig

NAME = "teacache"


def rescale(value: float, coefficients: Sequence[float]) -> float:
    """Evaluate the polynomial (highest power first) at value."""
    out = 0.0
    for c in coefficients:
        out = out * value + c
    return out


def teacache_decisions(changes: Sequence[float | None], threshold: float, coefficients: Sequence[float],
                       first_steps: int = 1, last_steps: int = 1) -> list[bool]:
    """Compute (True) / skip (False) per step from the per-step relative changes (None at step 0)."""
    out, acc, n = [], 0.0, len(changes)
    for s, change in enumerate(changes):
        if s < first_steps or s >= n - last_steps or change is None:
            out.append(True)
            acc = 0.0
            continue
        acc += rescale(change, coefficients)
        if acc < threshold:
            out.append(False)
        else:
            out.append(True)
            acc = 0.0
    return out


@dataclass
class _TeaState:
    previous: torch.Tensor | None = None
    accumulated: float = 0.0
    skip: bool = False
    decided_step: int = -1
    changes: list = field(default_factory=list)
    decisions: list = field(default_factory=list)


class TeaCachePolicy:
    """`probe`: the value whose change is measured (the first block's modulated input in one graph; the first
    block's residual for blocks compiled one by one, passes/block_chain.py)."""

    def __init__(self, cfg: TeaCacheConfig, probe: str = "modulated_input"):
        self.cfg = cfg
        self.probe = probe

    def new_state(self) -> _TeaState:
        return _TeaState()

    def begin_call(self, call, st: _TeaState) -> None:
        pass

    def should_skip(self, call, st: _TeaState, span, probes: dict) -> bool:
        if st.decided_step == call.step:  # later spans of the same step share the decision
            return st.skip
        st.decided_step = call.step
        current = probes.get(self.probe)
        change = None
        if current is not None and st.previous is not None:
            change = float(ratio(call.all_sum(relative_l1_sums(current, st.previous))))  # this step's host read
        if current is not None:
            st.previous = current.detach()
        st.changes.append(change)
        cfg = self.cfg
        must = (change is None or call.step < cfg.first_steps
                or in_last_steps(cfg.last_steps, cfg.num_steps, call.step, call.stream.timesteps))
        if must:
            st.accumulated, st.skip = 0.0, False
        else:
            st.accumulated += rescale(change, cfg.coefficients)
            st.skip = st.accumulated < cfg.threshold
            if not st.skip:
                st.accumulated = 0.0
        st.decisions.append("S" if st.skip else "C")
        return st.skip

    def end_call(self, call, st: _TeaState, probes: dict) -> None:
        pass

    def stats(self, st: _TeaState) -> dict:
        return {"decisions": "".join(st.decisions),
                "changes": [None if c is None else round(c, 5) for c in st.changes]}


def make_hook(cfg: TeaCacheConfig, lowered) -> SkipHook | str:
    """The runtime part for a lowered graph, or why there is none."""
    spans = plan_spans(lowered, guarded_spans(lowered, NAME))
    if not spans:
        return "no guarded span of blocks is left in the lowered graph"
    return SkipHook(NAME, TeaCachePolicy(cfg), spans, probe_slots(lowered, NAME), cfg.forecast)
