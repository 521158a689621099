"""With every method off, ditopt's output equals eager on every supported family, under both lowerings."""

import warnings

import pytest
import torch

from ditopt.harness import models
from ditopt.runtime import runtimes_of

FAMILIES = models.FAMILIES


def _run(family, lowering):
    case = models.build(family)
    inputs = case.inputs(batch=2, seed=1)
    with torch.no_grad():
        expected = models.call(case.model, inputs)
        compiled = torch.compile(case.model, backend="ditopt", options={"preset": "lossless", "lowering": lowering})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Mochi's graph breaks warn (once) by design
            actual = models.call(compiled, inputs)
    return case, expected, actual


@pytest.mark.parametrize("family", FAMILIES)
def test_lossless_equals_eager_eager_lowering(family):
    case, expected, actual = _run(family, "eager")
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    if family != "mochi":  # Mochi's attention breaks the graph inside every block (data-dependent nonzero)
        assert runtimes_of(case.model), "ditopt should have understood this model"


@pytest.mark.inductor
@pytest.mark.parametrize("family", [f if f in ("wan", "stdit") else pytest.param(f, marks=pytest.mark.slow)
                                    for f in FAMILIES])  # two families by default, every one with --all
def test_lossless_equals_eager_inductor(family):
    _, expected, actual = _run(family, "inductor")
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
