"""Worst-seed PSNR and FLOP ratio of ditopt configurations on the fixture, against full compute.

    python examples/fidelity.py '{"preset": "lossless", "asymrnr": {"q_ratio": 0.25, "kv_ratio": 0}}' \\
        [--prompts 4] [--prompt-start 0] [--seeds 0 1] [--steps 30] [--separate-cfg]

Each configuration runs with the eager lowering (FLOPs counted exactly by the runtime) on `--prompts`
fixture prompts from `--prompt-start`, batched CFG, once per seed; PSNR is against the same seed at full
compute.  `{"config": "tuned.json"}` measures what `ditopt tune` wrote.
"""

from __future__ import annotations

import argparse
import json

import torch
from torch.utils.flop_counter import FlopCounterMode

import ditopt
from ditopt.harness import fixture
from ditopt.harness.metrics import psnr
from ditopt.runtime import count_flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("options", nargs="+", help="ditopt options, one JSON object per configuration")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--prompt-start", type=int, default=0, help="index of the first fixture prompt")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--separate-cfg", action="store_true", help="cond and uncond as two calls per step")
    args = parser.parse_args()
    configs = [json.loads(o) for o in args.options]
    for options in configs:
        ditopt.Config.from_options({**options, "lowering": "eager"})  # a bad option fails before any work

    batched = not args.separate_cfg
    model = fixture.load_fixture()
    prompts = list(fixture.PROMPTS[args.prompt_start: args.prompt_start + args.prompts])
    with torch.no_grad():
        full, full_flops = {}, {}
        for seed in args.seeds:
            with FlopCounterMode(display=False) as counter:
                full[seed] = fixture.sample(model, prompts, seed=seed, steps=args.steps, cfg_batched=batched)
            full_flops[seed] = counter.get_total_flops()
        for options in configs:
            torch._dynamo.reset()
            ditopt.reset(model)
            fn = torch.compile(model, backend="ditopt", options={**options, "lowering": "eager"})
            values, ratios = [], []
            for seed in args.seeds:
                with count_flops() as tally:
                    out = fixture.sample(fn, prompts, seed=seed, steps=args.steps, cfg_batched=batched)
                values.append(psnr(out, full[seed]))
                ratios.append(tally.flops / full_flops[seed])
            print(json.dumps({"options": options, "psnr_db_per_seed": [round(v, 2) for v in values],
                              "worst_psnr_db": round(min(values), 2),
                              "flop_ratio": round(sum(ratios) / len(ratios), 4)}), flush=True)


if __name__ == "__main__":
    main()
