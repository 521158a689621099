"""diffusers' caches and cache-dit's DBCache at their best measured settings on the fixture, for the bench.

    python examples/peer_settings.py [--seeds 0 1] [--prompt-start 0] [--fixture deep] [--peers dbcache seacache]

Each peer runs a few settings of its main knob (hooks on the eager model, its documented use) on
split A of examples/choose_presets.py (prompts 0-3, seeds 0 and 1; 30 steps, CFG batched); FLOPs are
counted with torch's FlopCounterMode, PSNR is the worst seed against full compute.  For each preset
floor (35, 30, 25 dB) it prints the fastest setting that meets it, as a bench configuration name
(`fbcache:{"threshold": 0.3}`); `ditopt bench --configs ...` then measures those on other prompts.
"""

from __future__ import annotations

import argparse
import json

import torch
from torch.utils.flop_counter import FlopCounterMode

from ditopt.harness import bench, fixture
from ditopt.harness.metrics import psnr

SETTINGS = {
    "fbcache": [{"threshold": t} for t in (0.1, 0.15, 0.2, 0.3, 0.4)],
    "seacache": [{"threshold": t} for t in (0.1, 0.15, 0.25, 0.4)],
    "magcache": [{"threshold": t} for t in (0.03, 0.06, 0.12, 0.24)],
    "taylorseer": [{"cache_interval": n} for n in (2, 3, 4, 5)],
    "pab": [{"spatial_attention_block_skip_range": n} for n in (2, 3, 4)],
    "fastercache": [{"spatial_attention_block_skip_range": n} for n in (2, 3)],
    # cache-dit's DBCache: compute blocks at the front, residual threshold, warm-up, TaylorSeer order
    "dbcache": [{"Fn_compute_blocks": fn, "residual_diff_threshold": r, "max_warmup_steps": 4, "taylorseer_order": o}
                for fn in (1, 2, 4) for r in (0.08, 0.16, 0.32) for o in (0, 1)],
}
FLOORS = {"quality": 35.0, "balanced": 30.0, "fast": 25.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--prompt-start", type=int, default=0)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--fixture", choices=("small", "deep"), default="small",
                        help="deep: the 12-block fixture (ditopt/harness/fixture/deep.py)")
    parser.add_argument("--peers", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    args = parser.parse_args()
    spec = fixture.VideoSpec()
    if args.fixture == "deep":
        from ditopt.harness.fixture.deep import DEEP_SPEC, load_deep

        model, spec = load_deep(), DEEP_SPEC
    else:
        model = fixture.load_fixture()
    prompts = list(fixture.PROMPTS[args.prompt_start: args.prompt_start + args.prompts])

    def generate(seed):
        return lambda fn: fixture.sample(fn, prompts, seed=seed, steps=args.steps, spec=spec,
                                         on_step=lambda t: setattr(bench.CLOCK, "t", float(t)))

    def counted(seed):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            out = generate(seed)(model)
        return out, counter.get_total_flops()

    full = {seed: counted(seed) for seed in args.seeds}
    mag_ratios = bench.magcache_ratios(model, generate(args.seeds[0])) if "magcache" in args.peers else None
    rows = []
    for peer, grid in ((p, SETTINGS[p]) for p in args.peers):
        for settings in grid:
            values, ratios = [], []
            for seed in args.seeds:
                with bench.peer_enabled(model, peer, settings, True, mag_ratios) as refresh:
                    refresh()
                    out, flops = counted(seed)
                values.append(psnr(out, full[seed][0]))
                ratios.append(flops / full[seed][1])
            rows.append({"config": f"{peer}:{json.dumps(settings)}", "worst_psnr_db": round(min(values), 2),
                         "flop_ratio": round(sum(ratios) / len(ratios), 4)})
            print(json.dumps(rows[-1]), flush=True)
    print()
    for preset, floor in FLOORS.items():
        ok = [r for r in rows if r["worst_psnr_db"] >= floor]
        best = min(ok, key=lambda r: r["flop_ratio"]) if ok else None
        print(f"{preset} (>= {floor} dB): " + (json.dumps(best) if best else "no peer setting meets it"))


if __name__ == "__main__":
    main()
