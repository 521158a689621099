"""A scale model of real video DiTs: `ditopt plan` (docs/gpu.md, "Plan").

Each real configuration below is written here from its published config.  The model is built on the meta
device (no weights, no memory), called on meta inputs of its real size, and run through ditopt's own
analysis, passes and lowering with a preset.  Per generation it reports:

- FLOPs of full compute and of each preset: FlopCounterMode's exact count per call and per block, summed
  over the steps with the block calls the preset's schedule computes (the schedule is the preset's decisions
  on the trained fixture at the same step count, or one you give);
- the cache memory each method holds at its peak (its tensors' sizes, from the graph's shapes), the weights,
  and whether weights + caches + an activation estimate fit in 80 GB (H100) and 141 GB (H200);
- regions and compiled variants of the lowered graph;
- a roofline prediction of seconds on H100 and H200: GEMMs at max(FLOPs / peak, weight bytes / bandwidth),
  attention at FLOPs / peak, with the peak and bandwidth stated.  A lower bound: real kernels reach a part
  of the peak, which the GPU check measures beside it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import torch

# bf16 dense tensor-core peak and HBM bandwidth (NVIDIA's H100 SXM and H200 SXM data sheets)
GPUS = {"H100": {"bf16_tflops": 989.4, "hbm_tb_s": 3.35, "memory_gb": 80},
        "H200": {"bf16_tflops": 989.4, "hbm_tb_s": 4.8, "memory_gb": 141}}
PRESETS = ("lossless", "quality", "balanced", "fast")


@dataclass(frozen=True)
class RealModel:
    """A published configuration and the size of one denoising call."""

    family: str  # diffusers class
    config: dict
    inputs: Callable[[], dict]  # meta inputs of one call, by keyword
    steps: int
    note: str


def _meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, device="meta", dtype=dtype)


def _wan_inputs(frames: int, height: int, width: int, text: int = 512, batch: int = 2):
    latent = (batch, 16, (frames - 1) // 4 + 1, height // 8, width // 8)
    return lambda: dict(hidden_states=_meta(*latent), timestep=_meta(batch, dtype=torch.float32),
                        encoder_hidden_states=_meta(batch, text, 4096), return_dict=False)


WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
WAN_14B = {**WAN_1_3B, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40}
HUNYUAN = dict(in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
               num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1,
               qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768,
               rope_theta=256.0, rope_axes_dim=(16, 56, 56))
COGVIDEOX_5B = dict(num_attention_heads=48, attention_head_dim=64, in_channels=16, out_channels=16,
                    time_embed_dim=512, text_embed_dim=4096, num_layers=42, sample_width=90, sample_height=60,
                    sample_frames=49, patch_size=2, max_text_seq_length=226, use_rotary_positional_embeddings=True,
                    use_learned_positional_embeddings=False)
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))


def _hunyuan_inputs():
    latent = (1, 16, 33, 90, 160)  # 129 frames at 720 x 1280
    return dict(hidden_states=_meta(*latent), timestep=_meta(1, dtype=torch.float32),
                encoder_hidden_states=_meta(1, 256, 4096), encoder_attention_mask=torch.ones(1, 256, device="meta"),
                pooled_projections=_meta(1, 768), guidance=_meta(1, dtype=torch.float32) * 0 + 6000.0,
                return_dict=False)


def _cogvideox_inputs():
    return dict(hidden_states=_meta(2, 13, 16, 60, 90), encoder_hidden_states=_meta(2, 226, 4096),
                timestep=torch.ones(2, device="meta", dtype=torch.long),
                image_rotary_emb=None, return_dict=False)


def _flux_inputs():
    tokens = (1024 // 16) ** 2  # 1024 x 1024: 128 x 128 latent, packed 2 x 2
    return dict(hidden_states=_meta(1, tokens, 64), encoder_hidden_states=_meta(1, 512, 4096),
                pooled_projections=_meta(1, 768), timestep=_meta(1, dtype=torch.float32),
                img_ids=_meta(tokens, 3, dtype=torch.float32), txt_ids=_meta(512, 3, dtype=torch.float32),
                guidance=_meta(1, dtype=torch.float32), return_dict=False)


MODELS = {
    "wan2.1-1.3b-480p": RealModel("WanTransformer3DModel", WAN_1_3B, _wan_inputs(81, 480, 832), 50,
                                  "81 frames at 480 x 832, CFG batched (batch 2), 512 text tokens"),
    "wan2.1-14b-720p": RealModel("WanTransformer3DModel", WAN_14B, _wan_inputs(81, 720, 1280), 50,
                                 "81 frames at 720 x 1280, CFG batched (batch 2), 512 text tokens"),
    "hunyuanvideo-720p": RealModel("HunyuanVideoTransformer3DModel", HUNYUAN, _hunyuan_inputs, 50,
                                   "129 frames at 720 x 1280, guidance-distilled (batch 1), 256 text tokens"),
    "cogvideox-5b": RealModel("CogVideoXTransformer3DModel", COGVIDEOX_5B, _cogvideox_inputs, 50,
                              "49 frames at 480 x 720, CFG batched (batch 2), 226 text tokens"),
    "flux.1-dev-1024": RealModel("FluxTransformer2DModel", FLUX_DEV, _flux_inputs, 28,
                                 "1024 x 1024, guidance-distilled (batch 1), 512 text tokens"),
}


@dataclass
class CallCount:
    total: int
    attention: int
    per_block: list[tuple[int, int]]  # (total, attention) FLOPs of each block call, in block order
    weight_bytes: int
    largest_activation_bytes: int


@dataclass
class Plan:
    model: str
    note: str
    steps: int
    call: CallCount
    blocks: list[str]
    regions: int
    compiled_variants: int
    spans: list[list[int]]  # AdaCache's skippable spans (block indices)
    presets: dict[str, dict] = field(default_factory=dict)


def build(name: str) -> tuple[torch.nn.Module, dict]:
    """The real model `name` on the meta device, in bf16, and meta inputs of one call."""
    import diffusers

    spec = MODELS[name]
    with torch.device("meta"):
        model = getattr(diffusers, spec.family)(**spec.config).to(torch.bfloat16).eval()
    return model, spec.inputs()


def count_call(model: torch.nn.Module, inputs: dict, block_paths: list[str]) -> CallCount:
    """FlopCounterMode's counts for one call: in total, in attention (the batched matmuls of attention, which
    the meta device decomposes SDPA into), and per block."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        out = model(**inputs)
    counts = counter.get_flop_counts()
    root = type(model).__name__

    def split(key: str) -> tuple[int, int]:
        ops = counts.get(key, {})
        attention = sum(v for op, v in ops.items() if "bmm" in str(op) or "scaled_dot_product" in str(op))
        return sum(ops.values()), attention

    total, attention = split("Global")
    per_block = [split(f"{root}.{p}") for p in block_paths]
    largest = max((t.numel() * t.element_size() for t in _tensors(out)), default=0)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return CallCount(total, attention, per_block, weights, largest)


def largest_activation(lowered) -> int:
    """Bytes of the largest per-token value the regions hand on or compute ([B, N, C]: an FFN's hidden state)."""
    from ditopt.analysis import example

    sizes = [_nbytes(v) for r in lowered.regions for n in r.nodes if (v := example(n)) is not None and v.dim() == 3]
    return max(sizes, default=0)


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def analyse(model: torch.nn.Module, inputs: dict, preset: str = "fast"):
    """ditopt's analysis, passes and lowering on the meta model's Dynamo graph: (structure, lowered, report)."""
    from ditopt.config import Config
    from ditopt.lowering import lower
    from ditopt.passes.pipeline import run_pipeline

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=capture)(**inputs)
    torch._dynamo.reset()
    if len(graphs) != 1:
        raise RuntimeError(f"the model traced into {len(graphs)} graphs; the plan needs one")
    gm, structure, reports = run_pipeline(graphs[0], Config.from_options({"preset": preset}))
    return structure, lower(gm, structure), reports


@functools.lru_cache(maxsize=None)
def fixture_decisions(preset: str, steps: int) -> str:
    """The preset's decisions (C computed, S skipped, per step) on the trained fixture at `steps` steps,
    prompts 8-11, seed 4 (the split that chose nothing)."""
    import ditopt
    from ditopt.harness import fixture

    if preset == "lossless":
        return "C" * steps
    model = fixture.load_fixture()
    torch._dynamo.reset()
    fn = torch.compile(model, backend="ditopt", options={"preset": preset, "lowering": "eager"})
    fixture.sample(fn, list(fixture.PROMPTS[8:12]), seed=4, steps=steps)
    decisions = ditopt.stats(model)["generations"][-1]["adacache"]["decisions"]
    torch._dynamo.reset()
    return decisions


def preset_cost(call: CallCount, spans: list[list[int]], decisions: str) -> tuple[int, int]:
    """(FLOPs, attention FLOPs) of a generation whose spans skip at the steps `decisions` marks S."""
    skippable = {b for span in spans for b in span}
    flops = attention = 0
    for d in decisions:
        skipped = skippable if d == "S" else set()
        flops += call.total - sum(call.per_block[b][0] for b in skipped)
        attention += call.attention - sum(call.per_block[b][1] for b in skipped)
    return flops, attention


def cache_bytes(lowered, spans: list[list[int]], forecast: int, adacache: bool) -> dict[str, int]:
    """Peak bytes each method holds for one stream: the invariant region's outputs, and per AdaCache span
    (forecast + 1) residuals of its outputs."""
    from ditopt.analysis import example

    held = {"invariants": 0, "adacache": 0}
    for r in lowered.regions:
        if r.owner is not None and r.owner.own_region == "invariants":
            held["invariants"] += sum(_nbytes(example(n)) for n in r.outputs)
    if adacache:
        by_block = {r.block: r for r in lowered.regions if r.block is not None}
        for span in spans:
            last = by_block.get(span[-1])
            out = max((_nbytes(example(n)) for n in last.outputs), default=0) if last is not None else 0
            held["adacache"] += (forecast + 1) * out
    return held


def _nbytes(value) -> int:
    return value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 0


def roofline_seconds(flops: int, attention: int, weight_bytes: int, calls: int, gpu: str) -> dict:
    spec = GPUS[gpu]
    peak, bandwidth = spec["bf16_tflops"] * 1e12, spec["hbm_tb_s"] * 1e12
    gemm = max((flops - attention) / peak, calls * weight_bytes / bandwidth)
    attn = attention / peak
    return {"gemm_s": round(gemm, 2), "attention_s": round(attn, 2), "total_s": round(gemm + attn, 2)}


def plan(name: str, presets=PRESETS, decisions: dict[str, str] | None = None,
         max_cache_mb: float | None = None) -> Plan:
    """The scale model of `name` (a key of MODELS): see the module docstring."""
    from ditopt.lowering import graph_key
    from ditopt.passes.skipping import guarded_spans

    spec = MODELS[name]
    model, inputs = build(name)
    structure, lowered, _ = analyse(model, inputs)
    paths = [b.path for b in structure.blocks]
    call = count_call(model, inputs, paths)
    call.largest_activation_bytes = largest_activation(lowered)
    spans = [list(s.blocks) for s in guarded_spans(lowered, "adacache")]
    variants = len({graph_key(r.gm) for r in lowered.regions})
    result = Plan(name, spec.note, spec.steps, call, paths, len(lowered.regions), variants, spans)
    # a working-set estimate: a few of the largest per-token activations (an FFN's hidden state) alive at once;
    # attention itself is taken as fused (flash), its score matrix never stored
    activations = 3 * call.largest_activation_bytes
    for preset in presets:
        from ditopt.config import preset_config

        cfg = preset_config(preset)
        forecast = cfg.adacache.forecast if cfg.adacache.enabled else 0
        chosen = (decisions or {}).get(preset) or fixture_decisions(preset, spec.steps)
        flops, attention = preset_cost(call, spans, chosen)
        kept_spans, keep_invariants, shed = list(spans), True, []

        def held_now() -> dict[str, int]:
            held = cache_bytes(lowered, kept_spans, forecast, cfg.adacache.enabled)
            return held if keep_invariants else {**held, "invariants": 0}

        held = held_now()
        # what the runtime's max_cache_mb does: the method holding most gives something up, until under it
        while max_cache_mb is not None and sum(held.values()) > max_cache_mb * 2**20:
            if held["adacache"] >= held["invariants"] and forecast > 0:
                forecast -= 1
                shed.append(f"adacache: forecast order lowered to {forecast}")
            elif held["adacache"] >= held["invariants"] and kept_spans:
                kept_spans = kept_spans[:-1]
                shed.append(f"adacache: {len(kept_spans)} of {len(spans)} spans keep a residual")
            elif keep_invariants and held["invariants"]:
                keep_invariants = False
                shed.append("invariants: recomputed at every step")
            else:
                break
            held = held_now()
        if kept_spans != spans:
            flops, attention = preset_cost(call, kept_spans, chosen)
        total_gb = (call.weight_bytes + sum(held.values()) + activations) / 1e9
        result.presets[preset] = {
            "decisions": chosen, "flops": flops, "attention_flops": attention,
            "flop_ratio": round(flops / (call.total * len(chosen)), 4),
            "cache_mb": {k: round(v / 2**20, 1) for k, v in held.items()}, "shed": shed,
            "memory_gb": round(total_gb, 1), "fits": {g: total_gb <= s["memory_gb"] for g, s in GPUS.items()},
            "seconds": {g: roofline_seconds(flops, attention, call.weight_bytes, len(chosen), g) for g in GPUS},
        }
    return result


def to_markdown(p: Plan) -> str:
    c = p.call
    lines = [f"## {p.model}: {p.note}, {p.steps} steps", "",
             f"- per call: {c.total / 1e12:.1f} TFLOP ({c.attention / 1e12:.1f} in attention), weights "
             f"{c.weight_bytes / 1e9:.2f} GB (bf16), {len(p.blocks)} blocks, {p.regions} regions, "
             f"{p.compiled_variants} compiled variants, AdaCache spans {[f'{s[0]}-{s[-1]}' for s in p.spans]}",
             f"- peaks: H100 {GPUS['H100']['bf16_tflops']} TFLOPS bf16 dense, {GPUS['H100']['hbm_tb_s']} TB/s; "
             f"H200 {GPUS['H200']['bf16_tflops']} TFLOPS, {GPUS['H200']['hbm_tb_s']} TB/s", "",
             "| preset | PFLOP / generation | FLOP ratio | cache MB (per method) | memory GB | fits 80 / 141 GB "
             "| H100 s (GEMM + attention) | H200 s |", "|---|---|---|---|---|---|---|---|"]
    for name, r in p.presets.items():
        h100, h200 = r["seconds"]["H100"], r["seconds"]["H200"]
        lines.append(f"| {name} | {r['flops'] / 1e15:.1f} | {r['flop_ratio']} | {r['cache_mb']} | {r['memory_gb']} | "
                     f"{'yes' if r['fits']['H100'] else 'no'} / {'yes' if r['fits']['H200'] else 'no'} | "
                     f"{h100['total_s']} ({h100['gemm_s']} + {h100['attention_s']}) | {h200['total_s']} |")
    shed = {n: r["shed"] for n, r in p.presets.items() if r["shed"]}
    if shed:
        lines.append(f"\nshed to keep the cache budget: {shed}")
    return "\n".join(lines)
