"""How the presets were chosen: calibrate AdaCache codebooks on the fixture for a range of target
speed-ups, measure each on the fixture, keep the fastest that meets each preset's PSNR floor.

    python examples/choose_presets.py [--seeds 0 1] [--batch 8] [--toca]

Floors (against full compute, same seeds): quality >= 35 dB, balanced >= 30 dB, fast >= 25 dB.
Speed here is the FLOP ratio against full compute (exact, counted by the runtime; for AdaCache
alone it follows the fraction of block calls computed); wall-clock ratios come from `ditopt bench`
(docs/benchmarks.md).  `--toca` adds ToCa candidates, alone and on top of each shipped preset.
"""

from __future__ import annotations

import argparse
import json
import math

import torch
from torch.utils.flop_counter import FlopCounterMode

import ditopt
from ditopt.harness import fixture
from ditopt.passes import adacache
from ditopt.harness.metrics import psnr
from ditopt.runtime import count_flops

FLOORS = {"quality": 35.0, "balanced": 30.0, "fast": 25.0}
TARGETS = (1.25, 1.5, 1.6, 1.75, 2.0, 2.25, 2.5, 2.75, 3.0, 3.25, 3.5)
# The reference's gentler "slow" shape, one threshold: the calibrated family skips too much for 35 dB.
GENTLE = ({0.09: 2, math.inf: 1}, {0.10: 2, math.inf: 1}, {0.12: 2, math.inf: 1})
TOCA = ({"interval": 2, "ratio": 0.5}, {"interval": 2, "ratio": 0.3}, {"interval": 3, "ratio": 0.5},
        {"interval": 3, "ratio": 0.3})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--toca", action="store_true", help="also try ToCa, alone and on top of each preset")
    args = parser.parse_args()

    model = fixture.load_fixture()
    prompts = list(fixture.PROMPTS[:: max(1, len(fixture.PROMPTS) // args.batch)][: args.batch])

    def generate(fn, seed):
        return fixture.sample(fn, prompts, seed=seed, steps=args.steps)

    with torch.no_grad():
        full = {s: generate(model, s) for s in args.seeds}
        full_flops = {}
        for seed in args.seeds:
            with FlopCounterMode(display=False) as counter:
                generate(model, seed)
            full_flops[seed] = counter.get_total_flops()
        calib = adacache.calibrate(model, lambda fn: generate(fn, args.seeds[0]), target_speedup=2.0)
    rows = []
    candidates = [(t, {"adacache": {"codebook": book}}, predicted)
                  for t in TARGETS for book, predicted in [adacache.calibrate_from_metrics(calib["metrics"], t)]]
    candidates += [(None, {"adacache": {"codebook": book}}, None) for book in GENTLE]
    if args.toca:
        books = [{"preset": name} for name in ("lossless", *FLOORS)]  # ToCa alone, and on each shipped preset
        candidates += [(None, {**options, "toca": toca}, None) for toca in TOCA for options in books]
    for target, options, predicted in candidates:
        values, flops = [], []
        for seed in args.seeds:
            torch._dynamo.reset()
            ditopt.reset(model)
            fn = torch.compile(model, backend="ditopt", options={"lowering": "eager", **options})
            with torch.no_grad():
                generate(fn, seed)  # compiles: the count below sees the runtime only
                ditopt.reset(model)
                with count_flops() as tally:
                    out = generate(fn, seed)
            flops.append(tally.flops / full_flops[seed])
            values.append(psnr(out, full[seed]))
        gen = ditopt.stats(model)["generations"][-1]
        rows.append({"target": target, "options": _printable(options),
                     "predicted_speedup": None if predicted is None else round(predicted, 3),
                     "flop_ratio": round(sum(flops) / len(flops), 4),
                     "psnr_db": round(min(values), 2), "decisions": gen.get("adacache", {}).get("decisions")})
        print(json.dumps(rows[-1]), flush=True)
    print()
    for preset, floor in FLOORS.items():
        ok = [r for r in rows if r["psnr_db"] >= floor]
        best = min(ok, key=lambda r: r["flop_ratio"]) if ok else None
        if best is None:
            print(f"{preset}: no candidate reaches {floor} dB")
            continue
        print(f"{preset} (>= {floor} dB): {json.dumps(best['options'])}, FLOP ratio {best['flop_ratio']}, "
              f"worst-seed PSNR {best['psnr_db']} dB")


def _printable(options: dict) -> dict:
    """Options as JSON can hold them: codebook thresholds as strings, infinity as "inf"."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in options.items()}
    if "adacache" in out:
        out["adacache"] = {"codebook": {("inf" if t == math.inf else str(t)): r
                                        for t, r in options["adacache"]["codebook"].items()}}
    return out


if __name__ == "__main__":
    main()
