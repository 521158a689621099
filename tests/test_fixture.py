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
