"""ToCa's options and the reference implementation's settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from ditopt.checks import check_choice

KINDS = ("self", "cross", "mlp")


@dataclass
class ToCaConfig:
    """Token-wise caching of self-attention, cross-attention and MLP outputs (ToCa); see docs/toca.md.

    A site is computed fully at the first `first_fresh` steps and every `interval`-th step (per module
    kind with `intervals`, e.g. {"cross": 6}); at the other steps self-attention reads its cache and
    cross-attention and MLP recompute the top-scored fraction `ratio * step factor * layer factor *
    module_factors[kind]` of their rows.  A factor with weight w at position x in [0, 1] is
    1 + w - 2 w x; the step position is the progress through sampling (1 - t / first t: 0 at the
    start, 1 at t = 0), the layer
    position is block / (blocks - 1).  `reference` fills every setting from the published ones.
    """

    enabled: bool = False
    reference: str | None = None  # "dit", "pixart" or "opensora": the reference's settings for that model
    interval: int = 3
    intervals: dict = field(default_factory=dict)  # module kind ("self", "cross", "mlp") -> its own interval
    first_fresh: int = 1
    ratio: float = 0.1  # r0: the base fraction of rows recomputed at partial steps
    step_weight: float = 0.0
    layer_weight: float = 0.0
    module_factors: dict = field(default_factory=lambda: {"self": 0.0, "cross": 1.0, "mlp": 1.0})
    score: str = "auto"  # "auto": s2 (cross-attention entropy) where a block has cross-attention, else s1; "self": s1;
    # "none": no attention score (s3 and s4 only), which costs nothing at fresh steps
    age_weight: float = 0.25  # s3: + age_weight * (steps since computed) / interval
    uniform_cell: tuple = (1, 2, 2)  # s4: cells of (frames, height, width) tokens ...
    uniform_bonus: float = 0.0  # ... whose best token's score is multiplied by (1 + bonus); 0 turns s4 off
    cfg_shared: bool = False  # the two batch halves (CFG's uncond/cond) select the same rows
    levels: int = 16  # the recomputed fraction is rounded up to a multiple of 1/levels ...
    row_multiple: int = 8  # ... and the row count up to a multiple of this: few, static shapes

    def validate(self) -> None:
        if self.reference is not None:
            check_choice("toca.reference", self.reference, tuple(TOCA_REFERENCES))
        check_choice("toca.score", self.score, ("auto", "self", "none"))
        for name, value in [("interval", self.interval), *((f"intervals[{k!r}]", v) for k, v in self.intervals.items())]:
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ditopt: toca.{name} must be a whole number of steps >= 1, got {value!r}")
        for table in ("intervals", "module_factors"):
            unknown = sorted(set(getattr(self, table)) - set(KINDS))
            if unknown:
                raise ValueError(f"ditopt: toca.{table} has unknown module kind(s) {unknown}; use {list(KINDS)}")
        if self.module_factors.get("self", 0.0) != 0.0:
            raise ValueError("ditopt: toca.module_factors['self'] must be 0: self-attention is reused whole at partial "
                             "steps (recomputing part of it spreads errors, as the ToCa paper found)")
        if any(not isinstance(v, (int, float)) or v < 0 for v in self.module_factors.values()):
            raise ValueError(f"ditopt: toca.module_factors must be numbers >= 0, got {self.module_factors}")
        if not isinstance(self.ratio, (int, float)) or not 0.0 <= self.ratio <= 1.0:
            raise ValueError(f"ditopt: toca.ratio is the fraction of rows recomputed at partial steps, 0 <= ratio <= 1; "
                             f"got {self.ratio!r}")
        for name in ("step_weight", "layer_weight"):
            if not -1.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"ditopt: toca.{name} must lie in [-1, 1] (factor 1 + w - 2 w x stays >= 0)")
        if self.first_fresh < 1:
            raise ValueError("ditopt: toca.first_fresh must be >= 1 (the first step fills the cache)")
        if self.age_weight < 0 or self.uniform_bonus < 0:
            raise ValueError("ditopt: toca.age_weight and toca.uniform_bonus must be >= 0")
        if len(self.uniform_cell) != 3 or not all(isinstance(c, int) and c >= 1 for c in self.uniform_cell):
            raise ValueError(f"ditopt: toca.uniform_cell must be three integers >= 1 (frames, height, width), "
                             f"got {self.uniform_cell}")
        if self.levels < 1 or self.row_multiple < 1:
            raise ValueError("ditopt: toca.levels and toca.row_multiple must be >= 1")


# The reference implementation's settings (Shenyi-Z/ToCa), as docs/toca.md describes them, with the step
# weight written for ditopt's step position (progress, 0 at the start).  "dit": its DDIM 50-step sampler,
# whose step index counts down, so its weight 0.4 on that index is -0.4 on progress (fewer fresh rows
# early); "pixart": its DPM-Solver loop counts up, weight 0.9 (more fresh rows early).
TOCA_REFERENCES = {
    "dit": dict(interval=3, first_fresh=1, ratio=0.07, step_weight=-0.4, layer_weight=0.8,
                module_factors={"self": 0.0, "cross": 1.0, "mlp": 2.5}, score="self",
                uniform_cell=(1, 2, 2), uniform_bonus=0.6, cfg_shared=False),
    "pixart": dict(interval=3, first_fresh=1, ratio=0.30, step_weight=0.9, layer_weight=0.6,
                   module_factors={"self": 0.0, "cross": 0.6, "mlp": 1.6}, score="auto",
                   uniform_cell=(1, 4, 4), uniform_bonus=0.4, cfg_shared=True),
    "opensora": dict(interval=3, intervals={"self": 3, "cross": 6, "mlp": 3}, first_fresh=3, ratio=0.10,
                     step_weight=0.0, layer_weight=0.0, module_factors={"self": 0.0, "cross": 0.0, "mlp": 1.495},
                     score="auto", uniform_bonus=0.0, cfg_shared=True),
}


def normalize(settings: dict, base: ToCaConfig) -> dict:
    """A named reference fills every setting first, then the user's own; kinds not named keep their factor."""
    if settings.get("reference") is not None:
        check_choice("toca.reference", settings["reference"], tuple(TOCA_REFERENCES))
        settings = {**TOCA_REFERENCES[settings["reference"]], **settings}
    if isinstance(settings.get("module_factors"), dict):
        settings["module_factors"] = {**base.module_factors, **settings["module_factors"]}
    return settings
