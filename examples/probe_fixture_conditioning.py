"""Which words of the prompt does the fixture use?  Prints `ditopt.harness.fixture.probe.word_losses`.

    python examples/probe_fixture_conditioning.py [--weights DIR] [--clips 64] [--sample-seeds 0 1 2 3]
    python examples/probe_fixture_conditioning.py --fixture deep --sample-seeds 9001 9002   # the 12-block one

For clips of the training distribution, noised to a few levels, the flow-matching loss with the right
prompt, with one word (colour, shape or direction) swapped for another of its kind, and with the empty
prompt.  A word the model uses costs loss when swapped; a word it ignores costs none.

With --sample-seeds it also samples all 32 prompts once per seed (30 steps, CFG 4) and prints, per
seed, the fraction of samples showing the prompt's colour, moving its direction, and both
(`fixture.prompt_shown`; both is `fixture.conditioning_score`), then the fraction of prompts right in most of the seeds.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ditopt.harness.fixture import FIXTURE_DIR, PROMPTS, VideoSpec, build_model, prompt_shown, sample
from ditopt.harness.fixture.probe import VARIANTS, word_losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fixture", choices=("small", "deep"), default="small")
    parser.add_argument("--weights", type=Path, default=None,
                        help="folder holding weights.safetensors (default: the fixture's shipped folder)")
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--levels", type=float, nargs="+", default=[0.95, 0.85, 0.7, 0.5])
    parser.add_argument("--sample-seeds", type=int, nargs="*", default=[], metavar="SEED")
    args = parser.parse_args()
    from safetensors.torch import load_file

    spec, folder = VideoSpec(), FIXTURE_DIR
    if args.fixture == "deep":
        from ditopt.harness.fixture.deep import DEEP_DIR, DEEP_SPEC, build_deep_model

        model, spec, folder = build_deep_model(), DEEP_SPEC, DEEP_DIR
    else:
        model = build_model()
    model.load_state_dict(load_file(str((args.weights or folder) / "weights.safetensors")))
    model.eval()
    print("noise level | " + " | ".join(VARIANTS))
    for level, losses in word_losses(model, args.levels, args.clips, spec=spec).items():
        print(f"{level} | " + " | ".join(f"{losses[v]:.4f}" for v in VARIANTS))
    if args.sample_seeds:
        print_sampled_conditioning(model, args.sample_seeds, spec)


def print_sampled_conditioning(model, seeds: list[int], spec: VideoSpec = VideoSpec()) -> None:
    prompts = list(PROMPTS)
    right = {p: 0 for p in prompts}
    print("seed | colour | direction | both")
    for seed in seeds:
        colour = direction = both = 0
        for video, prompt in zip(sample(model, prompts, seed=seed, steps=30, spec=spec), prompts):
            colour_shown, direction_right = prompt_shown(video, prompt)
            colour += colour_shown
            direction += direction_right
            both += colour_shown and direction_right
            right[prompt] += colour_shown and direction_right
        n = len(prompts)
        print(f"{seed} | {colour / n:.3f} | {direction / n:.3f} | {both / n:.3f}")
    most = sum(hits > len(seeds) / 2 for hits in right.values())
    print(f"prompts right in most of the {len(seeds)} seeds: {most} of {len(prompts)}")


if __name__ == "__main__":
    main()
