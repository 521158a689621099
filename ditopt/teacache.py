"""TeaCache's criterion as a second policy on ditopt's skip guards.

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

from .adacache import in_last_steps, relative_l1
from .config import AdaCacheConfig
from .runtime import StreamState

TEACACHE_PROBE = "teacache"


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
    name = "teacache"

    def __init__(self, cfg: AdaCacheConfig):
        self.cfg = cfg

    def _state(self, stream: StreamState) -> _TeaState:
        return stream.state.setdefault(self.name, _TeaState())

    def begin_call(self, runtime, stream: StreamState) -> None:
        pass

    def should_skip(self, runtime, span, stream: StreamState, probes: dict) -> bool:
        st = self._state(stream)
        if st.decided_step == stream.step:  # later spans of the same step share the decision
            return st.skip
        st.decided_step = stream.step
        current = probes.get(TEACACHE_PROBE)
        change = None
        if current is not None and st.previous is not None:
            change = float(relative_l1(current, st.previous))  # the one host read of this step
        if current is not None:
            st.previous = current.detach()
        st.changes.append(change)
        must = change is None or stream.step < self.cfg.first_steps or in_last_steps(self.cfg, stream)
        if must:
            st.accumulated, st.skip = 0.0, False
        else:
            st.accumulated += rescale(change, self.cfg.teacache_coefficients)
            st.skip = st.accumulated < self.cfg.teacache_threshold
            if not st.skip:
                st.accumulated = 0.0
        st.decisions.append("S" if st.skip else "C")
        return st.skip

    def end_call(self, runtime, stream: StreamState, probes: dict) -> None:
        st = self._state(stream)
        stream.stats.method["teacache_decisions"] = "".join(st.decisions)
        stream.stats.method["teacache_changes"] = [None if c is None else round(c, 5) for c in st.changes]
