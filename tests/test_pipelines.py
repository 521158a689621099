"""ditopt.apply on real diffusers pipelines, built offline (tests/tiny_pipelines.py), as a user runs them.

For each pipeline: the `lossless` preset gives what the pipeline gives without ditopt; the default preset
skips blocks in every stream (each cache_context the pipeline names); a second call at another frame count
or resolution stays accelerated (no fallback).  The eager lowering keeps them fast; the slow test runs
one through Inductor.
"""

from __future__ import annotations

import pytest
import torch

import ditopt

pytest.importorskip("transformers")

import tiny_pipelines  # noqa: E402  (tests/ is on sys.path: pytest's rootdir conftest)

EAGER = {"lowering": "eager"}

# name -> (builder, call settings, the second call's changed settings)
CASES = {
    "wan": (tiny_pipelines.wan, dict(num_frames=5, height=32, width=32, negative_prompt="blurry static",
                                     guidance_scale=4.0), dict(num_frames=9)),
    "wan2.2": (lambda: tiny_pipelines.wan(two_transformers=True),
               dict(num_frames=5, height=32, width=32, negative_prompt="blurry static", guidance_scale=4.0),
               dict(num_frames=9)),
    "cogvideox": (tiny_pipelines.cogvideox, dict(num_frames=9, height=16, width=16, negative_prompt="low quality",
                                                 guidance_scale=6.0, max_sequence_length=16), dict(num_frames=13)),
    "ltx": (tiny_pipelines.ltx, dict(num_frames=9, height=32, width=32, negative_prompt="low quality",
                                     guidance_scale=3.0), dict(num_frames=17)),
    "flux": (tiny_pipelines.flux, dict(height=32, width=32), dict(height=64)),
}
STEPS = 12


def generate(pipe, **settings) -> torch.Tensor:
    out = pipe(prompt="a red fox running", num_inference_steps=STEPS, output_type="pt",
               generator=torch.Generator().manual_seed(0), **settings)
    return out.frames if hasattr(out, "frames") else out.images


def transformers_of(pipe) -> list[str]:
    return [n for n in ("transformer", "transformer_2") if isinstance(getattr(pipe, n, None), torch.nn.Module)]


def unwrap(pipe) -> dict[str, int]:
    """Take the compiled transformers off the pipeline; returns how many generations each has recorded."""
    starts = {}
    for name in transformers_of(pipe):
        model = getattr(pipe, name)
        starts[name] = len(generations(model))
        setattr(pipe, name, getattr(model, "_orig_mod", model))
    return starts


def generations(model, start: int = 0) -> list[dict]:
    return ditopt.stats(model)["generations"][start:]


def assert_accelerated_in_every_stream(pipe, starts: dict[str, int]) -> None:
    for name in transformers_of(pipe):
        model = getattr(pipe, name)
        s = ditopt.stats(model)
        assert s["fallbacks"] == [], f"{name}: {s['fallbacks']}"
        gens = generations(model, starts.get(name, 0))
        assert gens, f"{name}: no generation recorded (explain: {ditopt.explain(model)})"
        for g in gens:
            assert g["blocks_skipped"] > 0, f"{name}, stream {g['name']!r}: nothing skipped ({ditopt.explain(model)})"


def assert_lossless_then_accelerated(pipe, settings: dict) -> None:
    """`lossless` gives what the pipeline gives; the default preset then skips blocks in every stream."""
    with torch.no_grad():
        expected = generate(pipe, **settings)
        ditopt.apply(pipe, preset="lossless", options=EAGER)
        assert (generate(pipe, **settings) - expected).abs().max().item() <= 1e-5
        starts = unwrap(pipe)
        ditopt.apply(pipe, options=EAGER)
        generate(pipe, **settings)
    assert_accelerated_in_every_stream(pipe, starts)


@pytest.mark.parametrize("case", list(CASES))
def test_pipeline_lossless_equals_the_pipeline_and_default_preset_skips_in_every_stream(case):
    build, settings, changed = CASES[case]
    pipe = build()
    with torch.no_grad():
        expected = generate(pipe, **settings)
        ditopt.apply(pipe, preset="lossless", options=EAGER)
        got = generate(pipe, **settings)
        assert (got - expected).abs().max().item() <= 1e-5

        starts = unwrap(pipe)
        ditopt.apply(pipe, options=EAGER)  # the default preset
        approx = generate(pipe, **settings)
        assert torch.isfinite(approx).all()
        assert_accelerated_in_every_stream(pipe, starts)
        if case == "wan2.2":  # each transformer's calls are its own, named by the pipeline's contexts
            for name in ("transformer", "transformer_2"):
                assert {g["name"] for g in generations(getattr(pipe, name), starts[name])} == {"cond", "uncond"}

        starts = {n: len(generations(getattr(pipe, n))) for n in transformers_of(pipe)}
        generate(pipe, **{**settings, **changed})  # another frame count or resolution
        assert_accelerated_in_every_stream(pipe, starts)


def test_wan_pipeline_with_a_lora_adapter_is_lossless_and_accelerated():
    build, settings, _ = CASES["wan"]
    pipe = build()
    gen = torch.Generator().manual_seed(1)
    lora = {}
    for i in range(len(pipe.transformer.blocks)):
        for proj in ("attn1.to_q", "attn1.to_v", "attn2.to_k", "ffn.net.0.proj"):
            module = pipe.transformer.get_submodule(f"blocks.{i}.{proj}")
            lora[f"blocks.{i}.{proj}.lora_A.weight"] = torch.randn(4, module.in_features, generator=gen) * 0.1
            lora[f"blocks.{i}.{proj}.lora_B.weight"] = torch.randn(module.out_features, 4, generator=gen) * 0.1
    pipe.transformer.load_lora_adapter(lora, adapter_name="test", prefix=None)
    assert_lossless_then_accelerated(pipe, settings)


def test_wan_pipeline_with_torchao_int8_weights_is_lossless_and_accelerated():
    quantization = pytest.importorskip("torchao.quantization")
    build, settings, _ = CASES["wan"]
    pipe = build()
    quantization.quantize_(pipe.transformer, quantization.Int8WeightOnlyConfig())
    assert_lossless_then_accelerated(pipe, settings)


@pytest.mark.slow
@pytest.mark.inductor
def test_wan_pipeline_through_inductor_as_users_run_it():
    """The user's line, unchanged: `ditopt.apply(pipe)` with the default lowering (Inductor)."""
    build, settings, changed = CASES["wan"]
    pipe = build()
    with torch.no_grad():
        expected = generate(pipe, **settings)
        ditopt.apply(pipe, preset="lossless")
        assert (generate(pipe, **settings) - expected).abs().max().item() <= 1e-4
        starts = unwrap(pipe)
        ditopt.apply(pipe)
        generate(pipe, **settings)
        assert_accelerated_in_every_stream(pipe, starts)
        start = {"transformer": len(generations(pipe.transformer))}
        generate(pipe, **{**settings, **changed})
        assert_accelerated_in_every_stream(pipe, start)


def test_wan_pipeline_with_regionally_compiled_blocks_skips_in_every_stream():
    """diffusers' regional compilation in a real pipeline: `transformer.compile_repeated_blocks(backend="ditopt")`;
    each of the pipeline's streams (its cond and uncond contexts) skips blocks across the block graphs."""
    build, settings, _ = CASES["wan"]
    pipe = build()
    with torch.no_grad():
        expected = generate(pipe, **settings)
        pipe.transformer.compile_repeated_blocks(backend="ditopt", options={**EAGER, "adacache": {"codebook": {1e9: 3}}})
        got = generate(pipe, **settings)
    assert torch.isfinite(got).all() and (got - expected).abs().max().item() > 0  # skipping changed something
    gens = generations(pipe.transformer)
    assert {g["name"] for g in gens} == {"cond", "uncond"}
    assert all(g["steps"] == STEPS and g["blocks_skipped"] > 0 for g in gens)
    assert ditopt.stats(pipe.transformer)["fallbacks"] == []
