"""AsymRnR at run time: matching cache, ratio schedules and statistics.

The rewrite (rewrite.py) puts one `ditopt::token_match` node before each
rewritten attention, for Q and for K/V.  The lowering gives each of those
nodes a region of its own, which the `MatchPlanner` here runs:

- recomputes the match (a fresh random split for each block and for Q and
  K/V apart, drawn from one generator per stream seeded by `seed`, and the
  nearest-destination kernel) every `match_every` steps of a stream (by
  default a tenth of the generation's steps, as the reference: 5 for 50,
  3 for 30), and reuses it in between;
  a new generation, stream, batch size, shape, dtype or device never reuses
  a stale match;
- asks the schedule for this (block, step, role)'s ratio and selects the
  kept tokens for it (memoised per match and ratio);
- counts what it did: matchings, reuses, mean ratios, the fraction of
  video-video attention pairs left, the matching FLOPs.

Fixed and table ratios are known on the host, so a step costs no device
sync; the adaptive schedule reads one number per site at refresh steps.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

import torch

from ditopt.kernels.matching import matching_flops
from ditopt.method import Hook, tensor_bytes
from ditopt.diagnostics import OptionError

from . import plans as tm
from .config import AsymRnRConfig
from .rewrite import NAME


@dataclass(frozen=True)
class MatchSite:
    """What one token_match node asks for, read from its arguments and meta."""

    block: int
    site: str
    role: str  # "q" or "kv"
    grid: tuple[int, int, int]
    stride: tuple[int, int, int]
    metric: str
    outputs: tuple[int, ...]  # which of (keep, source) the region hands on, in order


@dataclass
class Match:
    shape_key: tuple
    step: int  # stream step it was computed at
    dst: torch.Tensor
    src: torch.Tensor
    nearest: torch.Tensor
    distance: torch.Tensor
    measured_ratio: float | None = None  # adaptive schedule: the level this match supports
    plans: dict = field(default_factory=dict)  # ratio -> (keep, source)


class RatioSchedule:
    """Ratio for a (block, step, role); `measured` is the adaptive measurement of the current match."""

    def __init__(self, cfg: AsymRnRConfig, num_blocks: int):
        self.cfg = cfg
        self.tables = {"q": cfg.q_table, "kv": cfg.kv_table}
        if cfg.schedule == "table" and cfg.tiers is not None:
            self.tables = {"q": tiers_to_ratios(cfg.tiers, cfg.q_tiers), "kv": tiers_to_ratios(cfg.tiers, cfg.kv_tiers)}
        for role, table in self.tables.items():
            if cfg.schedule == "table" and table is not None and len(table) != num_blocks:
                raise OptionError(f"ditopt: asymrnr {role} table has {len(table)} rows but the model has "
                                 f"{num_blocks} transformer blocks; give one row per block")

    @property
    def adaptive(self) -> bool:
        return self.cfg.schedule == "adaptive"

    def cap(self, role: str) -> float:
        return self.cfg.q_ratio if role == "q" else self.cfg.kv_ratio

    def ratio(self, block: int, step: int, role: str, measured: float | None) -> float:
        if self.cfg.schedule == "fixed":
            return self.cap(role)
        if self.adaptive:
            return measured or 0.0
        table = self.tables[role]
        if table is None:
            return 0.0
        row = table[block]
        return float(row[min(step, len(row) - 1)])

    def level_for(self, redundant_fraction: float, role: str) -> float:
        """The largest allowed level not above the measured redundant fraction (and the cap)."""
        levels = sorted(set(self.cfg.levels) | {0.0})
        limit = min(redundant_fraction, self.cap(role))
        return levels[bisect.bisect_right(levels, limit + 1e-9) - 1]


def tiers_to_ratios(tiers: list, tier_ratios: dict) -> list:
    """The reference's tier maps: a tier >= threshold gets that threshold's ratio (the highest wins)."""
    thresholds = sorted(tier_ratios)
    out = []
    for row in tiers:
        out.append([next((tier_ratios[t] for t in reversed(thresholds) if tier >= t), 0.0) for tier in row])
    return out


@dataclass
class StreamMatches:
    """One stream's matches and counters for the current generation."""

    generator: torch.Generator  # every split of this stream's generation is drawn from it, in call order
    matches: dict = field(default_factory=dict)  # region index -> Match
    q_len: dict = field(default_factory=dict)  # site -> kept query tokens at this step
    stats: dict = field(default_factory=lambda: _empty_stats())


class MatchPlanner(Hook):
    """Runs the match regions: cached matches, scheduled ratios, statistics."""

    name = NAME

    def __init__(self, cfg: AsymRnRConfig, sites: dict[int, MatchSite], num_blocks: int):
        self.cfg = cfg
        self.sites = sites  # region index -> site
        self.schedule = RatioSchedule(cfg, num_blocks)
        self.last_generation_steps: int | None = None  # length of the last generation this graph ran
        self._steps = 0
        self.keep_matches = True  # False under a memory budget: every step matches afresh and keeps nothing

    def cuts(self) -> set[int]:
        return set()

    def claims(self) -> set[int]:
        return set(self.sites)

    def new_state(self) -> StreamMatches:
        return StreamMatches(torch.Generator().manual_seed(self.cfg.seed))

    def begin_call(self, call) -> None:
        if call.step == 0 and self._steps > 1:
            self.last_generation_steps = self._steps
        self._steps = 1 if call.step == 0 else max(self._steps, call.step + 1)

    def match_every(self, call) -> int:
        """`match_every`, or a tenth of the steps: from `num_steps`, else the last generation's length,
        else the steps the last timestep decrement leaves (exact for uniform schedules)."""
        if self.cfg.match_every is not None:
            return self.cfg.match_every
        steps = self.cfg.num_steps or self.last_generation_steps
        ts = call.stream.timesteps
        if steps is None and len(ts) >= 2 and ts[-2] > ts[-1]:
            steps = call.step + math.ceil(ts[-1] / (ts[-2] - ts[-1]) - 1e-3)
        return max(1, round(steps / 10)) if steps else 5

    def stats(self, state: StreamMatches) -> dict:
        return dict(state.stats)

    def cache_bytes(self, state: StreamMatches) -> int:
        return tensor_bytes(state.matches)

    def shed(self, states: list[StreamMatches]) -> str | None:
        if not self.keep_matches:
            return None
        self.keep_matches = False
        for st in states:
            st.matches.clear()
        return "asymrnr: the matches are computed afresh at every step instead of kept for match_every steps"

    def run_region(self, call, region, inputs: list) -> list | None:
        if region.index not in self.sites:
            return None
        ts = call.stream.timesteps  # a table schedule gives every step's ratio itself
        reduce = self.cfg.schedule == "table" or not ts or ts[0] <= 0 or ts[-1] <= self.cfg.max_noise * ts[0] + 1e-6
        return self.plan(region.index, inputs[0], call.step, call.state(self), self.match_every(call), reduce)

    def plan(self, region_index: int, x: torch.Tensor, step: int, state: StreamMatches,
             every: int = 5, reduce: bool = True) -> list[torch.Tensor]:
        """The plan (keep, source) for one match region; `reduce=False` keeps every token this step."""
        site = self.sites[region_index]
        stats = state.stats
        key = (tuple(x.shape), x.dtype, x.device)
        match = state.matches.get(region_index)
        if match is None or match.shape_key != key or step - match.step >= every:
            match = self._match(site, x, step, key, state.generator)
            if self.keep_matches:
                state.matches[region_index] = match
            B, H, _, D = x.shape
            stats["matchings"] += 1
            stats["matching_gflops"] += matching_flops(B, H, match.src.numel(), match.dst.numel(), D) / 1e9
        else:
            stats["reused"] += 1
        ratio = self.schedule.ratio(site.block, step, site.role, match.measured_ratio) if reduce else 0.0
        plan = match.plans.get(ratio)
        if plan is None:
            plan = match.plans[ratio] = tm.select_tokens(match.nearest, match.distance, match.dst, match.src,
                                                         x.shape[2], ratio)
        self._count(stats, state, site, ratio, plan[0].shape[-1], x.shape[2])
        return [plan[i] for i in site.outputs]

    def _match(self, site: MatchSite, x: torch.Tensor, step: int, key: tuple, generator: torch.Generator) -> Match:
        dst, src = tm.split_grid(site.grid, site.stride, generator, x.device)
        nearest, distance = torch.ops.ditopt.nearest_destination(x, src, dst, site.metric)
        match = Match(key, step, dst, src, nearest, distance)
        if self.schedule.adaptive:
            rel = tm.relative_distance(x, src, distance, site.metric)
            redundant = float((rel < self.cfg.adaptive_threshold).float().mean()) * src.numel() / x.shape[2]
            match.measured_ratio = self.schedule.level_for(redundant, site.role)
        return match

    @staticmethod
    def _count(stats: dict, state: StreamMatches, site: MatchSite, ratio: float, kept: int, tokens: int) -> None:
        stats[f"{site.role}_ratio_sum"] += ratio
        stats[f"{site.role}_plans"] += 1
        if site.role == "q":
            state.q_len[site.site] = kept
        else:  # Q is matched before K/V in every rewritten site
            q_kept = state.q_len.get(site.site, tokens)
            stats["video_pairs"] += q_kept * kept
            stats["video_pairs_full"] += tokens * tokens
        stats["video_attention_fraction"] = round(stats["video_pairs"] / max(1, stats["video_pairs_full"]), 4)


def _empty_stats() -> dict:
    return {"matchings": 0, "reused": 0, "matching_gflops": 0.0, "q_ratio_sum": 0.0, "q_plans": 0,
            "kv_ratio_sum": 0.0, "kv_plans": 0, "video_pairs": 0, "video_pairs_full": 0,
            "video_attention_fraction": 1.0}


def make_hook(cfg: AsymRnRConfig, lowered) -> MatchPlanner | str:
    """The planner for a lowered graph's match regions, or why there is none."""
    sites = {}
    for r in lowered.regions:
        if r.owner is None or r.owner.method != NAME:
            continue
        node = next(n for n in r.gm.graph.nodes if n.target is torch.ops.ditopt.token_match.default)
        x, _, grid, stride, metric, _ = node.args
        request = r.owner.payload
        outputs = tuple(o.args[1] for o in r.gm.graph.output_node().args[0])  # getitem indices
        sites[r.index] = MatchSite(request.block, request.site, request.role, tuple(grid), tuple(stride), metric,
                                   outputs)
    if not sites:
        return "no match region is left in the lowered graph"
    return MatchPlanner(cfg, sites, len(lowered.structure.blocks))
