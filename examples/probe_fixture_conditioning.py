"""Which words of the prompt does the fixture use?  Prints `ditopt.fixture.probe.word_losses`.

    python examples/probe_fixture_conditioning.py [--weights DIR] [--clips 64]

For clips of the training distribution, noised to a few levels, the flow-matching loss with the right
prompt, with one word (colour, shape or direction) swapped for another of its kind, and with the empty
prompt.  A word the model uses costs loss when swapped; a word it ignores costs none.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ditopt.fixture import FIXTURE_DIR, build_model
from ditopt.fixture.probe import VARIANTS, word_losses


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
    print("noise level | " + " | ".join(VARIANTS))
    for level, losses in word_losses(model, args.levels, args.clips).items():
        print(f"{level} | " + " | ".join(f"{losses[v]:.4f}" for v in VARIANTS))


if __name__ == "__main__":
    main()
