"""ditopt under diffusers' context parallelism (Ulysses attention): the same decisions on every rank.

    torchrun --nproc-per-node 2 examples/context_parallel.py              # CPU: gloo
    torchrun --nproc-per-node 8 examples/context_parallel.py --lowering inductor   # GPUs: nccl

Samples ditopt's fixture (a diffusers WanTransformer3DModel) in one process and then with its token
sequence split over the ranks (diffusers' ContextParallelConfig, Ulysses), each compiled with ditopt
`lossless` and `balanced`.  Prints, per rank, the decisions taken, the FLOPs this rank computed, the
collectives it ran per step, and the difference to the one-process run.  Exits non-zero when the
ranks' decisions differ, or `lossless` under context parallelism differs from one process by more
than 1e-5.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

import ditopt
from ditopt.harness import fixture
from ditopt.harness.parallel import enable_context_parallel, init
from ditopt.runtime import count_flops

PROMPTS = ["red square moving right", "blue circle moving down"]


def run(model, preset: str, args) -> dict:
    """One generation with a preset: its samples, the last generation's stats and this rank's counts."""
    torch._dynamo.reset()
    ditopt.reset(model)
    fn = torch.compile(model, backend="ditopt", options={"preset": preset, "lowering": args.lowering})
    with torch.no_grad():
        fixture.sample(fn, PROMPTS, seed=args.seed, steps=args.steps)  # warm-up: compiles
        with count_flops() as tally:
            video = fixture.sample(fn, PROMPTS, seed=args.seed, steps=args.steps)
    if not ditopt.stats(model)["generations"]:
        raise SystemExit(f"ditopt did not accelerate the model: {ditopt.explain(model)}")
    generation = ditopt.stats(model)["generations"][-1]
    return {"video": video, "decisions": generation.get("adacache", {}).get("decisions", "C" * args.steps),
            "skipped": generation["blocks_skipped"], "computed": generation["blocks_computed"],
            "gflops": tally.flops / 1e9, "collectives": tally.collectives}


def _size(n: float) -> str:
    return f"{n:.0f} B" if n < 1024 else f"{n / 1024:.1f} KiB"


def _say(line: str) -> None:
    """One write per line: the ranks share a pipe, and print's several writes can interleave between them."""
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), (line + "\n").encode())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lowering", choices=("eager", "inductor"), default="eager",
                        help="eager counts FLOPs exactly and compiles fast; inductor for timing on GPUs")
    parser.add_argument("--rank-options-differ", action="store_true",
                        help="give rank 1 other options: ditopt must refuse on every rank before the first step")
    args = parser.parse_args()

    rank, world, device = init()
    model = fixture.load_fixture().to(device)
    if args.rank_options_differ:
        enable_context_parallel(model, ulysses=world)
        preset = "balanced" if rank == 0 else "fast"
        try:
            with torch.no_grad():
                fixture.sample(torch.compile(model, backend="ditopt", options={"preset": preset}), PROMPTS, steps=2)
        except Exception as error:  # noqa: BLE001 - Dynamo wraps the backend's ValueError
            reason = str(error).splitlines()[1] if "\n" in str(error) else str(error)
            _say(f"[rank {rank}] refused: {reason}")
            return 0
        _say(f"[rank {rank}] FAIL: options that differ between ranks were accepted")
        return 1
    single = {p: run(model, p, args) for p in ("lossless", "balanced")}  # every rank: the one-process reference
    enable_context_parallel(model, ulysses=world)
    parallel = {p: run(model, p, args) for p in ("lossless", "balanced")}

    lines, failures = [], []
    for preset, r in parallel.items():
        diff = float((r["video"] - single[preset]["video"]).abs().max())
        per_step = {op: f"{calls / args.steps:.1f} calls, {_size(size / args.steps)}"
                    for op, (calls, size) in sorted(r["collectives"].items())}
        lines.append(f"{preset} decisions {r['decisions']}  blocks computed {r['computed']}, skipped {r['skipped']}; "
                     f"{r['gflops']:.2f} GFLOP on this rank (one process: {single[preset]['gflops']:.2f}); "
                     f"max |difference| to one process {diff:.2e}")
        lines.append(f"{preset} collectives per step (mean): {per_step}")
        if preset == "balanced":
            lines.append(f"balanced one process took {single[preset]['decisions']}")
        every = [None] * world
        dist.all_gather_object(every, r["decisions"])
        if len(set(every)) > 1:
            failures.append(f"{preset}: the ranks took different decisions {every}")
        if preset == "lossless" and diff > 1e-5:
            failures.append(f"lossless differs from one process by {diff:.2e} > 1e-5")
    every = [None] * world
    dist.all_gather_object(every, lines + [f"FAIL: {f}" for f in failures])
    if rank == 0:  # one writer: the ranks' lines never interleave
        for r, rank_lines in enumerate(every):
            for line in rank_lines:
                print(f"[rank {r}] {line}", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
