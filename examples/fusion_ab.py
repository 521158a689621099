"""Interleaved A/B timing of ditopt configurations on the fixture, for differences smaller than drift.

    python examples/fusion_ab.py [--preset balanced] [--modes none all] [--rounds 5]

`ditopt bench` times each configuration's generations back to back, so a slow minute on a shared
machine lands on one configuration only. Here every round runs one generation of each configuration
(plain Inductor and the preset at each `fuse_regions` mode), the order reversed every other round,
after one compiling warm-up each; it prints the median, min and max seconds per generation and the
region calls one generation makes. Fixture prompts 8-11, seed 4, 30 steps, CFG batched (the bench's
held-out split), Inductor lowering.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import ditopt
from ditopt.harness import fixture
from ditopt.harness.fixture.data import PROMPTS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="balanced")
    parser.add_argument("--modes", nargs="+", default=["none", "all"], choices=["none", "block", "all"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    prompts = PROMPTS[8:12]

    plain = fixture.load_fixture()
    configs = {"inductor": (plain, torch.compile(plain, backend="inductor"))}
    for mode in args.modes:
        model = fixture.load_fixture()  # one model per configuration: no runtime state shared between them
        configs[f"{args.preset} {mode}"] = (model, torch.compile(model, backend="ditopt", options={
            "preset": args.preset, "fuse_regions": mode}))

    calls = {}

    def generate(name):
        model, fn = configs[name]
        ditopt.reset(model)
        before = _region_calls(model)
        start = time.perf_counter()
        fixture.sample(fn, prompts, seed=4, steps=args.steps)
        seconds = time.perf_counter() - start
        calls[name] = _region_calls(model) - before
        return seconds

    names = list(configs)
    for name in names:
        generate(name)  # compiles
    times = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else reversed(names):
            times[name].append(generate(name))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {times[n][-1]:.2f} s" for n in names), flush=True)
    print("| configuration | region calls per generation | median s | min .. max s |\n|---|---|---|---|")
    for name in names:
        t = times[name]
        shown = "" if name == "inductor" else calls[name]
        print(f"| {name} | {shown} | {statistics.median(t):.2f} | {min(t):.2f} .. {max(t):.2f} |")


def _region_calls(model) -> int:
    """Compiled region code run so far by the model's ditopt runtimes (a counter, summed over graphs)."""
    return sum(g.get("region_calls", 0) for g in ditopt.stats(model)["graphs"])


if __name__ == "__main__":
    main()
