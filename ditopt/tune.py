"""`ditopt.tune`: the fastest configuration of your own model and sampler that meets a fidelity budget.

    result = ditopt.tune(model, lambda fn, seed: my_sampler(fn, seed=seed), budget=30.0)
    model = torch.compile(model, backend="ditopt", options=result.options)   # or {"config": "tuned.json"}

`sample_fn(fn, case)` runs the user's sampler with `fn` in place of the model for one calibration case
(a seed, a prompt: whatever the user passes in `cases`) and returns the output to compare. The tuner runs
each case once at full compute (the reference), calibrates the skip guards from one run that decides
nothing (AdaCache's metric and TeaCache's change per step), then measures candidates in stages:

1. skip guards: AdaCache codebooks and TeaCache thresholds calibrated for rising speed-ups, each with
   forecast orders 0, 1 and 2; a ladder stops once two rungs in a row miss the budget; then, with the
   forecast order that went fastest, the same ladders with the first block, or the first and last blocks,
   always computed (`compute_first` / `compute_last`, as DBCache's Fn / Bn), and, on models of 6 blocks or
   more, AdaCache with three spans that decide apart (`span_blocks`);
2. tokens: ToCa (interval, ratio) alone and on up to three skip configurations of the Pareto front that
   meet the budget (forecasting at order 0 or 1), each ladder with the score, the reference's attention
   score or the rows' age alone, that kept more of the metric on its gentlest rung; AsymRnR schedules on
   the best so far;

and keeps the fastest whose worst case meets the budget.  Speed is the FLOP ratio against full compute
(counted exactly: candidates run with the eager lowering, which makes the same decisions as Inductor) or,
with `speed="wall"`, the measured time per generation.  Dynamo's caches are reset between candidates.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .checks import check_choice

METRICS = ("psnr", "ssim")
SPEEDS = ("flops", "wall")
METHODS = ("adacache", "teacache", "toca", "asymrnr")
SKIP_SPEEDUPS = (1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0)
FORECASTS = (1, 2, 0)
DEPTHS = ((1, 0), (1, 1))  # (compute_first, compute_last) tried after the whole-run spans
SPAN_MIN_BLOCKS = 6  # from this depth on, AdaCache is also tried with three spans deciding apart (span_blocks)
# ToCa (interval, ratio), gentlest first: about 1/interval + (1 - 1/interval) * ratio of the rows computed.
TOCA_LADDER = ((2, 0.5), (3, 0.5), (2, 0.3), (3, 0.3), (4, 0.3), (3, 0.1), (4, 0.1), (6, 0.1))
# ToCa's row scores tried on each ladder's gentlest rung: the reference's attention score, and none (the rows
# computed longest ago go first), which kept 1.2 to 2.8 dB more at interval 2 on the deep fixture (docs/benchmarks.md)
TOCA_SCORES = ("auto", "none")
# ToCa's bases forecast skipped blocks at this order at most: its partial steps perturb the residuals a
# forecast extrapolates, and order 2 amplifies that (on the deep fixture 22.3 dB against 27.8 at order 1)
TOCA_BASE_MAX_FORECAST = 1
ASYMRNR_LADDER = ((0.25, 0.1), (0.5, 0.3), (0.75, 0.5))
MISSES_TO_STOP = 2
REFINE_STEPS = 2  # bisection steps between a skip ladder's last rung that meets the budget and the next
FULL = {"preset": "lossless", "invariants": False}
# dB over the budget when choosing: the smallest margin with which the fixture's presets, tuned on one split
# of prompts and seeds, kept their floors on a second (docs/benchmarks.md); without it a choice made at the
# edge of the calibration runs fell 2 dB under its budget on prompts it had not seen
DEFAULT_MARGIN = 2.0


@dataclass
class Candidate:
    """One measured configuration: its options (JSON), the metric per case and its worst, its cost."""

    options: dict
    stage: str
    per_case: list[float]
    flop_ratio: float
    seconds: float | None = None  # mean seconds per generation (eager lowering), when timed

    @property
    def worst(self) -> float:
        return min(self.per_case)

    def speedup(self, full_seconds: float | None = None) -> float:
        if full_seconds is not None and self.seconds:
            return full_seconds / self.seconds
        return 1.0 / self.flop_ratio if self.flop_ratio > 0 else math.inf

    def to_dict(self, full_seconds: float | None = None) -> dict:
        return {"options": self.options, "stage": self.stage, "worst": _number(self.worst),
                "per_case": [_number(v) for v in self.per_case], "flop_ratio": round(self.flop_ratio, 4),
                "seconds": None if self.seconds is None else round(self.seconds, 3),
                "speedup": round(self.speedup(full_seconds), 3)}


@dataclass
class TuneResult:
    """What `tune` chose (`options`), whether it meets the budget, and every candidate it measured."""

    options: dict
    chosen: Candidate
    met: bool
    budget: float
    metric: str
    speed: str
    cases: list
    candidates: list[Candidate]
    full_seconds: float | None = None
    notes: list[str] = field(default_factory=list)  # methods left out, and why

    def to_dict(self) -> dict:
        return {"options": self.options,
                "tune": {"metric": self.metric, "budget": self.budget, "met": self.met, "speed": self.speed,
                         "cases": [repr(c) for c in self.cases], "chosen": self.chosen.to_dict(self.full_seconds),
                         "full_seconds": self.full_seconds, "notes": self.notes,
                         "candidates": [c.to_dict(self.full_seconds) for c in self.candidates]}}

    def save(self, path: str | Path) -> Path:
        """Write the choice as JSON: `options={"config": path}` loads it (the "tune" section is a record)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    def plot(self, path: str | Path, title: str | None = None) -> Path:
        """A Pareto plot: speed-up against the metric for every candidate, the chosen one marked."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig, ax = plt.subplots(figsize=(7, 4.5))
        finite = [c for c in self.candidates if math.isfinite(c.worst)]
        for stage in dict.fromkeys(c.stage for c in finite):
            pts = [c for c in finite if c.stage == stage]
            ax.scatter([c.worst for c in pts], [c.speedup(self.full_seconds) for c in pts], label=stage, s=22)
        front = _pareto(finite, self.full_seconds)
        ax.plot([c.worst for c in front], [c.speedup(self.full_seconds) for c in front], color="grey", lw=0.8,
                label="Pareto front")
        if math.isfinite(self.chosen.worst):
            ax.scatter([self.chosen.worst], [self.chosen.speedup(self.full_seconds)], marker="*", s=260,
                       color="crimson", zorder=5, label="chosen")
        ax.axvline(self.budget, color="crimson", ls="--", lw=0.8, label=f"budget {self.budget:g}")
        unit = " (dB)" if self.metric == "psnr" else ""
        ax.set_xlabel(f"worst-case {self.metric.upper()}{unit} against full compute")
        ax.set_ylabel("speed-up (" + ("wall time" if self.speed == "wall" else "FLOPs") + ")")
        ax.set_title(title or f"ditopt tune: {len(self.candidates)} candidates")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def tune(model: torch.nn.Module, sample_fn: Callable[[Callable, Any], torch.Tensor], budget: float = 30.0, *,
         metric: str = "psnr", cases: Sequence = (0, 1), speed: str = "flops", margin: float | None = None,
         methods: Sequence[str] = METHODS, out: str | Path | None = None, plot: str | Path | None = None,
         progress: bool = True, depth: bool = True, relative: bool = False) -> TuneResult:
    """Search ditopt's joint space for the fastest configuration whose worst case meets `budget`.

    `budget` is a floor on `metric` ("psnr" in dB, or "ssim") against full compute, over every case;
    `margin` is added to it when choosing: headroom for inputs the tuner did not see (None: 2 dB for PSNR,
    which kept the fixture's floors on prompts and seeds it had not seen, and 0 for SSIM; 0 chooses at the
    edge of the calibration runs).  `methods` limits the search; `depth=False` leaves out the spans that keep
    the first and last blocks computed; `relative=True` searches AdaCache codebooks in thresholds relative to
    a generation's first measured change (the `relative` option: a choice that transfers to other models).
    When no candidate meets the budget, the closest one is returned with a warning.  `out` writes the choice
    as JSON, `plot` a Pareto plot (PNG)."""
    check_choice("tune metric", metric, METRICS)
    check_choice("tune speed", speed, SPEEDS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"ditopt tune: methods {list(unknown) or list(methods)} are not valid; choose among "
                         f"{list(METHODS)}")
    if not isinstance(budget, (int, float)) or not math.isfinite(budget):
        raise ValueError(f"ditopt tune: budget must be a finite number (dB for psnr, 0..1 for ssim), got {budget!r}")
    if metric == "ssim" and not 0.0 < budget <= 1.0:
        raise ValueError(f"ditopt tune: an SSIM budget is in (0, 1], got {budget!r}")
    if margin is None:
        margin = DEFAULT_MARGIN if metric == "psnr" else 0.0
    cases = list(cases)
    if not cases:
        raise ValueError("ditopt tune: cases must hold at least one calibration case (a seed, a prompt, ...)")
    model = getattr(model, "_orig_mod", model)  # the module itself, also when given its torch.compile wrapper
    search = _Search(model, sample_fn, metric, cases, speed, budget + margin, progress, depth, relative)
    try:
        search.run(methods)
    finally:
        search.close()
    result = search.result()
    if out is not None:
        result.save(out)
    if plot is not None:
        result.plot(plot)
    return result


def _number(value: float) -> float | str:
    """A metric for JSON: rounded; "inf" for an output equal to full compute's (strict JSON has no Infinity)."""
    return round(value, 4) if math.isfinite(value) else str(value)


def _with(base: dict | None, **sections) -> dict:
    options = dict(base) if base is not None else {"preset": "lossless"}
    options.update(sections)
    return options


def _forecast(options: dict) -> int:
    """The forecast order of a skip configuration's guard (0 where it has none)."""
    return max((options[m].get("forecast", 0) for m in ("adacache", "teacache") if m in options), default=0)


def _pareto(cands: list[Candidate], full_seconds: float | None) -> list[Candidate]:
    """The candidates no other beats on both speed and the metric, by rising metric."""
    front = []
    for c in sorted(cands, key=lambda c: (-c.speedup(full_seconds), -c.worst)):
        if not front or c.worst > front[-1].worst:
            front.append(c)
    return sorted(front, key=lambda c: c.worst)


def _spread(front: list[Candidate], k: int) -> list[dict]:
    """Up to k options spread along a front, its fastest end included."""
    if len(front) <= k:
        return [c.options for c in front]
    picks = {round(i * (len(front) - 1) / (k - 1)) for i in range(k)}
    return [front[i].options for i in sorted(picks)]


class _Search:
    def __init__(self, model, sample_fn, metric, cases, speed, floor, progress, depths=True, relative=False):
        from tqdm.auto import tqdm

        from .harness import metrics

        self.model, self.sample_fn, self.metric, self.cases = model, sample_fn, metric, cases
        self.speed, self.floor = speed, floor
        self.score = {"psnr": metrics.psnr, "ssim": metrics.ssim}[metric]
        self.candidates: list[Candidate] = []
        self.depths = depths  # also the ladders that keep the first (and last) blocks computed
        self.relative = relative  # AdaCache codebooks relative to a generation's first measured change
        self.blocks = 0  # the model's blocks, read at calibration
        self.notes: list[str] = []
        self.refs: list[torch.Tensor] = []
        self.full_flops = 0.0
        self.full_seconds: float | None = None
        self.bar = tqdm(desc="ditopt tune", unit="config", disable=not progress)

    def close(self) -> None:
        self.bar.close()

    def meets(self, c: Candidate) -> bool:
        return c.stage != "reference" and c.worst >= self.floor

    def best(self) -> Candidate | None:
        ok = [c for c in self.candidates if self.meets(c)]
        return max(ok, key=lambda c: (c.speedup(self.full_seconds), c.worst)) if ok else None

    def run(self, methods: Sequence[str]) -> None:
        """The stages of the search (module docstring), for the methods asked for."""
        self.reference()
        skip = []
        for method in ("adacache", "teacache"):
            if method in methods:
                skip += self.skip_ladders(method)
        if "toca" in methods:
            self.toca_stage(skip)
        if "asymrnr" in methods:
            best = self.best()
            self.ladder("asymrnr", [_with(best and best.options, asymrnr={"q_ratio": q, "kv_ratio": kv})
                                    for q, kv in ASYMRNR_LADDER])

    def result(self) -> TuneResult:
        """The fastest candidate that meets the floor; else the closest one, or lossless, with a warning."""
        best, tried = self.best(), [c for c in self.candidates if c.stage != "reference"]
        if best is None and tried:
            best = max(tried, key=lambda c: (c.worst, c.speedup(self.full_seconds)))
            warnings.warn(f"ditopt tune: no candidate meets {self.metric} >= {self.floor:g} on every case; "
                          f"returning the closest ({self.metric} {best.worst:.4g} on its worst case, speed-up "
                          f"{best.speedup(self.full_seconds):.2f}x); {{'preset': 'lossless'}} is exact", stacklevel=3)
        elif best is None:
            best = Candidate({"preset": "lossless"}, "reference", self.candidates[0].per_case, 1.0, self.full_seconds)
            warnings.warn("ditopt tune: no method could accelerate these runs ("
                          + ("; ".join(self.notes) or "too few steps to skip, or no site a method takes")
                          + "); returning {'preset': 'lossless'}", stacklevel=3)
        return TuneResult(options=best.options, chosen=best, met=self.meets(best), budget=self.floor,
                          metric=self.metric, speed=self.speed, cases=self.cases, candidates=self.candidates,
                          full_seconds=self.full_seconds, notes=self.notes)

    # -- runs --------------------------------------------------------------------------------------------

    def _sample(self, fn, case) -> torch.Tensor:
        with torch.no_grad():
            out = self.sample_fn(fn, case)
        if not isinstance(out, torch.Tensor):
            raise ValueError(f"ditopt tune: sample_fn must return the sampler's output as a tensor (the latent or "
                             f"the decoded video), got {type(out).__name__}")
        return out.detach()

    def _compiled(self, options: dict):
        import ditopt

        torch._dynamo.reset()
        ditopt.reset(self.model)
        return torch.compile(self.model, backend="ditopt", options={**options, "lowering": "eager"})

    def reference(self) -> None:
        """Full compute for every case (the references), and the FLOPs the runtime counts for it."""
        from .runtime import count_flops

        calls = [0]
        handle = self.model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        try:
            start = time.perf_counter()
            self.refs = [self._sample(self.model, case) for case in self.cases]
            self.full_seconds = (time.perf_counter() - start) / len(self.cases) if self.speed == "wall" else None
        finally:
            handle.remove()
        if calls[0] == 0:
            raise ValueError("ditopt tune: sample_fn(fn, case) never called the model it was given; it must run "
                             "the sampler with `fn` in place of the model (the tuner passes full-compute and "
                             "compiled versions of it)")
        fn = self._compiled(FULL)
        with count_flops() as tally:
            outs = [self._sample(fn, case) for case in self.cases]
        if tally.flops == 0:
            import ditopt

            raise ValueError("ditopt tune: ditopt does not accelerate this model, so there is nothing to tune: "
                             + ditopt.explain(self.model))
        self.full_flops = tally.flops
        self.candidates.append(Candidate(dict(FULL), "reference", [self.score(o, r) for o, r in zip(outs, self.refs)],
                                         1.0, self.full_seconds))
        self.bar.update(1)

    def measure(self, options: dict, stage: str) -> Candidate:
        """Run every case with these options (once: a candidate measured before is returned as it was)."""
        import ditopt
        from .runtime import count_flops

        known = next((c for c in self.candidates if c.options == options), None)
        if known is not None:
            return known
        fn = self._compiled(options)
        if self.speed == "wall":
            self._sample(fn, self.cases[0])  # compiles, so the timed runs below do not
            ditopt.reset(self.model)
        values, start = [], time.perf_counter()
        with count_flops() as tally:
            for case, ref in zip(self.cases, self.refs):
                ditopt.reset(self.model)
                values.append(self.score(self._sample(fn, case), ref))
        seconds = (time.perf_counter() - start) / len(self.cases) if self.speed == "wall" else None
        cand = Candidate(options, stage, values, tally.flops / self.full_flops, seconds)
        self.candidates.append(cand)
        best = self.best()
        self.bar.update(1)
        self.bar.set_postfix_str(f"{stage} {self.metric} {cand.worst:.2f} x{cand.speedup(self.full_seconds):.2f}; best "
                                 + (f"x{best.speedup(self.full_seconds):.2f}" if best else "none yet"))
        return cand

    def ladder(self, stage: str, rungs: list[dict]) -> list[Candidate]:
        """Measure rungs, gentlest first, until MISSES_TO_STOP in a row miss the budget."""
        out, misses = [], 0
        for options in rungs:
            cand = self.measure(options, stage)
            out.append(cand)
            misses = 0 if self.meets(cand) else misses + 1
            if misses >= MISSES_TO_STOP:
                break
        return out

    def toca_stage(self, skip: list[Candidate]) -> None:
        """ToCa alone, then on up to three skip configurations of the front that forecast at order <= 1."""
        bases = [c for c in skip if self.meets(c) and _forecast(c.options) <= TOCA_BASE_MAX_FORECAST]
        for base in [None, *_spread(_pareto(bases, self.full_seconds), 3)]:
            self.toca_ladder(base)

    def toca_ladder(self, base: dict | None) -> list[Candidate]:
        """ToCa's ladder on `base`, with the score that kept more of the metric on the gentlest rung."""
        (interval, ratio), rest = TOCA_LADDER[0], TOCA_LADDER[1:]
        first = [self.measure(_with(base, toca={"interval": interval, "ratio": ratio, "score": score}), "toca")
                 for score in TOCA_SCORES]
        if not any(self.meets(c) for c in first):
            return first
        score = max(zip(first, TOCA_SCORES), key=lambda pair: pair[0].worst)[1]
        return first + self.ladder("toca", [_with(base, toca={"interval": i, "ratio": r, "score": score})
                                            for i, r in rest])

    # -- skip guards -------------------------------------------------------------------------------------

    def skip_ladders(self, method: str) -> list[Candidate]:
        per_step = self._calibrate(method)
        if per_step is None:
            return []
        out, base = [], {}
        if method == "adacache" and self.relative:
            first = next((v for v in per_step if v), None)
            if first is None:
                return []
            per_step, base = [None if v is None else v / first for v in per_step], {"relative": True}
        for forecast in FORECASTS:
            out += self._skip_ladder(method, per_step, {**base, "forecast": forecast})
        meeting = [c for c in out if self.meets(c)]
        if meeting and self.depths:
            fastest = max(meeting, key=lambda c: c.speedup(self.full_seconds)).options[method]["forecast"]
            depths = [{"compute_first": first, "compute_last": last} for first, last in DEPTHS
                      if first + last < self.blocks]  # leaving a block to skip
            if method == "adacache" and self.blocks >= SPAN_MIN_BLOCKS:  # three spans, each on its own schedule
                depths.append({"span_blocks": math.ceil(self.blocks / 3)})
            for depth in depths:
                out += self._skip_ladder(method, per_step, {**base, "forecast": fastest, **depth})
        return out

    def _skip_ladder(self, method: str, per_step: list[float], extra: dict) -> list[Candidate]:
        """One ladder of calibrated settings, with `extra` settings, then a bisection at its edge."""
        out = []

        def rung(target: float) -> dict | None:
            settings = _skip_settings(method, per_step, target)
            return None if settings is None else {"preset": "lossless", method: {**settings, **extra}}

        reachable = {t: r for t in SKIP_SPEEDUPS if (r := rung(t)) is not None}
        tried = self.ladder(method, list(reachable.values()))
        out += tried
        passed = [t for t, c in zip(reachable, tried) if self.meets(c)]
        above = [t for t, c in zip(reachable, tried) if not self.meets(c) and (not passed or t > passed[-1])]
        if passed and above:  # bisect between the fastest rung that meets the budget and the next that misses
            lo, hi = passed[-1], above[0]
            for _ in range(REFINE_STEPS):
                mid = round((lo + hi) / 2, 3)
                options = rung(mid)
                if options is None:  # the schedule cannot reach it: the edge stays where it is
                    break
                cand = self.measure(options, method)
                out.append(cand)
                lo, hi = (mid, hi) if self.meets(cand) else (lo, mid)
        return out

    def _calibrate(self, method: str) -> list[float] | None:
        """The method's per-step signal over a run that always computes, averaged over cases and streams."""
        import ditopt
        from ditopt.passes.skipping import mean_per_step

        never_skip = {"adacache": {"codebook": {math.inf: 1}, "last_steps": 0}, "teacache": {"threshold": 1e-12}}
        key = {"adacache": "metrics", "teacache": "changes"}[method]
        fn = self._compiled({"preset": "lossless", method: never_skip[method]})
        for case in self.cases:
            ditopt.reset(self.model)
            self._sample(fn, case)
        stats = ditopt.stats(self.model)
        self.blocks = max((g.get("blocks", 0) for g in stats["graphs"]), default=0)
        series = [g[method][key] for g in stats["generations"] if key in g.get(method, {})]
        if not series:
            why = "; ".join(dict.fromkeys(stats["fallbacks"])) or "no skip guard in its graphs"
            self.notes.append(f"{method} left out: {why}")
            return None
        return mean_per_step(series)


def _skip_settings(method: str, per_step: list[float], target: float) -> dict | None:
    """The method's settings calibrated for a target speed-up; None when its schedules cannot reach it."""
    if method == "adacache":
        from ditopt.passes.adacache import calibrate_from_metrics

        book, predicted = calibrate_from_metrics(per_step, target)
        settings = {"codebook": {("inf" if k == math.inf else k): v for k, v in book.items()}}
    else:
        threshold, predicted = teacache_threshold(per_step, target)
        settings = {"threshold": threshold}
    return settings if predicted >= 0.9 * target else None


def teacache_threshold(changes: Sequence[float | None], target_speedup: float, first_steps: int = 2,
                       last_steps: int = 2) -> tuple[float, float]:
    """A TeaCache threshold whose schedule computes about 1/target_speedup of the steps, given the relative
    change measured at every step of an always-computing run. Returns (threshold, predicted speed-up)."""
    from ditopt.passes.teacache.hook import teacache_decisions

    values = [None if c is None else float(c) for c in changes]
    n = len(values)

    def speedup(threshold: float) -> float:
        return n / sum(teacache_decisions(values, threshold, (1.0, 0.0), first_steps, last_steps))

    lo, hi = 0.0, max(1e-6, sum(v for v in values if v is not None))
    for _ in range(50):  # speed-up grows with the threshold
        mid = (lo + hi) / 2
        if speedup(mid) < target_speedup:
            lo = mid
        else:
            hi = mid
    return hi, speedup(hi)  # unrounded: a rounded threshold can land on the other side of an edge


def load_config(path: str | Path) -> dict:
    """The options a config file holds: a JSON object of ditopt options, or one `tune` wrote ({"options": ...})."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"ditopt: config file {str(path)!r} does not exist") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"ditopt: config file {str(path)!r} is not JSON ({err})") from None
    if isinstance(data, dict) and "options" in data:
        data = data["options"]
    if not isinstance(data, dict):
        raise ValueError(f"ditopt: config file {str(path)!r} must hold a JSON object of ditopt options")
    if "config" in data:
        raise ValueError(f"ditopt: config file {str(path)!r} names another config file; inline its options")
    return data


__all__ = ["Candidate", "TuneResult", "tune", "load_config", "teacache_threshold", "METRICS", "METHODS"]
