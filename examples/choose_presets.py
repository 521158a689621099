"""How the presets are chosen: `ditopt.tune` on one split of the fixture's prompts and seeds, a margin
chosen on a second split, the result reported on a third that chose nothing.

    python examples/choose_presets.py [--margins 1 2 3 4 5] [--out out/presets] [--from out/presets]
    python examples/choose_presets.py --fixture small --relative --report-on deep   # do presets transfer?

- split A (prompts 0-3, seeds 0 and 1): `ditopt.tune` for each preset's floor plus the smallest margin
  (quality >= 35 dB, balanced >= 30 dB, fast >= 25 dB, worst seed, against full compute); every
  candidate it measured is kept (<out>/<preset>.json, loadable with options={"config": ...}, and the
  Pareto plot <out>/<preset>.png).  `--from DIR` reads those files instead of tuning again.
- split B (prompts 4-7, seeds 2 and 3): for each margin, each preset's choice (the fastest candidate
  whose split-A worst seed meets floor + margin) is measured; the smallest margin with which every
  preset keeps its floor on split B is the one the presets use.
- split C (prompts 8-11, seeds 4 and 5): the chosen presets are measured once, for the report.

Speed is the FLOP ratio against full compute (exact; wall-clock ratios come from `ditopt bench`,
docs/benchmarks.md).  One JSON line per measurement, then the chosen presets.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import ditopt
from ditopt.harness import fixture
from ditopt.harness.metrics import psnr
from ditopt.runtime import count_flops

FLOORS = {"quality": 35.0, "balanced": 30.0, "fast": 25.0}
SPLITS = {"A": {"prompts": range(0, 4), "seeds": (0, 1)},
          "B": {"prompts": range(4, 8), "seeds": (2, 3)},
          "C": {"prompts": range(8, 12), "seeds": (4, 5)}}
FULL = {"preset": "lossless", "invariants": False}


def load(name: str):
    """(model, clip size) of a fixture: "small" (4 blocks, 8 x 8 tokens) or "deep" (12 blocks, 16 x 16)."""
    if name == "deep":
        from ditopt.harness.fixture.deep import DEEP_SPEC, load_deep

        return load_deep(), DEEP_SPEC
    return fixture.load_fixture(), fixture.VideoSpec()


def sampler(split: str, steps: int, spec=fixture.VideoSpec()):
    prompts = [fixture.PROMPTS[i] for i in SPLITS[split]["prompts"]]
    return lambda fn, seed: fixture.sample(fn, prompts, seed=seed, steps=steps, spec=spec)


class Judge:
    """Worst-seed PSNR and FLOP ratio of options on a split (full-compute references computed once)."""

    def __init__(self, model, steps: int, spec=fixture.VideoSpec()):
        self.model, self.steps, self.spec, self.refs, self.seen = model, steps, spec, {}, {}

    def _run(self, options: dict, split: str, seed: int):
        torch._dynamo.reset()
        ditopt.reset(self.model)
        fn = torch.compile(self.model, backend="ditopt", options={**options, "lowering": "eager"})
        with torch.no_grad(), count_flops() as tally:
            out = sampler(split, self.steps, self.spec)(fn, seed)
        return out, tally.flops

    def __call__(self, options: dict, split: str) -> dict:
        key = (json.dumps(options, sort_keys=True), split)
        if key not in self.seen:
            values, ratios = [], []
            for seed in SPLITS[split]["seeds"]:
                if (split, seed) not in self.refs:
                    with torch.no_grad():
                        full = sampler(split, self.steps, self.spec)(self.model, seed)
                    self.refs[(split, seed)] = (full, self._run(FULL, split, seed)[1])
                full, full_flops = self.refs[(split, seed)]
                out, flops = self._run(options, split, seed)
                values.append(psnr(out, full))
                ratios.append(flops / full_flops)
            self.seen[key] = {"psnr_per_seed": [round(v, 2) for v in values], "worst_psnr_db": round(min(values), 2),
                              "flop_ratio": round(sum(ratios) / len(ratios), 4)}
        return self.seen[key]


def candidates(args, model, name: str, spec) -> list[dict]:
    """[{options, worst, flop_ratio}] that tune measured on split A for a preset (tuning, or read back)."""
    path = Path(args.source or args.out) / f"{name}.json"
    if args.source is None:
        start = time.perf_counter()
        ditopt.tune(model, sampler("A", args.steps, spec), FLOORS[name], cases=SPLITS["A"]["seeds"],
                    margin=min(args.margins), out=path, plot=path.with_suffix(".png"), relative=args.relative)
        print(json.dumps({"preset": name, "tuned_on": "A", "seconds": round(time.perf_counter() - start, 1)}),
              flush=True)
    rows = json.loads(path.read_text())["tune"]["candidates"]
    return [r for r in rows if r["stage"] != "reference"]


def choice(rows: list[dict], floor: float) -> dict | None:
    ok = [r for r in rows if r["worst"] != "inf" and r["worst"] >= floor]
    return max(ok, key=lambda r: (1 / r["flop_ratio"], r["worst"])) if ok else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--margins", type=float, nargs="+", default=[1.0, 2.0, 3.0, 4.0, 5.0],
                        help="dB over each floor, tried in rising order on split B")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default="out/presets")
    parser.add_argument("--from", dest="source", default=None, help="read the tune files of an earlier run")
    parser.add_argument("--fixture", choices=("small", "deep"), default="small", help="the fixture tuned on")
    parser.add_argument("--report-on", choices=("small", "deep"), default=None,
                        help="also report the chosen presets on split C of this other fixture, without re-tuning")
    parser.add_argument("--relative", action="store_true",
                        help="AdaCache codebooks in thresholds relative to a generation's first change")
    args = parser.parse_args()
    model, spec = load(args.fixture)
    judge = Judge(model, args.steps, spec)
    rows = {name: candidates(args, model, name, spec) for name in FLOORS}
    chosen = None
    for margin in sorted(args.margins):
        picks = {name: choice(rows[name], FLOORS[name] + margin) for name in FLOORS}
        kept = True
        for name, pick in picks.items():
            if pick is None:
                kept = False
                print(json.dumps({"margin_db": margin, "preset": name, "split": "B", "choice": None}), flush=True)
                continue
            b = judge(pick["options"], "B")
            kept &= b["worst_psnr_db"] >= FLOORS[name]
            print(json.dumps({"margin_db": margin, "preset": name, "split_A": {"worst_psnr_db": pick["worst"],
                              "flop_ratio": pick["flop_ratio"]}, "split_B": b,
                              "kept": b["worst_psnr_db"] >= FLOORS[name]}), flush=True)
        if kept:
            chosen = (margin, picks)
            break
    if chosen is None:
        print("no margin tried keeps every floor on split B")
        return
    margin, picks = chosen
    for name, pick in picks.items():
        c = judge(pick["options"], "C")
        print(json.dumps({"preset": name, "floor_db": FLOORS[name], "margin_db": margin, "options": pick["options"],
                          "split_A": {"worst_psnr_db": pick["worst"], "flop_ratio": pick["flop_ratio"]},
                          "split_B": judge(pick["options"], "B"), "split_C": c,
                          "kept_on_C": c["worst_psnr_db"] >= FLOORS[name]}), flush=True)
    if args.report_on and args.report_on != args.fixture:
        other_model, other_spec = load(args.report_on)
        other = Judge(other_model, args.steps, other_spec)
        for name, pick in picks.items():
            c = other(pick["options"], "C")
            print(json.dumps({"preset": name, "chosen_on": args.fixture, "reported_on": args.report_on,
                              "floor_db": FLOORS[name], "split_C": c, "kept": c["worst_psnr_db"] >= FLOORS[name]}),
                  flush=True)


if __name__ == "__main__":
    main()
