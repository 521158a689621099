"""How the presets are chosen: `ditopt.tune` on one split of the fixture's prompts and seeds, for each
preset's PSNR floor plus a margin, then each choice measured on another split it never saw.

    python examples/choose_presets.py [--margin 1.0] [--out out/presets]

Choosing split: prompts 0-3, seeds 0 and 1.  Held-out split: prompts 4-7, seeds 2 and 3.  Floors (worst
seed, against full compute): quality >= 35 dB, balanced >= 30 dB, fast >= 25 dB.  Speed is the FLOP ratio
against full compute (exact; wall-clock ratios come from `ditopt bench`, docs/benchmarks.md).  Writes
<out>/<preset>.json (loadable with options={"config": ...}) and <out>/<preset>.png (the Pareto plot).
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
CHOOSE = {"prompts": range(0, 4), "seeds": (0, 1)}
HELD_OUT = {"prompts": range(4, 8), "seeds": (2, 3)}


def sampler(split: dict, steps: int):
    prompts = [fixture.PROMPTS[i] for i in split["prompts"]]
    return lambda fn, seed: fixture.sample(fn, prompts, seed=seed, steps=steps)


def held_out(model, options: dict, steps: int) -> dict:
    """Worst-seed PSNR and FLOP ratio of `options` on the held-out split."""
    sample = sampler(HELD_OUT, steps)
    values, ratios = [], []
    for seed in HELD_OUT["seeds"]:
        full = sample(model, seed)
        for opts, store in (({"preset": "lossless", "invariants": False}, None), (options, values)):
            torch._dynamo.reset()
            ditopt.reset(model)
            fn = torch.compile(model, backend="ditopt", options={**opts, "lowering": "eager"})
            with torch.no_grad(), count_flops() as tally:
                out = sample(fn, seed)
            if store is None:
                full_flops = tally.flops
            else:
                values.append(psnr(out, full))
                ratios.append(tally.flops / full_flops)
    return {"psnr_per_seed": [round(v, 2) for v in values], "worst_psnr_db": round(min(values), 2),
            "flop_ratio": round(sum(ratios) / len(ratios), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--margin", type=float, default=1.0, help="dB added to each floor when choosing")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--presets", nargs="+", default=list(FLOORS), choices=list(FLOORS))
    parser.add_argument("--out", default="out/presets")
    args = parser.parse_args()
    model = fixture.load_fixture()
    out = Path(args.out)
    for name in args.presets:
        start = time.perf_counter()
        result = ditopt.tune(model, sampler(CHOOSE, args.steps), FLOORS[name], cases=CHOOSE["seeds"],
                             margin=args.margin, out=out / f"{name}.json", plot=out / f"{name}.png")
        chosen = result.chosen.to_dict()
        report = {"preset": name, "floor_db": FLOORS[name], "margin_db": args.margin, "met": result.met,
                  "options": result.options, "choosing": {"worst_psnr_db": chosen["worst"],
                                                          "psnr_per_seed": chosen["per_case"],
                                                          "flop_ratio": chosen["flop_ratio"]},
                  "held_out": held_out(model, result.options, args.steps), "candidates": len(result.candidates),
                  "tune_seconds": round(time.perf_counter() - start, 1)}
        report["kept_on_held_out"] = report["held_out"]["worst_psnr_db"] >= FLOORS[name]
        print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
