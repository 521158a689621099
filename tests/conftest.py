import os

import pytest
import torch

# Without a GPU, ditopt's Triton kernels are tested in Triton's interpreter. The variable must be set
# before the kernels are defined (triton.jit reads it), so before ditopt is imported. On a GPU machine,
# TRITON_INTERPRET=0 compiles them for real.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests run on two cores next to other work; keep thread counts predictable.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    from ditopt import diagnostics

    diagnostics.forget()  # the once-per-reason warning state is per process
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def capture_graphs(model, inputs: dict) -> list:
    """The FX graphs Dynamo hands a backend for one call of model(**inputs)."""
    torch._dynamo.reset()  # hypothesis runs many examples inside one test
    graphs = []

    def backend(gm, example_inputs):
        gm.example_inputs = list(example_inputs)  # real tensors: the model's weights and the call's inputs
        graphs.append(gm)
        return gm.forward

    with torch.no_grad():
        out = torch.compile(model, backend=backend)(**inputs)
    return graphs


def compile_ditopt(model, **options):
    """ditopt with the cheap lowering, every method off unless the options turn one on."""
    return torch.compile(model, backend="ditopt", options={"preset": "lossless", "lowering": "eager", **options})
