"""TeaCache's options."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TeaCacheConfig:
    """Skip every block while the accumulated, rescaled change of the first block's modulated input
    stays below `threshold` (TeaCache).  `coefficients`: the rescaling polynomial, highest power first
    (identity by default; TeaCache fits one per model)."""

    enabled: bool = False
    threshold: float = 0.1
    coefficients: tuple = (1.0, 0.0)
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

    def validate(self) -> None:
        if self.threshold <= 0:
            raise ValueError("ditopt: teacache.threshold must be > 0")
        if not self.coefficients or not all(isinstance(c, (int, float)) for c in self.coefficients):
            raise ValueError("ditopt: teacache.coefficients must be a non-empty sequence of numbers")
        if self.first_steps < 1 or self.last_steps < 0:
            raise ValueError("ditopt: teacache.first_steps must be >= 1 and last_steps >= 0")
        if self.num_steps is not None and self.num_steps < 1:
            raise ValueError("ditopt: teacache.num_steps must be a positive number of steps or None")
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                   for n in (self.compute_first, self.compute_last)):
            raise ValueError(f"ditopt: teacache.compute_first and compute_last must be block counts >= 0, "
                             f"got {self.compute_first!r} and {self.compute_last!r}")
        if self.forecast not in (0, 1, 2):
            raise ValueError(f"ditopt: teacache.forecast must be 0 (replay), 1 (linear) or 2 (quadratic), "
                             f"got {self.forecast!r}")
