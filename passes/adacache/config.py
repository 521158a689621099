"""AdaCache's options."""

from __future__ import annotations

from dataclasses import dataclass, field

from ditopt.checks import number_keys


@dataclass
class AdaCacheConfig:
    """Adaptive block skipping (AdaCache, with optional motion regularisation).

    codebook maps metric thresholds to the number of steps until the next
    computed step: in ascending order, the first threshold above the metric
    wins; above all of them, the last rate applies.
    """

    enabled: bool = False
    codebook: dict = field(default_factory=lambda: {0.08: 6, 0.16: 5, 0.24: 4, 0.32: 3, 0.40: 2, 1.0: 1})
    probe_blocks: tuple = ()  # blocks whose attention residual is probed, averaged ("synced"); (): the middle one
    moreg: bool = False
    moreg_window: tuple = (0.13, 0.87)  # fraction of the steps
    first_steps: int = 2
    last_steps: int = 2
    num_steps: int | None = None  # steps per generation, if known; otherwise read from the timesteps
    # A skipped span adds its last computed residual (0), or extrapolates it in the timestep from the
    # last 2 (1: linear) or 3 (2: quadratic) computed steps, in the manner of TaylorSeer / FoCa.
    forecast: int = 0
    # Blocks at the start and at the end of each run of blocks that always compute (DBCache's Fn and Bn compute
    # blocks): skipping acts on the blocks between.
    compute_first: int = 0
    compute_last: int = 0
    # 0: one span per run of blocks, one schedule.  n: spans of at most n blocks, each with its own probe (its
    # middle block) and its own schedule: deep and shallow blocks skip at their own pace.
    span_blocks: int = 0
    joint_streams: bool = True  # calls at one timestep after the first (separate CFG passes) follow its decision
    # Thresholds as fractions of the generation's first measured change (the metric then reads 1.0 at the first
    # step that has one), so that a codebook chosen on one model transfers to a model whose changes run larger
    # or smaller, as EasyCache calibrates in a generation's first steps.
    relative: bool = False

    def validate(self) -> None:
        if not self.codebook:
            raise ValueError("ditopt: adacache.codebook must map at least one threshold to a rate")
        for threshold, rate in self.codebook.items():
            if not isinstance(threshold, (int, float)) or threshold < 0:
                raise ValueError(f"ditopt: adacache.codebook thresholds must be numbers >= 0, got {threshold!r}")
            if not isinstance(rate, int) or rate < 1:
                raise ValueError(f"ditopt: adacache.codebook rates must be integers >= 1, got {rate!r} for {threshold}")
        if len(self.moreg_window) != 2 or not 0.0 <= self.moreg_window[0] <= self.moreg_window[1] <= 1.0:
            raise ValueError(f"ditopt: adacache.moreg_window must be two fractions 0 <= lo <= hi <= 1, "
                             f"got {self.moreg_window}")
        if not all(isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in self.probe_blocks):
            raise ValueError(f"ditopt: adacache.probe_blocks must be block indices >= 0, got {self.probe_blocks!r}")
        if self.first_steps < 1 or self.last_steps < 0:
            raise ValueError("ditopt: adacache.first_steps must be >= 1 and last_steps >= 0")
        if self.num_steps is not None and self.num_steps < 1:
            raise ValueError("ditopt: adacache.num_steps must be a positive number of steps or None")
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                   for n in (self.compute_first, self.compute_last)):
            raise ValueError(f"ditopt: adacache.compute_first and compute_last must be block counts >= 0, "
                             f"got {self.compute_first!r} and {self.compute_last!r}")
        if not isinstance(self.span_blocks, int) or isinstance(self.span_blocks, bool) or self.span_blocks < 0:
            raise ValueError(f"ditopt: adacache.span_blocks must be a block count >= 0, got {self.span_blocks!r}")
        if self.span_blocks and self.probe_blocks:
            raise ValueError("ditopt: adacache.span_blocks probes each span's middle block; leave probe_blocks "
                             "empty with it")
        if self.forecast not in (0, 1, 2):
            raise ValueError(f"ditopt: adacache.forecast must be 0 (replay), 1 (linear) or 2 (quadratic), "
                             f"got {self.forecast!r}")


def normalize(settings: dict, base: AdaCacheConfig) -> dict:
    if isinstance(settings.get("codebook"), dict):
        settings["codebook"] = number_keys("adacache.codebook", settings["codebook"])
    return settings
