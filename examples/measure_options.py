"""Measure given ditopt option sets on a split of a trained fixture: FLOP ratio and PSNR per seed.

    python examples/measure_options.py examples/deep_toca_candidates.jsonl --fixture deep --prompts 2 --seeds 0 1

`ditopt tune` searches; this measures exactly the option sets you list (one JSON object per line of the
file; `#` lines are comments), the way tune measures its candidates: the eager lowering, which makes the
same decisions as Inductor, FLOPs counted by the runtime against full compute, PSNR of each seed against
full compute.  One line per option set, as it finishes: FLOP ratio, worst PSNR, PSNR per seed, options.
"""

from __future__ import annotations

import argparse
import json
import types

import torch

from ditopt.harness.cli import _sampler
from ditopt.tune import _Search


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("options_file", help="JSON lines: one options dict per line ('preset' defaults to lossless)")
    parser.add_argument("--fixture", choices=("small", "deep"), default="deep")
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--prompt-start", type=int, default=0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--sampler", choices=("euler", "unipc"), default="euler")
    parser.add_argument("--shift", type=float, default=1.0, help="the sampler's sigma shift")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with open(args.options_file) as f:
        option_sets = [json.loads(line) for line in f if line.strip() and not line.lstrip().startswith("#")]
    name = "fixture-deep" if args.fixture == "deep" else "fixture"
    sampling = types.SimpleNamespace(model=name, steps=args.steps, sampler=args.sampler, shift=args.shift)
    model, loop, what = _sampler(sampling, args.prompts, args.prompt_start)
    search = _Search(model, lambda fn, seed: loop(seed)(fn), "psnr", args.seeds, "flops", 0.0, progress=False)
    search.reference()
    print(f"{what}, seeds {args.seeds}, {args.steps} {args.sampler} steps (shift {args.shift:g}): flop_ratio "
          "worst_psnr per_seed options", flush=True)
    for options in option_sets:
        cand = search.measure({"preset": "lossless", **options}, "given")
        print(f"{cand.flop_ratio:.4f} {cand.worst:6.2f} {[round(v, 2) for v in cand.per_case]} {json.dumps(options)}",
              flush=True)


if __name__ == "__main__":
    main()
