"""One call for a diffusers pipeline: `ditopt.apply(pipe, preset="balanced")`."""

from __future__ import annotations

from typing import Any

import torch

from .config import Config
from .parallel import check_split, prime_context_parallel

COMPONENTS = ("transformer", "transformer_2")  # Wan 2.2 has a second, low-noise transformer


def apply(pipe: Any, preset: str = "balanced", options: dict | None = None, components=COMPONENTS) -> Any:
    """Compile a pipeline's transformer(s) with the ditopt backend, in place, and return the pipeline.

        pipe = ditopt.apply(pipe, preset="fast")                      # then call pipe(...) as usual
        pipe = ditopt.apply(pipe, options={"preset": "lossless", "asymrnr": {"q_ratio": 0.25}})

    The options are checked before anything is compiled; shape changes between calls stay accelerated
    (each new shape is specialised), so no `dynamic=` setting is needed."""
    settings = {"preset": preset, **(options or {})}
    Config.from_options(settings)  # a bad option fails here, not at the first denoising step
    found = []
    for name in components:
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            check_split(module)
            prime_context_parallel(module)
            setattr(pipe, name, torch.compile(module, backend="ditopt", options=settings))
            found.append(name)
    if not found:
        raise ValueError(f"ditopt.apply: {type(pipe).__name__} has no transformer to compile (looked for "
                         f"{list(components)}); compile the denoiser yourself with "
                         "torch.compile(model, backend='ditopt')")
    return pipe


def calibrate(pipe: Any, target_speedup: float, component: str = "transformer", **call_kwargs) -> dict:
    """An AdaCache codebook for this pipeline, from one full-compute generation of `pipe(**call_kwargs)`.

        result = ditopt.calibrate(pipe, 2.0, prompt="a red fox", num_inference_steps=30)
        pipe = ditopt.apply(pipe, options={"adacache": {"codebook": result["codebook"]}})

    Returns {"codebook", "predicted_speedup", "metrics"} (ditopt.passes.adacache.calibrate); the
    pipeline's transformer is left as it was.  Calibrate on prompts and seeds other than the ones you
    judge the result on."""
    from ditopt.passes.adacache import calibrate as calibrate_model

    model = getattr(pipe, component, None)
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"ditopt.calibrate: {type(pipe).__name__} has no module {component!r}")

    def generate(compiled):
        setattr(pipe, component, compiled)
        try:
            pipe(**call_kwargs)
        finally:
            setattr(pipe, component, model)

    return calibrate_model(getattr(model, "_orig_mod", model), generate, target_speedup)
