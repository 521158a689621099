"""How the presets were chosen: calibrate AdaCache codebooks on the fixture for a range of target
speed-ups, measure each on the fixture, keep the fastest that meets each preset's PSNR floor.

    python examples/choose_presets.py [--seeds 0 1] [--batch 8]

Floors (against full compute, same seeds): quality >= 35 dB, balanced >= 30 dB, fast >= 25 dB.
Speed here is the fraction of block calls computed (the compute the runtime does); wall-clock
ratios come from `ditopt bench` (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import math

import torch

import ditopt
from ditopt import adacache, fixture
from ditopt.metrics import psnr

FLOORS = {"quality": 35.0, "balanced": 30.0, "fast": 25.0}
TARGETS = (1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 3.0, 3.5)
# The reference's gentler "slow" shape, one threshold: the calibrated family skips too much for 35 dB.
GENTLE = ({0.09: 2, math.inf: 1}, {0.10: 2, math.inf: 1}, {0.12: 2, math.inf: 1})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()

    model = fixture.load_fixture()
    prompts = list(fixture.PROMPTS[:: max(1, len(fixture.PROMPTS) // args.batch)][: args.batch])

    def generate(fn, seed):
        return fixture.sample(fn, prompts, seed=seed, steps=args.steps)

    with torch.no_grad():
        full = {s: generate(model, s) for s in args.seeds}
        calib = adacache.calibrate(model, lambda fn: generate(fn, args.seeds[0]), target_speedup=2.0)
    rows = []
    candidates = [(t, *adacache.calibrate_from_metrics(calib["metrics"], t)) for t in TARGETS]
    candidates += [(None, book, None) for book in GENTLE]
    for target, codebook, predicted in candidates:
        values, fractions = [], []
        for seed in args.seeds:
            torch._dynamo.reset()
            ditopt.reset(model)
            fn = torch.compile(model, backend="ditopt", options={"lowering": "eager", "adacache": {"codebook": codebook}})
            with torch.no_grad():
                out = generate(fn, seed)
            gen = ditopt.stats(model)["generations"][-1]
            fractions.append(gen["blocks_computed"] / (gen["blocks_computed"] + gen["blocks_skipped"]))
            values.append(psnr(out, full[seed]))
        rows.append({"target": target, "codebook": codebook,
                     "predicted_speedup": None if predicted is None else round(predicted, 3),
                     "computed_fraction": round(sum(fractions) / len(fractions), 4),
                     "psnr_db": round(min(values), 2), "decisions": gen["adacache_decisions"]})
        print(json.dumps({k: (v if k != "codebook" else {str(t): r for t, r in v.items()}) for k, v in rows[-1].items()}))
    print()
    for preset, floor in FLOORS.items():
        ok = [r for r in rows if r["psnr_db"] >= floor]
        best = min(ok, key=lambda r: r["computed_fraction"]) if ok else None
        if best is None:
            print(f"{preset}: no candidate reaches {floor} dB")
            continue
        book = {("inf" if t == math.inf else t): r for t, r in best["codebook"].items()}
        print(f"{preset} (>= {floor} dB): codebook {book}, computes {best['computed_fraction']:.1%} of block calls, "
              f"worst-seed PSNR {best['psnr_db']} dB")


if __name__ == "__main__":
    main()
