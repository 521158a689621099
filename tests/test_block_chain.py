"""Blocks that each sit in a Dynamo graph of their own (diffusers' compile_repeated_blocks, blocks compiled one
by one, a forward that a graph break cuts before its blocks) stay skippable: their calls form a chain per block
list (passes/block_chain.py), and a skipped span adds exactly its cached residual."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

import ditopt
from ditopt.runtime import count_flops, runtimes_of

from convention_dit import STEPS, ConventionDiT, run_generation

FORCED = {"preset": "lossless", "lowering": "eager", "adacache": {"codebook": {1e9: 3}}}  # skip when allowed
NEVER = {"preset": "lossless", "lowering": "eager", "adacache": {"codebook": {1e9: 1}}}  # decide, never skip


def tiny_wan():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, text_dim=16,
        freq_dim=16, ffn_dim=32, num_layers=4, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32).eval()


def wan_loop(model, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x, ctx = torch.randn(1, 4, 2, 8, 8, generator=gen), torch.randn(1, 5, 16, generator=gen)
    outs = []
    with torch.no_grad():
        for t in torch.linspace(999, 0, STEPS).tolist():
            out = model(hidden_states=x, timestep=torch.tensor([t]), encoder_hidden_states=ctx, return_dict=False)[0]
            outs.append(out)
            x = x - out / STEPS
    return outs


def first_input(args, kwargs):
    return args[0] if args else next(iter(kwargs.values()))


def replay_with_spans(model, blocks, loop, decisions: list[str], spans: list[list[int]]):
    """The loop run eagerly, each skipped span of blocks replaced by input + its residual at the last computed
    step (decisions: one string per generation, 'C' or 'S' per step): what a chain must compute."""
    per_step = [d for generation in decisions for d in generation]
    state = {"step": -1, "inputs": {}, "residual": {}}

    def pre(k):
        def hook(module, args, kwargs):
            if k == 0:
                state["step"] += 1
            for first, _ in spans:
                if k == first:
                    state["inputs"][first] = first_input(args, kwargs)
        return hook

    def post(k):
        def hook(module, args, kwargs, output):
            skip = per_step[state["step"]] == "S"
            tensor_out = output[0] if isinstance(output, tuple) else output
            for first, last in spans:
                if skip and k == first:
                    new = state["inputs"][first] + state["residual"][first]
                elif skip and first < k <= last:
                    new = first_input(args, kwargs)
                elif not skip and k == last:
                    state["residual"][first] = tensor_out - state["inputs"][first]
                    continue
                else:
                    continue
                return (new, *output[1:]) if isinstance(output, tuple) else new
            return None
        return hook

    handles = [h for k, block in enumerate(blocks) for h in (
        block.register_forward_pre_hook(pre(k), with_kwargs=True),
        block.register_forward_hook(post(k), with_kwargs=True))]
    try:
        return loop(model)
    finally:
        for h in handles:
            h.remove()


def chain_stats(model) -> dict:
    graph = next(g for g in ditopt.stats(model)["graphs"] if "chained_blocks" in g)
    return graph["chained_blocks"][0]


def flops_of(fn) -> int:
    with count_flops() as tally:
        fn()
    return tally.flops


def test_compile_repeated_blocks_skips_spans_of_block_graphs_exactly():
    """diffusers' regional compilation: one graph for every Wan block; two generations back to back; every
    output equals the eager model with each skipped span replaced by its cached residual."""
    model = tiny_wan()
    expected_full = wan_loop(model) + wan_loop(model, seed=1)
    model.compile_repeated_blocks(backend="ditopt", options=NEVER)
    never = flops_of(lambda: wan_loop(model))
    for got, want in zip(wan_loop(model, seed=1), expected_full[STEPS:]):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)  # deciding alone changes nothing

    torch._dynamo.reset()
    model = tiny_wan()
    model.compile_repeated_blocks(backend="ditopt", options=FORCED)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = []
        forced = flops_of(lambda: got.extend(wan_loop(model) + wan_loop(model, seed=1)))
    assert not [w for w in caught if "not accelerated" in str(w.message) or "cannot tell" in str(w.message)]
    generations = ditopt.stats(model)["generations"]
    decisions = [g["adacache"]["decisions"] for g in generations]
    assert [len(d) for d in decisions] == [STEPS, STEPS] and all("S" in d for d in decisions)
    spans = chain_stats(model)["spans"]
    assert spans == [[1, 3]]
    eager = tiny_wan()
    expected = replay_with_spans(eager, eager.blocks, lambda m: wan_loop(m) + wan_loop(m, seed=1), decisions, spans)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert forced / 2 < 0.8 * never
    said = ditopt.explain(model)
    assert "4 blocks compiled one by one, skipped across their graphs (blocks: spans [[1, 3]])" in said
    assert re.search(r"block calls computed, [1-9]\d* skipped", said)


def tiny_hunyuan15(layers: int = 4):
    from diffusers import HunyuanVideo15Transformer3DModel

    torch.manual_seed(0)
    return HunyuanVideo15Transformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=layers,
        num_refiner_layers=1, text_embed_dim=16, text_embed_2_dim=16, image_embed_dim=16, rope_axes_dim=(2, 2, 4),
        target_size=32).eval()


def hunyuan_loop(model):
    gen = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 4, 4, 16, 16, generator=gen),
                  encoder_hidden_states=torch.randn(1, 6, 16, generator=gen), encoder_attention_mask=torch.ones(1, 6),
                  encoder_hidden_states_2=torch.randn(1, 4, 16, generator=gen),
                  encoder_attention_mask_2=torch.ones(1, 4), image_embeds=torch.zeros(1, 3, 16), return_dict=False)
    outs = []
    with torch.no_grad():
        for t in torch.linspace(999, 0, STEPS).tolist():
            outs.append(model(**inputs, timestep=torch.tensor([t]))[0])
    return outs


def test_a_graph_break_before_the_blocks_leaves_them_skippable():
    """HunyuanVideo 1.5 branches on `torch.all(image_embeds == 0)` before its blocks, so each block's forward
    becomes a graph of its own: the blocks run as a chain, the steps read from the graph before the break."""
    model = tiny_hunyuan15()
    expected = hunyuan_loop(model)
    never = flops_of(lambda: [torch.testing.assert_close(a, b, rtol=0, atol=1e-5) for a, b in zip(
        hunyuan_loop(torch.compile(model, backend="ditopt", options=NEVER)), expected)])
    torch._dynamo.reset()
    ditopt.reset(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = torch.compile(model, backend="ditopt", options=FORCED)
        got = []
        forced = flops_of(lambda: got.extend(hunyuan_loop(compiled)))
    assert not [w for w in caught if "graph break" in str(w.message) or "cannot tell" in str(w.message)]
    assert forced < 0.8 * never
    decisions = [ditopt.stats(model)["generations"][-1]["adacache"]["decisions"]]
    spans = chain_stats(model)["spans"]
    eager = tiny_hunyuan15()
    want = replay_with_spans(eager, eager.transformer_blocks, hunyuan_loop, decisions, spans)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert "4 blocks compiled one by one" in ditopt.explain(model)


def convention_loop(model, step_index: bool = False):
    """A 10-step loop of the model itself, falling timesteps (tests/convention_dit.py)."""
    return run_generation(model, model, "falling", step_index=step_index)


def compile_blocks(model, options):
    """Regional compilation written by hand: each block's forward compiled, the model's forward eager."""
    for block in model.blocks:
        block.compile(backend="ditopt", options=options)
    return model


def test_a_value_the_caller_changes_between_blocks_cuts_the_span():
    """The forward adds a hint to the tokens after block 1 (as Wan VACE does): no span crosses that point, so a
    skipped step adds each span's own residual and the hint once, as the eager model would."""
    model = compile_blocks(ConventionDiT(depth=4, hint_after=1), FORCED)
    got = convention_loop(model)
    assert chain_stats(model)["spans"] == [[1, 1], [2, 3]]
    decisions = [g["adacache"]["decisions"] for g in ditopt.stats(model)["generations"]]
    assert decisions and "S" in decisions[-1]
    eager = ConventionDiT(depth=4, hint_after=1)
    eager.load_state_dict(model.state_dict())
    want = replay_with_spans(eager, eager.blocks, convention_loop, decisions, [[1, 1], [2, 3]])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("step_index", [False, True])
def test_chained_blocks_without_a_timestep_take_steps_from_the_caller(step_index):
    """The caller embeds the timestep (no timestep argument): with diffusers' cache_context step_index the chain
    knows the steps and skips; without it every forward is a first step (nothing reused) and one warning says so."""
    model = compile_blocks(ConventionDiT(depth=4, timestep="embedded"), FORCED)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = convention_loop(model, step_index=step_index)
    said = [w for w in caught if "cannot tell the denoising steps" in str(w.message)]
    generations = ditopt.stats(model)["generations"]
    eager = ConventionDiT(depth=4, timestep="embedded")
    eager.load_state_dict(model.state_dict())
    if step_index:
        assert not said and len(generations) == 1 and "S" in generations[0]["adacache"]["decisions"]
    else:
        assert len(said) == 1 and len(generations) == STEPS
        assert all(g["blocks_skipped"] == 0 for g in generations)
        for a, b in zip(got, convention_loop(eager)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_lossless_block_graphs_run_plain_and_say_why():
    """With no block skipping on, a block's own graph is compiled as plain Inductor would, and the warning says
    that only block skipping acts across blocks compiled one by one."""
    model = tiny_wan()
    expected = wan_loop(model)
    model.compile_repeated_blocks(backend="ditopt", options={"preset": "lossless", "lowering": "eager"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = wan_loop(model)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    said = [str(w.message) for w in caught if str(w.message).startswith("ditopt:")]
    assert len(said) == 1 and "acts across blocks compiled one by one, and it is off" in said[0]
    assert ditopt.stats(model)["fallbacks"]


def test_a_failure_in_the_chain_runs_the_blocks_plain_with_one_warning(monkeypatch):
    """The safety net: an exception in the chain's own code never reaches the caller's loop; the blocks run as
    their plain graph from then on, and one warning names the exception."""
    from ditopt.passes import block_chain

    model = tiny_wan()
    expected = wan_loop(model)
    calls = {"n": 0}
    run = block_chain.Chain.run

    def failing(self, k, graph, args):
        calls["n"] += 1
        if calls["n"] == 7:  # inside the second forward
            raise RuntimeError("injected")
        return run(self, k, graph, args)

    monkeypatch.setattr(block_chain.Chain, "run", failing)
    model.compile_repeated_blocks(backend="ditopt", options=NEVER)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = wan_loop(model)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    said = [str(w.message) for w in caught if "injected" in str(w.message)]
    assert len(said) == 1 and "the block chain" in said[0]
    assert any("injected" in f for f in ditopt.stats(model)["fallbacks"])


def test_compute_first_and_last_bound_the_chained_spans():
    """The method's compute_first / compute_last hold across block graphs: those blocks always compute, and the
    span between them is skipped exactly."""
    options = {**FORCED, "adacache": {**FORCED["adacache"], "compute_first": 2, "compute_last": 1}}
    model = compile_blocks(ConventionDiT(depth=5), options)
    got = convention_loop(model)
    assert chain_stats(model)["spans"] == [[2, 3]]
    decisions = [g["adacache"]["decisions"] for g in ditopt.stats(model)["generations"]]
    assert "S" in decisions[-1]
    eager = ConventionDiT(depth=5)
    eager.load_state_dict(model.state_dict())
    want = replay_with_spans(eager, eager.blocks, convention_loop, decisions, [[2, 3]])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
