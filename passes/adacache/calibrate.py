"""Calibrating an AdaCache codebook for a target speed-up from full-compute generations."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from ..skipping import mean_per_step
from .hook import decisions_from_metrics



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
    {"codebook": ..., "predicted_speedup": ..., "metrics": [...]} for the target speed-up.

    Other compiled models (and this model's other compilations) are left as they are: Dynamo is not
    reset; the calibration reads only the graphs it compiled itself."""
    from ditopt.runtime import Runtime, runtimes_of

    if not isinstance(target_speedup, (int, float)) or not 1.0 < target_speedup <= 50.0:
        raise ValueError(f"ditopt calibrate: the target is a speed-up, a number in (1, 50]; got {target_speedup!r}")
    before = set(map(id, runtimes_of(model)))
    compiled = torch.compile(model, backend="ditopt", options={
        "preset": "lossless", "lowering": lowering, "adacache": {"codebook": {math.inf: 1}, "last_steps": 0}})
    with torch.no_grad():
        generate(compiled)
    mine = [r for r in runtimes_of(model) if id(r) not in before]
    gens = [g.to_dict() for r in mine if isinstance(r, Runtime) for g in r.generations()]
    if not gens or "metrics" not in gens[0].get("adacache", {}):
        reasons = [r.reason for r in mine if not isinstance(r, Runtime)]
        raise ValueError("ditopt calibrate: the model has no AdaCache probe"
                         + (f" ({'; '.join(dict.fromkeys(reasons))})" if reasons else "")
                         + "; `ditopt inspect` shows what ditopt finds in it")
    # Average over streams (e.g. cond and uncond calls) step by step.
    per_step = mean_per_step([g["adacache"]["metrics"] for g in gens])
    codebook, predicted = calibrate_from_metrics(per_step, target_speedup)
    for r in mine:
        r.reset()
    return {"codebook": codebook, "predicted_speedup": round(predicted, 3), "metrics": per_step}
