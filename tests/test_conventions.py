"""Conventions of current models that ditopt recognises by itself (docs/architecture.md, "Conventions"):
patchify without a convolution, timesteps that rise, per-token timesteps, a timestep that enters only as
an embedding (steps from the caller), diffusers' flex attention; and, whatever the convention and the call
pattern, no cached value ever crosses from one generation, stream or model into another.
"""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ditopt
from ditopt.runtime import count_flops

from conftest import capture_graphs, compile_ditopt
from convention_dit import STEPS, ConventionDiT, latent, run_generation, schedule, text, timestep_input

FORCED = {"adacache": {"codebook": {1e9: 3}}}  # skip whatever the change: every skippable step skips


@contextlib.contextmanager
def attention_backend(model, name: str):
    """diffusers' attention backend for `model` inside the block only: set_attention_backend also sets a
    process-wide active backend, which reset_attention_backend leaves, so it is restored here."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    active = _AttentionBackendRegistry._active_backend
    model.set_attention_backend(name)
    try:
        yield
    finally:
        model.reset_attention_backend()
        _AttentionBackendRegistry.set_active_backend(active)


@pytest.mark.parametrize("channels_last", [False, True])
def test_patchify_by_reshape_and_linear_is_found_and_accelerated(channels_last):
    torch.manual_seed(0)
    model = ConventionDiT(channels_last=channels_last).eval()
    x = latent(model)
    from ditopt.analysis import analyze
    from ditopt.passes.pipeline import NORMALIZE

    gm = capture_graphs(model, dict(x=x, text=text(), t=torch.tensor([999.0])))[0]
    for _, run in NORMALIZE:
        run(gm)
    layout = analyze(gm).layout
    assert layout.grid == (2, 4, 4) and layout.video_tokens == 32
    assert "Linear over 1x2x2 patches" in layout.patchify and ("last" in layout.patchify) == channels_last
    _lossless_and_forced_skip(model, "falling")


def _lossless_and_forced_skip(model, convention, step_index=False):
    expected = run_generation(model, model, convention, step_index=step_index)
    torch._dynamo.reset()
    got = run_generation(compile_ditopt(model), model, convention, step_index=step_index)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-5)

    def flops(options):
        torch._dynamo.reset()
        ditopt.reset(model)
        with count_flops() as tally:
            run_generation(compile_ditopt(model, **options), model, convention, step_index=step_index)
        return tally.flops

    assert flops(FORCED) < 0.8 * flops({})
    assert "skipped" in ditopt.explain(model) and "0 accelerated" not in ditopt.explain(model)


@pytest.mark.parametrize("convention", ["rising", "sigma", "integer"])
def test_timestep_conventions_keep_one_generation_per_loop(convention):
    torch.manual_seed(0)
    model = ConventionDiT().eval()
    _lossless_and_forced_skip(model, convention)
    torch._dynamo.reset()
    ditopt.reset(model)
    fn = compile_ditopt(model, **FORCED)
    start = len(ditopt.stats(model)["generations"])
    run_generation(fn, model, convention, seed=0)
    run_generation(fn, model, convention, seed=1)
    gens = ditopt.stats(model)["generations"][start:]
    assert [g["steps"] for g in gens] == [STEPS, STEPS]
    assert all(g["blocks_skipped"] > 0 for g in gens)


def test_per_token_timesteps_are_read_and_never_leak_across_generations():
    torch.manual_seed(0)
    model = ConventionDiT(timestep="token").eval()
    _lossless_and_forced_skip(model, "falling")
    torch._dynamo.reset()
    fresh = run_generation(compile_ditopt(model, **FORCED), model, "falling", seed=1)
    torch._dynamo.reset()
    fn = compile_ditopt(model, **FORCED)
    run_generation(fn, model, "falling", seed=0)
    second = run_generation(fn, model, "falling", seed=1)
    for a, b in zip(second, fresh):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_timestep_that_enters_as_an_embedding_takes_its_steps_from_the_caller():
    torch.manual_seed(0)
    model = ConventionDiT(timestep="embedded").eval()
    _lossless_and_forced_skip(model, "falling", step_index=True)
    # without the caller's step index, nothing tells the steps apart: every call is a first step, one warning
    torch._dynamo.reset()
    ditopt.reset(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn = compile_ditopt(model, **FORCED)
        outs = run_generation(fn, model, "falling")
    ours = [str(w.message) for w in caught if "cannot tell the denoising steps" in str(w.message)]
    assert len(ours) == 1
    assert all(g["blocks_skipped"] == 0 for g in ditopt.stats(model)["generations"][-STEPS:])
    torch._dynamo.reset()
    with ditopt.generation(model):  # or say it explicitly
        run_generation(compile_ditopt(model, **FORCED), model, "falling")
    assert ditopt.stats(model)["generations"][-1]["blocks_skipped"] > 0
    assert outs


def test_flex_attention_becomes_sdpa_and_a_masked_one_is_named():
    from ditopt.harness import models

    case = models.build("wan")
    inputs = case.inputs()
    with attention_backend(case.model, "flex"), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex's own "called without torch.compile" notice
        expected = models.call(case.model, inputs)
        got = models.call(compile_ditopt(case.model), inputs)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    s = ditopt.stats(case.model)
    assert s["fallbacks"] == [] and s["graphs"][0]["blocks"] == 2

    def causal(b, h, q, k):
        return q >= k

    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    class Causal(torch.nn.Module):
        def forward(self, q):
            mask = create_block_mask(causal, None, None, q.shape[2], q.shape[2], device="cpu")
            return flex_attention(q, q, q, block_mask=mask)

    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        q = torch.randn(1, 2, 16, 8)
        out = compile_ditopt(Causal())(q)
    ours = [str(w.message) for w in caught if str(w.message).startswith("ditopt:")]
    assert len(ours) == 1 and "flex_attention" in ours[0] and "no attention" not in ours[0], ours
    assert torch.isfinite(out).all()


CONVENTIONS = st.sampled_from(["falling", "rising", "sigma", "integer"])
TIMESTEPS = st.sampled_from(["sample", "token"])


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(convention=CONVENTIONS, timestep=TIMESTEPS, separate_cfg=st.booleans(), two_models=st.booleans(),
       abandon=st.booleans())
def test_no_cached_value_crosses_a_generation(convention, timestep, separate_cfg, two_models, abandon):
    """Whatever the convention and call pattern, a generation's outputs equal a fresh compile's: generations
    back to back (the first abandoned half way or not), two models of one class alternating (they share
    one Dynamo graph), CFG as one batched call or as two separate calls per step."""
    torch.manual_seed(0)
    models_ = [ConventionDiT(timestep=timestep).eval() for _ in range(2 if two_models else 1)]

    def pattern(fns, generations: list[tuple[int, int]]) -> list[torch.Tensor]:
        outs = []
        for seed, steps in generations:
            for fn, model in zip(fns, models_):
                x, ctx = latent(model, seed), text(seed)
                with torch.no_grad():
                    for t in schedule(convention)[:steps]:
                        if separate_cfg:
                            for c in (ctx, torch.zeros_like(ctx)):
                                outs.append(fn(x=x, text=c, **timestep_input(model, t, x)))
                        else:
                            xx, cc = torch.cat([x, x]), torch.cat([ctx, torch.zeros_like(ctx)])
                            outs.append(fn(x=xx, text=cc, **timestep_input(model, t, xx)))
                        x = x - outs[-1][: x.shape[0]] / STEPS
        return outs

    torch._dynamo.reset()
    together = pattern([compile_ditopt(m, **FORCED) for m in models_],
                       [(0, STEPS // 2 if abandon else STEPS), (1, STEPS)])
    torch._dynamo.reset()
    for m in models_:
        ditopt.reset(m)
    fresh = pattern([compile_ditopt(m, **FORCED) for m in models_], [(1, STEPS)])
    assert any(g["blocks_skipped"] > 0 for g in ditopt.stats(models_[0])["generations"])
    for a, b in zip(together[-len(fresh):], fresh):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["native", "_native_math", "_native_flash", "flex"])
def test_every_diffusers_attention_backend_that_runs_on_the_cpu_is_accelerated(backend):
    from ditopt.harness import models

    case = models.build("wan")
    inputs = case.inputs()
    with attention_backend(case.model, backend), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = models.call(case.model, inputs)
        got = models.call(compile_ditopt(case.model), inputs)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert ditopt.stats(case.model)["fallbacks"] == []


def test_a_graph_break_before_the_blocks_is_named_in_the_warning():
    """HunyuanVideo 1.5 branches on `torch.all(image_embeds == 0)` before its blocks: the warning names that
    line and what avoids it, and the output is the model's."""
    from diffusers import HunyuanVideo15Transformer3DModel

    torch.manual_seed(0)
    model = HunyuanVideo15Transformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_refiner_layers=1, text_embed_dim=16, text_embed_2_dim=16, image_embed_dim=16, rope_axes_dim=(2, 2, 4),
        target_size=32).eval()
    inputs = dict(hidden_states=torch.randn(1, 4, 2, 8, 8), timestep=torch.tensor([900.0]),
                  encoder_hidden_states=torch.randn(1, 6, 16), encoder_attention_mask=torch.ones(1, 6),
                  encoder_hidden_states_2=torch.randn(1, 4, 16), encoder_attention_mask_2=torch.ones(1, 4),
                  image_embeds=torch.zeros(1, 3, 16), return_dict=False)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        expected = model(**inputs)[0]
        got = compile_ditopt(model)(**inputs)[0]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    ours = [str(w.message) for w in caught if "graph break at" in str(w.message)]
    assert ours and "transformer_hunyuan_video15.py" in ours[0] and "if is_t2v" in ours[0]
    assert "compute that value before calling the model" in ours[0]


def test_blocks_with_side_outputs_replay_them_when_skipped():
    """Wan VACE's control blocks hand on conditioning states beside their residual stream: a skipped span
    replays them from its last computed step."""
    from diffusers import WanVACETransformer3DModel

    from ditopt.runtime import runtimes_of

    torch.manual_seed(0)
    model = WanVACETransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, text_dim=16,
        freq_dim=16, ffn_dim=32, num_layers=4, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32, vace_layers=[0, 2], vace_in_channels=8).eval()
    x, control, ctx = torch.randn(1, 4, 2, 8, 8), torch.randn(1, 8, 2, 8, 8), torch.randn(1, 5, 16)

    def loop(fn):
        with torch.no_grad():
            return [fn(hidden_states=x, timestep=t.reshape(1), encoder_hidden_states=ctx, control_hidden_states=control,
                       return_dict=False)[0] for t in torch.linspace(999, 0, STEPS)]

    expected = loop(model)
    for a, b in zip(loop(compile_ditopt(model)), expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)

    def flops(options):
        torch._dynamo.reset()
        ditopt.reset(model)
        with count_flops() as tally:
            loop(compile_ditopt(model, **options))
        return tally.flops

    full, skipped = flops({}), flops(FORCED)
    assert skipped < 0.8 * full
    spans = runtimes_of(model)[-1].report["adacache"]["spans"]
    assert any(s.get("replayed_side_outputs") for s in spans)
