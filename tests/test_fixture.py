"""The shipped fixture loads offline and its samples carry the prompt: its colour and its direction of motion."""

import pytest
import torch

from ditopt.harness import fixture
from ditopt.harness.fixture.data import COLOURS, measure_motion, parse_prompt

AXIS = {"left": "horizontal", "right": "horizontal", "up": "vertical", "down": "vertical"}


def test_fixture_samples_show_the_prompted_colour_and_no_other():
    model = fixture.load_fixture()
    prompts = list(fixture.PROMPTS[::4])  # every colour with both shapes
    with torch.no_grad():
        videos = fixture.sample(model, prompts, seed=11, steps=20)
    hits = 0
    for video, prompt in zip(videos, prompts):
        colour, _, _ = parse_prompt(prompt)
        found, _ = measure_motion(video, colour)
        others = max(measure_motion(video, c)[0] for c in COLOURS if c != colour)
        hits += int(found >= 0.75 and others < 0.5)
    assert hits >= 7, f"only {hits} of {len(prompts)} samples show their prompt's colour alone"


@pytest.mark.slow
def test_fixture_samples_move_the_prompted_direction():
    # chance is 1/4 for the direction and 1/2 for its axis (vertical or horizontal)
    model = fixture.load_fixture()
    prompts = list(fixture.PROMPTS)
    with torch.no_grad():
        videos = fixture.sample(model, prompts, seed=12, steps=20)
    directions = axes = 0
    for video, prompt in zip(videos, prompts):
        colour, _, direction = parse_prompt(prompt)
        _, moved = measure_motion(video, colour)
        directions += moved == direction
        axes += moved is not None and AXIS[moved] == AXIS[direction]
    assert directions >= 24, f"only {directions} of {len(prompts)} samples move in their prompt's direction"
    assert axes >= 28, f"only {axes} of {len(prompts)} samples move along their prompt's axis"


def test_unconditional_samples_do_not_prefer_the_prompted_colour():
    # the control for the test above: without the prompt, the colour is not forced
    model = fixture.load_fixture()
    with torch.no_grad():
        videos = fixture.sample(model, ["red square moving left"] * 4, seed=3, steps=20, guidance=0.0)
    reds = sum(measure_motion(v, "red")[0] >= 0.75 for v in videos)
    assert reds < 4


def test_training_log_is_shipped_and_ends_lower_than_it_starts():
    log = fixture.training_log()
    assert log[0]["step"] == 50 and log[-1]["loss"] < log[0]["loss"] / 4


def test_swapping_any_word_of_the_prompt_costs_loss():
    from ditopt.harness.fixture.probe import word_losses

    losses = word_losses(fixture.load_fixture(), levels=(0.85, 0.5), clips=32)
    for level, at in losses.items():
        assert at["colour swapped"] > 1.3 * at["right prompt"], (level, at)
        assert at["empty prompt"] > 1.1 * at["right prompt"], (level, at)
    # the shape is drawn from the prompt once the noise leaves it visible
    assert losses[0.5]["shape swapped"] > 1.05 * losses[0.5]["right prompt"], losses[0.5]
    # the direction decides where the trail goes while the shape is still hidden in noise
    assert losses[0.85]["direction swapped"] > 1.2 * losses[0.85]["right prompt"], losses[0.85]


def test_the_deep_fixture_grows_from_the_shipped_one_without_changing_what_it_computes():
    from diffusers import WanTransformer3DModel

    from ditopt.harness.fixture import MODEL_CONFIG, load_fixture
    from ditopt.harness.fixture.deep import DEEP_CONFIG, grow

    small = load_fixture()
    deep = WanTransformer3DModel(**DEEP_CONFIG).eval()
    deep.load_state_dict(grow(small.state_dict()))
    assert DEEP_CONFIG["num_layers"] >= 12 and DEEP_CONFIG["num_layers"] == 3 * MODEL_CONFIG["num_layers"]
    x, t, text = torch.randn(2, 3, 4, 32, 32), torch.tensor([700.0, 300.0]), torch.randn(2, 4, 64)
    with torch.no_grad():
        torch.testing.assert_close(deep(x, t, text, return_dict=False)[0], small(x, t, text, return_dict=False)[0],
                                   rtol=0, atol=1e-6)
    tokens = 4 * (32 // 2) * (32 // 2)
    assert tokens >= 1024


@pytest.mark.slow
def test_an_interrupted_training_continues_where_it_stopped(tmp_path):
    """A run stopped after step 1 and started again with the same command ends with the weights of a run
    that never stopped: batches and noise are functions of the step, and the checkpoint holds the rest."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    def train(out, *extra):
        cmd = [sys.executable, "-m", "ditopt.harness.fixture.train", "--steps", "3", "--batch", "2", "--eval-every",
               "1000", "--checkpoint-every", "1", "--out", str(out), *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout

    train(tmp_path / "whole")
    train(tmp_path / "parts", "--stop-at", "1")
    assert "continuing stage 1 from step 1" in train(tmp_path / "parts")
    whole, parts = load_file(str(tmp_path / "whole" / "weights.safetensors")), load_file(str(tmp_path / "parts" / "weights.safetensors"))
    assert whole.keys() == parts.keys()
    for k in whole:
        torch.testing.assert_close(parts[k], whole[k], rtol=0, atol=0)


@pytest.mark.parametrize("sampler", ["euler", "unipc"])
def test_the_samplers_run_their_steps_with_a_shift_and_ditopt_sees_one_generation(sampler):
    """Flow-matching Euler and UniPC (Wan's), shifted toward high noise: the model is called once per step with
    falling timesteps, the shift spends more of them at high noise, and ditopt counts one generation of all of
    them (skipping in it)."""
    import ditopt

    model = fixture.load_fixture()
    seen = {}
    for shift in (1.0, 3.0):
        ts = seen[shift] = []
        with torch.no_grad():
            fixture.sample(model, list(fixture.PROMPTS[:1]), steps=20, sampler=sampler, shift=shift,
                           on_step=lambda t: ts.append(float(t)))
    assert len(seen[1.0]) == len(seen[3.0]) == 20
    assert all(a > b for a, b in zip(seen[3.0], seen[3.0][1:]))
    assert seen[3.0][10] > seen[1.0][10]  # the shift keeps the middle step at higher noise
    torch._dynamo.reset()
    fn = torch.compile(model, backend="ditopt", options={"lowering": "eager"})
    with torch.no_grad():
        out = fixture.sample(fn, list(fixture.PROMPTS[:1]), steps=20, sampler=sampler, shift=3.0)
    (gen,) = ditopt.stats(model)["generations"]
    assert torch.isfinite(out).all() and gen["steps"] == 20 and gen["blocks_skipped"] > 0
