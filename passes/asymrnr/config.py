"""AsymRnR's options."""

from __future__ import annotations

from dataclasses import dataclass, field

from ditopt.checks import check_choice, check_ratio, check_table, number_keys


@dataclass
class AsymRnRConfig:
    """Asymmetric token reduction inside video self-attention (AsymRnR); see docs/asymrnr.md.

    schedule "fixed": q_ratio / kv_ratio everywhere.  "table": per-(block, step) ratios from
    q_table / kv_table, or from a redundancy-tier table `tiers` and the tier -> ratio maps
    q_tiers / kv_tiers (the reference's format: a tier >= key gets that ratio).  "adaptive":
    ditopt measures the redundancy of Q and of K/V at each matching refresh and uses the largest
    of `levels` below the measured redundant fraction, capped by q_ratio / kv_ratio.
    """

    enabled: bool = False
    q_ratio: float = 0.5  # fraction of video query tokens removed (the cap, for "adaptive")
    kv_ratio: float = 0.3  # fraction of video key/value tokens removed
    schedule: str = "fixed"
    q_table: list | None = None  # [block][step] -> ratio; steps past the end use the last entry
    kv_table: list | None = None
    tiers: list | None = None  # [block][step] -> redundancy tier
    q_tiers: dict = field(default_factory=dict)  # tier threshold -> ratio
    kv_tiers: dict = field(default_factory=dict)
    levels: tuple = (0.0, 0.25, 0.5, 0.75)  # ratios the adaptive schedule may choose
    adaptive_threshold: float = 0.1  # relative distance below which a source counts as redundant
    match_every: int | None = None  # steps a match is reused; None: a tenth of the steps (5 for 50, 3 for 30)
    num_steps: int | None = None  # steps per generation, if known (for match_every); otherwise measured
    max_noise: float = 0.8  # fixed and adaptive schedules reduce only at steps whose timestep is at most this
    # fraction of the first one (the high-noise start reduces nothing, as in the reference's tier tables)
    stride: tuple = (2, 2, 2)  # (frames, height, width) of the cells that each hold one destination
    metric: str = "euclidean"
    reduce_mode: str = "replace"  # or "mean"
    kv_match_on: str = "v"  # K and V share one matching, computed on V (or "k")
    seed: int = 0

    def validate(self) -> None:
        check_choice("asymrnr.schedule", self.schedule, ("fixed", "table", "adaptive"))
        check_choice("asymrnr.metric", self.metric, ("euclidean", "cosine", "dot"))
        check_choice("asymrnr.reduce_mode", self.reduce_mode, ("replace", "mean"))
        check_choice("asymrnr.kv_match_on", self.kv_match_on, ("k", "v"))
        for name in ("q_ratio", "kv_ratio"):
            check_ratio(f"asymrnr.{name}", getattr(self, name))
        for level in self.levels:
            check_ratio("asymrnr.levels", level)
        if self.match_every is not None and self.match_every < 1:
            raise ValueError(f"ditopt: asymrnr.match_every must be >= 1 step or None, got {self.match_every}")
        if self.num_steps is not None and self.num_steps < 1:
            raise ValueError(f"ditopt: asymrnr.num_steps must be >= 1 or None, got {self.num_steps}")
        if not 0.0 <= self.max_noise <= 1.0:
            raise ValueError(f"ditopt: asymrnr.max_noise is a fraction of the first timestep, 0..1; got {self.max_noise}")
        if len(self.stride) != 3 or not all(isinstance(s, int) and s >= 1 for s in self.stride):
            raise ValueError(f"ditopt: asymrnr.stride must be three integers >= 1 (frames, height, width), got {self.stride}")
        if self.schedule == "adaptive" and self.metric == "dot":
            raise ValueError("ditopt: the adaptive asymrnr schedule needs metric 'euclidean' or 'cosine'")
        if self.schedule == "table":
            if self.tiers is not None:
                if self.q_table is not None or self.kv_table is not None:
                    raise ValueError("ditopt: give asymrnr either tiers (+ q_tiers/kv_tiers) or q_table/kv_table, not both")
                check_table("asymrnr.tiers", self.tiers, lambda v: isinstance(v, (int, float)))
                for name in ("q_tiers", "kv_tiers"):
                    for ratio in getattr(self, name).values():
                        check_ratio(f"asymrnr.{name}", ratio)
            elif self.q_table is None and self.kv_table is None:
                raise ValueError("ditopt: asymrnr.schedule 'table' needs q_table and/or kv_table, or tiers with q_tiers/kv_tiers")
            for name in ("q_table", "kv_table"):
                if getattr(self, name) is not None:
                    check_table(f"asymrnr.{name}", getattr(self, name), lambda v: isinstance(v, (int, float)) and 0 <= v < 1)


def normalize(settings: dict, base: AsymRnRConfig) -> dict:
    for key in ("q_tiers", "kv_tiers"):  # tier thresholds may be JSON strings too
        if isinstance(settings.get(key), dict):
            settings[key] = number_keys(f"asymrnr.{key}", settings[key])
    return settings
