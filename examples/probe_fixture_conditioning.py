"""Which words of the prompt does the fixture use?  A loss probe, cheaper and sharper than sampling.

    python examples/probe_fixture_conditioning.py [--weights DIR] [--clips 64]

For clips of the training distribution, noised to a few levels, prints the flow-matching loss with
the right prompt, with one word (colour, shape or direction) swapped for another of its kind, and
with the empty prompt.  A word the model uses costs loss when swapped; a word it ignores costs none.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch

from ditopt.fixture import FIXTURE_DIR, PROMPTS, build_model, prompt_embeddings
from ditopt.fixture.data import COLOURS, DIRECTIONS, SHAPES, make_video

WORDS = {"colour": (0, tuple(COLOURS)), "shape": (1, SHAPES), "direction": (3, tuple(DIRECTIONS))}


def swapped(prompt: str, kind: str, rng: random.Random) -> str:
    position, choices = WORDS[kind]
    words = prompt.split()
    words[position] = rng.choice([w for w in choices if w != words[position]])
    return " ".join(words)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=FIXTURE_DIR, help="folder holding weights.safetensors")
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--levels", type=float, nargs="+", default=[0.95, 0.85, 0.7, 0.5])
    args = parser.parse_args()
    from safetensors.torch import load_file

    model = build_model()
    model.load_state_dict(load_file(str(args.weights / "weights.safetensors")))
    model.eval()
    rng = random.Random(7)
    prompts = [rng.choice(PROMPTS) for _ in range(args.clips)]
    x0 = torch.stack([make_video(p, rng.randrange(2**31)) for p in prompts])
    variants = {"right prompt": prompts, **{f"{kind} swapped": [swapped(p, kind, rng) for p in prompts] for kind in WORDS},
                "empty prompt": [None] * len(prompts)}
    gen = torch.Generator().manual_seed(0)
    print("noise level | " + " | ".join(variants))
    for s in args.levels:
        noise = torch.randn(x0.shape, generator=gen)
        xt = (1 - s) * x0 + s * noise
        timestep = torch.full((len(prompts),), s * 1000.0)
        losses = []
        with torch.no_grad():
            for variant in variants.values():
                pred = model(xt, timestep, prompt_embeddings(variant), return_dict=False)[0]
                losses.append(torch.nn.functional.mse_loss(pred, noise - x0).item())
        print(f"{s} | " + " | ".join(f"{loss:.4f}" for loss in losses))


if __name__ == "__main__":
    main()
