"""AdaCache's decision policy (with MoReg) on ditopt's skip guards, and codebook calibration.

After each computed step the probe (the gated attention residual of the
probe block) is compared with its value at the previous computed step:

    c = |p_now - p_cached|_1 / |p_cached|_1 / prev_rate

and the codebook maps c to the number of steps until the next computed
step: ascending thresholds, the first one c is below gives the rate; above
all of them the last rate applies.  The first `first_steps` and the last
`last_steps` steps always compute.  With MoReg, c is multiplied by
(m + |mg|), m the remapped motion score of the probe residual and mg its
change per step.  One host read per computed step (c and m together).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .config import AdaCacheConfig
from .runtime import StreamState

PROBE = "adacache"
MOREG_SCALE = 0.385
MOREG_POWER = 8
MOREG_GRADIENT = 10.0

# The reference's published Open-Sora 1.2 codebooks (methods.md section 3).
CODEBOOKS = {
    "opensora-100-fast": {0.03: 12, 0.05: 10, 0.07: 8, 0.09: 6, 0.11: 4, math.inf: 3},
    "opensora-30-fast": {0.08: 6, 0.16: 5, 0.24: 4, 0.32: 3, 0.40: 2, math.inf: 1},
    "opensora-30-slow": {0.08: 3, 0.16: 2, math.inf: 1},
}


def next_rate(metric: float, codebook: dict) -> int:
    """Steps until the next computed step for a metric value."""
    thresholds = sorted(codebook)
    i = bisect.bisect_right(thresholds, metric)  # first threshold strictly above the metric
    return codebook[thresholds[min(i, len(thresholds) - 1)]]


def relative_l1(current: torch.Tensor, cached: torch.Tensor) -> torch.Tensor:
    cur, old = current.float(), cached.float()
    return (cur - old).abs().sum() / old.abs().sum().clamp_min(1e-12)


def motion_score(residual: torch.Tensor, frames: int) -> torch.Tensor:
    """Mean over frame pairs of |r[f+1] - r[f]|_1 / (|r[f+1]|_1 + |r[f]|_1), frames as contiguous token groups."""
    r = residual.float().reshape(residual.shape[0], frames, -1)
    diff = (r[:, 1:] - r[:, :-1]).abs().sum(-1)
    norm = (r[:, 1:].abs().sum(-1) + r[:, :-1].abs().sum(-1)).clamp_min(1e-12)
    return (diff / norm).mean()


def moreg_factor(motion: float, prev_motion: float | None, prev_rate: int, in_window: bool) -> tuple[float, float]:
    """(factor the metric is multiplied by, the remapped motion to remember)."""
    m = (motion / MOREG_SCALE) ** MOREG_POWER if in_window else 1.0
    mg = 0.0 if prev_motion is None else MOREG_GRADIENT * (m - prev_motion) / prev_rate
    return m + abs(mg), m


def decisions_from_metrics(metric_at: Callable[[int, int], float], num_steps: int, codebook: dict,
                           first_steps: int = 2, last_steps: int = 2) -> list[bool]:
    """The compute (True) / skip (False) sequence the policy makes, given the metric a computed step
    `s` measures after a gap of `rate` steps (metric_at(s, rate)).  Pure: used by calibration and tests."""
    computed, next_compute, prev_rate, have_cache = [], 0, 1, False
    for s in range(num_steps):
        compute = s < first_steps or s >= num_steps - last_steps or s >= next_compute
        computed.append(compute)
        if not compute:
            continue
        rate = next_rate(metric_at(s, prev_rate) / prev_rate, codebook) if have_cache else 1
        have_cache, prev_rate, next_compute = True, rate, s + rate
    return computed


def in_last_steps(cfg: AdaCacheConfig, stream: StreamState) -> bool:
    """Whether this call is one of the last `cfg.last_steps` of its generation: from `cfg.num_steps`
    when given, else from the timesteps (with the last decrement d, ceil(t / d) steps remain)."""
    if cfg.num_steps is not None:
        return stream.step >= cfg.num_steps - cfg.last_steps
    ts = stream.timesteps
    if len(ts) < 2 or ts[-2] <= ts[-1]:
        return False
    remaining = math.ceil(ts[-1] / (ts[-2] - ts[-1]) - 1e-3)  # steps left, this one included
    return remaining <= cfg.last_steps


@dataclass
class _StreamAdaState:
    skip: bool = False
    next_compute: int = 0
    prev_rate: int = 1
    cached_probe: torch.Tensor | None = None
    prev_motion: float | None = None
    metrics: list = field(default_factory=list)
    decisions: list = field(default_factory=list)


class AdaCachePolicy:
    """One shared schedule for all spans of a stream, decided from the probe's change."""

    name = "adacache"

    def __init__(self, cfg: AdaCacheConfig, frames: int | None):
        self.cfg = cfg
        self.frames = frames

    def _state(self, stream: StreamState) -> _StreamAdaState:
        return stream.state.setdefault(self.name, _StreamAdaState())

    def _progress(self, stream: StreamState) -> float:
        if self.cfg.num_steps:
            return stream.step / self.cfg.num_steps
        ts = stream.timesteps
        return 1.0 - ts[-1] / ts[0] if ts and ts[0] > 0 else 0.0

    def begin_call(self, runtime, stream: StreamState) -> None:
        st = self._state(stream)
        must = stream.step < self.cfg.first_steps or in_last_steps(self.cfg, stream)
        st.skip = not must and stream.step < st.next_compute
        st.decisions.append("S" if st.skip else "C")

    def should_skip(self, runtime, span, stream: StreamState, probes: dict) -> bool:
        return self._state(stream).skip

    def end_call(self, runtime, stream: StreamState, probes: dict) -> None:
        st = self._state(stream)
        stats = stream.stats.method
        stats["adacache_decisions"] = "".join(st.decisions)
        if st.skip:
            return
        probe = probes.get(PROBE)
        if probe is None:
            st.next_compute = stream.step + 1
            return
        rate, metric = 1, None
        if st.cached_probe is not None:
            values = [relative_l1(probe, st.cached_probe) / st.prev_rate]
            if self.cfg.moreg:
                values.append(motion_score(probe, self.frames))
            read = torch.stack(values).tolist()  # the one host read of this step
            metric = read[0]
            if self.cfg.moreg:
                lo, hi = self.cfg.moreg_window
                factor, st.prev_motion = moreg_factor(read[1], st.prev_motion, st.prev_rate,
                                                      lo <= self._progress(stream) <= hi)
                metric *= factor
            rate = next_rate(metric, self.cfg.codebook)
        st.metrics.append(metric)
        st.cached_probe = probe.detach()
        st.prev_rate, st.next_compute = rate, stream.step + rate
        stats["adacache_metrics"] = [None if m is None else round(m, 5) for m in st.metrics]
        stats["adacache_probe_mb"] = round(probe.numel() * probe.element_size() / 2**20, 3)


def make_policy(cfg: AdaCacheConfig, structure):
    """The policy for a compiled graph, or None when the graph has no probe or nothing to skip."""
    if cfg.policy == "teacache":
        from .teacache import TEACACHE_PROBE, TeaCachePolicy

        ok = TEACACHE_PROBE in structure.probes and structure.skip_spans
        return TeaCachePolicy(cfg) if ok else None
    if PROBE not in structure.probes or not structure.skip_spans:
        return None
    grid = structure.layout.grid
    frames = grid[0] if grid else None
    if cfg.moreg and (frames is None or frames < 2):
        raise ValueError("ditopt: adacache.moreg needs video with more than one latent frame and a known "
                         f"F x H x W grid; this model's grid is {grid}. Set adacache.moreg=False.")
    return AdaCachePolicy(cfg, frames)


# ---------------------------------------------------------------------------
# calibration


def codebook_for_scale(scale: float) -> dict:
    """The codebook family calibration searches: the reference's 30-step shape, thresholds scaled."""
    return {round(scale * k, 6): rate for k, rate in zip((1, 2, 3, 4, 5), (6, 5, 4, 3, 2))} | {math.inf: 1}


def calibrate_from_metrics(per_step: Sequence[float], target_speedup: float, first_steps: int = 2,
                           last_steps: int = 2) -> tuple[dict, float]:
    """A codebook whose schedule computes about 1/target_speedup of the steps, given the metric measured
    at every step of full-compute generations (per_step[s], s >= 1). Returns (codebook, predicted speed-up).

    A computed step after a gap of r steps is predicted to measure the mean of the r per-step values
    (relative changes add up over a gap and the metric divides by the gap)."""
    n = len(per_step)
    values = [v if v is not None else 0.0 for v in per_step]

    def metric_at(s: int, rate: int) -> float:
        window = values[max(1, s - rate + 1): s + 1] or [values[s]]
        return sum(window) / len(window) * rate  # decisions_from_metrics divides by the rate again

    def speedup(scale: float) -> float:
        plan = decisions_from_metrics(metric_at, n, codebook_for_scale(scale), first_steps, last_steps)
        return n / sum(plan)

    lo, hi = 1e-6, 10.0 * max(max(values), 1e-6)
    for _ in range(60):  # speed-up grows with the scale: bisect on it
        mid = math.sqrt(lo * hi)
        if speedup(mid) < target_speedup:
            lo = mid
        else:
            hi = mid
    return codebook_for_scale(hi), speedup(hi)


def calibrate(model: torch.nn.Module, generate: Callable[[Callable], object], target_speedup: float,
              lowering: str = "eager") -> dict:
    """Run one full-compute generation, record the AdaCache metric at every step, and return
    {"codebook": ..., "predicted_speedup": ..., "metrics": [...]} for the target speed-up."""
    import ditopt

    torch._dynamo.reset()
    compiled = torch.compile(model, backend="ditopt", options={
        "lowering": lowering, "adacache": {"codebook": {math.inf: 1}, "last_steps": 0}})
    with torch.no_grad():
        generate(compiled)
    gens = ditopt.stats(model)["generations"]
    if not gens or "adacache_metrics" not in gens[0]:
        raise ValueError("ditopt calibrate: the model has no AdaCache probe (see `ditopt inspect`)")
    # Average over streams (e.g. cond and uncond calls) step by step.
    series = [g["adacache_metrics"] for g in gens]
    per_step = [sum((s[i] or 0.0) for s in series) / len(series) for i in range(min(map(len, series)))]
    codebook, predicted = calibrate_from_metrics(per_step, target_speedup)
    torch._dynamo.reset()
    ditopt.reset(model)
    return {"codebook": codebook, "predicted_speedup": round(predicted, 3), "metrics": per_step}
