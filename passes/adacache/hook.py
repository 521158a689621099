"""AdaCache's decision policy (with MoReg) on the shared skip guards.

After each computed step the probe (the gated attention residual of the
probe block) is compared with its value at the previous computed step:

    c = |p_now - p_cached|_1 / |p_cached|_1 / prev_rate

and the codebook maps c to the number of steps until the next computed
step: ascending thresholds, the first one c is below gives the rate; above
all of them the last rate applies.  The first `first_steps` and the last
`last_steps` steps always compute.  With MoReg, c is multiplied by
(m + |mg|), m the remapped motion score of the probe residual and mg its
change per step.  One host read per computed step (c and m together).
Separate calls at one timestep (CFG's cond and uncond) take one decision: the
first stream's, taken again at the next step from every stream's sums, so it
measures what one batched call of both would.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from ditopt.diagnostics import OptionError, warn_once

from ..skipping import SkipHook, guarded_spans, in_last_steps, plan_spans, probe_slots, ratio, relative_l1_sums
from .config import AdaCacheConfig

NAME = "adacache"
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


def motion_score(residual: torch.Tensor, frames: int, frame_tokens: int | None = None) -> torch.Tensor:
    """The reference's single ratio over the frame-shifted residual, frames as contiguous token groups:
    |r[1:] - r[:-1]|_1 / (|r[1:]|_1 + |r[:-1]|_1), every frame pair and batch element summed together."""
    return ratio(motion_sums(residual, frames, frame_tokens))


def motion_sums(residual: torch.Tensor, frames: int, frame_tokens: int | None = None) -> torch.Tensor:
    """[numerator, denominator] of motion_score.  A residual that holds only a rank's shard of the
    video tokens (context parallelism; `frame_tokens` = H x W tokens per frame) pairs each token with the
    one a frame later within the shard: the pairs that straddle two ranks' shards are left out."""
    b = residual.shape[0]
    if frame_tokens and residual.dim() >= 3 and residual.shape[1] < frames * frame_tokens:
        r = residual.float().reshape(b, residual.shape[1], -1)
        later, earlier = r[:, frame_tokens:], r[:, :-frame_tokens]
    else:
        r = residual.float().reshape(b, frames, -1)
        later, earlier = r[:, 1:], r[:, :-1]
    return torch.stack([(later - earlier).abs().sum(), later.abs().sum() + earlier.abs().sum()])


def moreg_factor(motion: float, prev_motion: float | None, prev_rate: int, in_window: bool) -> tuple[float, float]:
    """(factor the metric is multiplied by, the remapped motion to remember)."""
    m = (motion / MOREG_SCALE) ** MOREG_POWER if in_window else 1.0
    mg = 0.0 if prev_motion is None else MOREG_GRADIENT * (m - prev_motion) / prev_rate
    return m + abs(mg), m


def decisions_from_metrics(metric_at: Callable[[int, int], float], num_steps: int, codebook: dict,
                           first_steps: int = 2, last_steps: int = 2, relative: bool = False) -> list[bool]:
    """The compute (True) / skip (False) sequence the policy makes, given the metric a computed step
    `s` measures after a gap of `rate` steps (metric_at(s, rate)); `relative` as the config's.  Pure: used by
    calibration and tests."""
    computed, next_compute, prev_rate, have_cache, reference = [], 0, 1, False, None
    for s in range(num_steps):
        compute = s < first_steps or s >= num_steps - last_steps or s >= next_compute
        computed.append(compute)
        if not compute:
            continue
        rate = 1
        if have_cache:
            metric = metric_at(s, prev_rate) / prev_rate
            if relative:
                reference = reference if reference is not None else max(metric, 1e-12)
                metric /= reference
            rate = next_rate(metric, codebook)
        have_cache, prev_rate, next_compute = True, rate, s + rate
    return computed


@dataclass
class _StreamAdaState:
    skip: bool = False
    next_compute: int = 0
    prev_rate: int = 1
    cached_probe: list[torch.Tensor] | None = None
    prev_motion: float | None = None
    reference: float | None = None  # relative thresholds: the first measured change, and its step
    reference_step: int = -1
    metrics: list = field(default_factory=list)
    decisions: list = field(default_factory=list)


@dataclass
class _Pending:
    """The lead stream's latest decision, open to the sums of the streams that compute after it at its step."""

    step: int
    progress: float
    sums: list
    prev_rate: int
    prev_motion: float | None


class AdaCachePolicy:
    """One shared schedule for all spans of a stream, decided from the probe's change."""

    def __init__(self, cfg: AdaCacheConfig, frames: int | None, names: list[str], frame_tokens: int | None = None):
        self.cfg = cfg
        self.frames = frames
        self.frame_tokens = frame_tokens
        self.names = names  # the probes averaged into the metric
        self._lead: tuple[int, bool] | None = None  # (step, skip) of stream 0's latest call
        self._pending: _Pending | None = None

    def new_state(self) -> _StreamAdaState:
        return _StreamAdaState()

    def _progress(self, call) -> float:
        if self.cfg.num_steps:
            return call.step / self.cfg.num_steps
        ts = call.stream.timesteps
        return 1.0 - ts[-1] / ts[0] if ts and ts[0] > 0 else 0.0

    def begin_call(self, call, st: _StreamAdaState) -> None:
        cfg = self.cfg
        pending = self._pending
        if pending is not None and call.stream.index == 0 and call.step > pending.step:
            self._pending = None
            if len(pending.sums) > 1:  # separate cond / uncond calls: decide again from all of their sums
                st.metrics.pop()
                st.prev_rate, st.prev_motion = pending.prev_rate, pending.prev_motion
                combined = [[sum(v) for v in zip(*pairs)] for pairs in zip(*pending.sums)]
                self._decide(st, combined, pending.step, pending.progress)
        must = call.step < cfg.first_steps or in_last_steps(cfg.last_steps, cfg.num_steps, call.step,
                                                             call.stream.timesteps)
        st.skip = not must and call.step < st.next_compute
        if call.stream.index == 0:
            self._lead = (call.step, st.skip)
        elif cfg.joint_streams and self._lead is not None and self._lead[0] == call.step:
            st.skip = not must and self._lead[1]  # separate cond / uncond calls: one decision per step
        st.decisions.append("S" if st.skip else "C")

    def should_skip(self, call, st: _StreamAdaState, span, probes: dict) -> bool:
        return st.skip

    def end_call(self, call, st: _StreamAdaState, probes: dict) -> None:
        if st.skip:
            return
        now = [_probe_value(probes, name) for name in self.names]
        if any(p is None for p in now):
            st.next_compute = call.step + 1
            return
        sums = None
        if st.cached_probe is not None:
            parts = [relative_l1_sums(p, c) for p, c in zip(now, st.cached_probe)]
            if self.cfg.moreg:
                parts += [motion_sums(p, self.frames, self.frame_tokens) for p in now]
            # Summed over the context-parallel ranks first (a no-op in one process): one collective a step.
            sums = call.all_sum(torch.stack(parts)).tolist()  # the one host read of this step
        st.cached_probe = [p.detach() for p in now]
        pending = self._pending
        if self.cfg.joint_streams and call.stream.index > 0 and pending is not None and pending.step == call.step:
            # A later stream of this step: its change joins the lead's, which decides again when the next
            # step begins (two separate calls then measure what one batched call would).
            if sums is not None:
                pending.sums.append(sums)
            st.metrics.append(None if sums is None else self._metric(sums, pending.prev_rate))
            return
        progress = self._progress(call)
        before = (st.prev_rate, st.prev_motion)
        self._decide(st, sums, call.step, progress)
        if call.stream.index == 0 and sums is not None:
            self._pending = _Pending(call.step, progress, [sums], *before)

    def _metric(self, sums: list, prev_rate: int) -> float:
        return _mean_ratio(sums[:len(self.names)]) / prev_rate

    def _decide(self, st: _StreamAdaState, sums: list | None, step: int, progress: float) -> None:
        """The rate after computed step `step`, from its [num, den] sums per probe (then per motion probe)."""
        rate, metric = 1, None
        if sums is not None:
            metric = self._metric(sums, st.prev_rate)
            if self.cfg.relative:  # re-deciding the reference's own step (joint streams) takes the new value
                if st.reference is None or st.reference_step == step:
                    st.reference, st.reference_step = max(metric, 1e-12), step
                metric /= st.reference
            if self.cfg.moreg:
                motion = _mean_ratio(sums[len(self.names):])
                lo, hi = self.cfg.moreg_window
                factor, st.prev_motion = moreg_factor(motion, st.prev_motion, st.prev_rate, lo <= progress <= hi)
                metric *= factor
            rate = next_rate(metric, self.cfg.codebook)
        st.metrics.append(metric)
        st.prev_rate, st.next_compute = rate, step + rate

    def stats(self, st: _StreamAdaState) -> dict:
        kept = sum(p.numel() * p.element_size() for p in st.cached_probe or ())
        return {"decisions": "".join(st.decisions),
                "metrics": [None if m is None else round(m, 5) for m in st.metrics],
                "probe_mb": round(kept / 2**20, 3)}


class PerSpanPolicy:
    """span_blocks: one AdaCache schedule per span, each decided from that span's own probe."""

    def __init__(self, cfg: AdaCacheConfig, frames: int | None, spans: list[int], frame_tokens: int | None = None):
        self.policies = {i: AdaCachePolicy(cfg, frames, [f"span{i}"], frame_tokens) for i in spans}

    def new_state(self) -> dict:
        return {i: p.new_state() for i, p in self.policies.items()}

    def begin_call(self, call, st: dict) -> None:
        for i, p in self.policies.items():
            p.begin_call(call, st[i])

    def should_skip(self, call, st: dict, span, probes: dict) -> bool:
        return self.policies[span.id].should_skip(call, st[span.id], span, probes)

    def end_call(self, call, st: dict, probes: dict) -> None:
        for i, p in self.policies.items():
            p.end_call(call, st[i], probes)

    def stats(self, st: dict) -> dict:
        """Per step: C when every span computed, S when every span skipped, P when some did; then each span's."""
        per = {i: p.stats(st[i]) for i, p in self.policies.items()}
        steps = zip(*(s["decisions"] for s in per.values()))
        return {"decisions": "".join(d[0] if len(set(d)) == 1 else "P" for d in steps),
                "span_decisions": {str(i): s["decisions"] for i, s in per.items()},
                "span_metrics": {str(i): s["metrics"] for i, s in per.items()},
                "probe_mb": round(sum(s["probe_mb"] for s in per.values()), 3)}


def _mean_ratio(pairs: list) -> float:
    """The mean of num / den over [num, den] pairs read from the device (relative_l1_sums, motion_sums)."""
    return sum(num / max(den, 1e-12) for num, den in pairs) / len(pairs)


def _probe_value(probes: dict, name: str) -> torch.Tensor | None:
    """A probe's value this step: the branch itself, or a block's output residual out - in."""
    if name in probes:
        return probes[name]
    out, inp = probes.get(f"{name}:out"), probes.get(f"{name}:in")
    return None if out is None or inp is None else out - inp


def make_hook(cfg: AdaCacheConfig, lowered) -> SkipHook | str:
    """The runtime part for a lowered graph, or why there is none."""
    spans = plan_spans(lowered, guarded_spans(lowered, NAME))
    probes = probe_slots(lowered, NAME)
    if not spans:
        return "no guarded span of blocks is left in the lowered graph"
    if not probes:
        return "no probe to measure the change of the blocks' output"
    grid = lowered.structure.layout.grid
    frames = grid[0] if grid else None
    if cfg.moreg and (frames is None or frames < 2):
        raise OptionError("ditopt: adacache.moreg needs video with more than one latent frame and a known "
                         f"F x H x W grid; this model's grid is {grid}. Set adacache.moreg=False.")
    names = sorted({name.split(":")[0] for at in probes.values() for name, _ in at})
    frame_tokens = grid[1] * grid[2] if grid else None
    if cfg.span_blocks:
        policy = PerSpanPolicy(cfg, frames, [s.id for s in spans], frame_tokens)
    else:
        policy = AdaCachePolicy(cfg, frames, names, frame_tokens)
    return SkipHook(NAME, policy, spans, probes, cfg.forecast)


def chain_policy(cfg: AdaCacheConfig, probe: str) -> AdaCachePolicy:
    """The policy for blocks compiled one by one (passes/block_chain.py), reading `probe`: without the motion
    term, since a block's own graph does not show the latent's frames."""
    if cfg.moreg:
        warn_once("ditopt: adacache.moreg needs the latent's frames, which a block compiled on its own does not "
                  "show: its blocks skip without the motion term")
    return AdaCachePolicy(dataclasses.replace(cfg, moreg=False), None, [probe])
