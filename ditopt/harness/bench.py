"""Side-by-side measurements of compiled configurations on one model, in one process.

For every configuration: wall time of a whole sampling loop after warm-up
(ratio against full-compute Inductor), compile time (first loop minus a
steady one), FLOPs per generation (FlopCounterMode over an eagerly lowered
run, which makes the same decisions), fidelity (PSNR of the final sample
against full compute), peak memory of the timed generations where the device reports it (CUDA).
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
import textwrap
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from .metrics import psnr, ssim

PRESET_CONFIGS = ("lossless", "quality", "balanced", "fast")
# Single methods by name, on top of full compute.
METHOD_CONFIGS = {
    # AsymRnR's defaults reduce nothing in the high-noise start (max_noise 0.8), as the reference's schedules.
    "asymrnr": {"preset": "lossless", "asymrnr": {"q_ratio": 0.5, "kv_ratio": 0.3}},
    "asymrnr-adaptive": {"preset": "lossless", "asymrnr": {"schedule": "adaptive", "q_ratio": 0.75, "kv_ratio": 0.5}},
    "toca": {"preset": "lossless", "toca": {"interval": 3, "ratio": 0.1}},
    **{f"toca-{ref}": {"preset": "lossless", "toca": {"reference": ref}} for ref in ("dit", "pixart", "opensora")},
}
# diffusers' caches the bench compares with: name -> its config class in diffusers
PEER_CONFIGS = {"fbcache": "FirstBlockCacheConfig", "pab": "PyramidAttentionBroadcastConfig",
                "fastercache": "FasterCacheConfig", "taylorseer": "TaylorSeerCacheConfig", "magcache": "MagCacheConfig",
                "seacache": "SeaCacheConfig", "textkvcache": "TextKVCacheConfig"}
# cache-dit's DBCache with its TaylorSeer calibrator (the cache engine SGLang and vLLM-omni ship), on the bare
# transformer through its BlockAdapter. Its own defaults, but Fn (8) clipped to leave a block to cache.
CACHE_DIT = "dbcache"
DBCACHE_DEFAULTS = {"Fn_compute_blocks": 8, "Bn_compute_blocks": 0, "residual_diff_threshold": 0.08,
                    "max_warmup_steps": 8, "taylorseer_order": 1}
DBCACHE_EXTRA_KEYS = ("taylorseer_order",)  # 0: no calibrator; else TaylorSeer of that order
PEERS = (*PEER_CONFIGS, CACHE_DIT)
SMALL_SECONDS = 0.5  # a generation shorter than this is timed with a warning


@dataclass
class Result:
    config: str
    how: str  # how it was run (lowering, or the peer's hooks)
    seconds_per_generation: float  # the fastest timed generation
    speedup_vs_inductor: float | None
    speedup_vs_eager: float | None
    compile_seconds: float
    gflops_per_generation: float | None
    flop_ratio: float | None
    psnr_db: float | None
    ssim: float | None
    blocks_skipped_fraction: float | None
    peak_memory_mb: float | None
    attention_gflops: float | None = None  # FLOPs in attention cores, per generation
    matching_gflops: float | None = None  # AsymRnR's matching (counted apart: FlopCounterMode sees its reference)
    video_attention_fraction: float | None = None  # video-video attention pairs left by AsymRnR
    toca_computed_fraction: float | None = None  # rows ToCa's sites computed, of all their rows
    seconds_median: float | None = None  # over the timed generations
    seconds_max: float | None = None
    psnr_per_seed: list | None = None  # psnr_db is the worst of these (the timed seed first)


def config_names() -> list[str]:
    """Every configuration name the bench knows, besides `ditopt:<options as JSON>`."""
    return ["eager", "inductor", *PRESET_CONFIGS, *METHOD_CONFIGS, *PEERS]


def check_configs(names: list[str]) -> None:
    """Refuse an unknown name, or ditopt options that do not validate, before any work starts."""
    import ditopt

    for name in names:
        if name.startswith("ditopt:"):
            try:
                ditopt.Config.from_options(json.loads(name[len("ditopt:"):]))
            except (json.JSONDecodeError, ValueError) as err:
                raise ValueError(f"ditopt bench: configuration {name!r}: {err}") from None
        elif (peer := peer_of(name)) is not None:
            _check_peer_settings(*peer)
        elif name not in config_names():
            raise ValueError(f"ditopt bench: unknown configuration {name!r}; use one of {', '.join(config_names())}, "
                             "ditopt:<options as JSON>, or <peer>[@inductor]:<its settings as JSON>")


def compile_config(model: torch.nn.Module, name: str, lowering: str = "inductor"):
    """The callable a configuration name stands for: 'eager', 'inductor', a ditopt preset, or 'ditopt:<json>'."""
    if name == "eager":
        return model
    if name == "inductor":
        return model if lowering == "eager" else torch.compile(model, backend="inductor")
    if name in PRESET_CONFIGS:
        options = {"preset": name, "lowering": lowering}
    elif name in METHOD_CONFIGS:
        options = {**METHOD_CONFIGS[name], "lowering": lowering}
    elif name.startswith("ditopt:"):
        options = {**json.loads(name[len("ditopt:"):]), "lowering": lowering}
    else:
        raise ValueError(f"unknown configuration {name!r}: use eager, inductor, {', '.join(PRESET_CONFIGS)}, "
                         f"{', '.join(METHOD_CONFIGS)}, "
                         f"ditopt:<options as JSON>, or a diffusers peer: {', '.join(PEERS)}")
    return torch.compile(model, backend="ditopt", options=options)


class _Clock:
    """The sampler's current timestep, for hooks that ask for it (FasterCache)."""

    t = 1000.0


COMPILED_PEER = "@inductor"  # 'seacache@inductor': the peer's hooks around blocks compiled with Inductor


def peer_of(name: str) -> tuple[str, dict] | None:
    """(peer, settings) for a diffusers cache's configuration name, 'fbcache' or 'fbcache:{"threshold": 0.3}'
    (JSON settings passed to its config over the bench's), either with '@inductor' after the peer's name
    (`peer_compiled`); None for any other name."""
    peer, _, settings = name.partition(":")
    peer, at, how = peer.partition("@")
    if peer not in PEERS:
        return None
    if at and at + how != COMPILED_PEER:
        raise ValueError(f"ditopt bench: configuration {name!r}: a peer runs eagerly ({peer}) or with its blocks "
                         f"compiled ({peer}{COMPILED_PEER}); {at + how!r} is neither")
    try:
        extra = json.loads(settings) if settings else {}
    except json.JSONDecodeError as err:
        raise ValueError(f"ditopt bench: configuration {name!r}: its settings are not JSON ({err})") from None
    if not isinstance(extra, dict):
        raise ValueError(f"ditopt bench: configuration {name!r}: settings must be a JSON object")
    return peer, extra


def _check_peer_settings(peer: str, settings: dict) -> None:
    import inspect

    import diffusers

    if peer == CACHE_DIT:
        valid = set(_dbcache_fields()) | set(DBCACHE_EXTRA_KEYS)
        unknown = sorted(set(settings) - valid)
        if unknown:
            raise ValueError(f"ditopt bench: {peer} settings {unknown} are not cache-dit DBCacheConfig fields or "
                             f"{list(DBCACHE_EXTRA_KEYS)}; valid: {sorted(valid)}")
        return
    config = PEER_CONFIGS[peer]
    valid = set(inspect.signature(getattr(diffusers, config)).parameters)
    unknown = sorted(set(settings) - valid)
    if unknown:
        raise ValueError(f"ditopt bench: {peer} settings {unknown} are not {config} arguments; valid: {sorted(valid)}")


def peer_config(name: str, clock: _Clock = _Clock(), cfg_batched: bool = False, mag_ratios: list[float] | None = None,
                settings: dict | None = None):
    """diffusers' own cache for a peer name, with the settings its docs give for video models, then
    `settings` (keyword arguments of its config) over them.

    `cfg_batched`: the sampler batches the unconditional and conditional inputs into one call (by
    keyword, unconditional half first), so FasterCache may also skip the unconditional half.
    `mag_ratios`: MagCache's calibration for this model and sampler (`magcache_ratios`).
    """
    import diffusers

    if name == "fbcache":
        # 0.05 (the default) never skips on the fixture, whose per-step changes are larger
        kwargs = dict(threshold=0.2)
    elif name == "pab":
        kwargs = dict(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(100, 800),
            current_timestep_callback=lambda: clock.t)
    elif name == "fastercache":
        # diffusers' documented video settings (its CogVideoX example); the model's output is [B, C, F, H, W]
        kwargs = dict(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 681),
            attention_weight_callback=lambda _: 0.3, unconditional_batch_skip_range=5,
            unconditional_batch_timestep_skip_range=(-1, 781), tensor_format="BCFHW",
            is_guidance_distilled=not cfg_batched, current_timestep_callback=lambda: clock.t)
    elif name == "taylorseer":
        # without identifiers TaylorSeer hooks no module at all: predict whole blocks
        kwargs = dict(
            cache_interval=5, disable_cache_before_step=3, max_order=1, taylor_factors_dtype=torch.float32,
            cache_identifiers=[r"(blocks|transformer_blocks)\.\d+"])
    elif name == "magcache":
        if mag_ratios is None:
            raise ValueError("MagCache needs this model's mag_ratios: calibrate them with bench.magcache_ratios")
        kwargs = dict(mag_ratios=mag_ratios, num_inference_steps=len(mag_ratios))
    elif name in PEER_CONFIGS:
        kwargs = {}  # SeaCache's defaults (threshold 0.25, linear residual prediction); TextKVCache has none
    else:
        raise ValueError(f"unknown peer {name!r}; choose one of {list(PEERS)}")
    try:
        return getattr(diffusers, PEER_CONFIGS[name])(**{**kwargs, **(settings or {})})
    except TypeError as err:
        raise ValueError(f"ditopt bench: {name} settings {settings}: {err}") from None


def _dbcache_fields() -> list[str]:
    import dataclasses

    try:
        import cache_dit
    except ImportError:
        raise ValueError(f"ditopt bench: the {CACHE_DIT} peer is cache-dit's: pip install cache-dit") from None

    return [f.name for f in dataclasses.fields(cache_dit.DBCacheConfig)]


# the block forward contracts cache-dit must be told for a bare transformer (its ForwardPattern names)
DBCACHE_PATTERNS = {"WanTransformerBlock": "Pattern_2", "CogVideoXBlock": "Pattern_0"}


def enable_dbcache(model: torch.nn.Module, settings: dict | None = None,
                   cfg_batched: bool = True) -> tuple[Callable[[], None], Callable[[], None]]:
    """cache-dit's DBCache (+ TaylorSeer) on `model`'s blocks, with `settings` over DBCACHE_DEFAULTS (CFG's
    halves as separate calls unless `cfg_batched`); returns (refresh: a fresh cache context, to call before
    each generation; disable)."""
    import copy
    import logging

    import cache_dit

    logging.getLogger("CACHE_DIT").setLevel(logging.ERROR)  # it logs every context at INFO
    names = getattr(model, "_repeated_blocks", None) or []
    lists = [m for m in model.children() if isinstance(m, torch.nn.ModuleList) and len(m)
             and type(m[0]).__name__ in names]
    if not lists or type(lists[0][0]).__name__ not in DBCACHE_PATTERNS:
        raise ValueError(f"cache-dit needs the forward pattern of {type(model).__name__}'s blocks; the bench knows "
                         f"{sorted(DBCACHE_PATTERNS)}")
    blocks = lists[0]
    given = dict(settings or {})
    merged = {**DBCACHE_DEFAULTS, "enable_separate_cfg": not cfg_batched, **given}
    if "Fn_compute_blocks" not in given:
        merged["Fn_compute_blocks"] = min(merged["Fn_compute_blocks"], len(blocks) - 1)
    order = merged.pop("taylorseer_order")
    cache = cache_dit.DBCacheConfig(**merged)
    calibrator = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=order) if order else None
    adapter = cache_dit.BlockAdapter(transformer=model, blocks=blocks,
                                     forward_pattern=getattr(cache_dit.ForwardPattern,
                                                             DBCACHE_PATTERNS[type(blocks[0]).__name__]))
    cache_dit.enable_cache(adapter, cache_config=copy.deepcopy(cache), calibrator_config=copy.deepcopy(calibrator))

    def refresh():
        kwargs = {"cache_config": copy.deepcopy(cache)}
        if calibrator is not None:
            kwargs["calibrator_config"] = copy.deepcopy(calibrator)
        cache_dit.refresh_context(model, **kwargs)

    return refresh, lambda: cache_dit.disable_cache(model)


@contextlib.contextmanager
def peer_enabled(model: torch.nn.Module, peer: str, settings: dict | None = None, cfg_batched: bool = True,
                 mag_ratios: list[float] | None = None):
    """A peer's hooks on `model` inside the block; yields what to call before each generation: cache-dit's
    context refresh, or the reset of diffusers' cache state that a pipeline makes at the end of each call
    (`maybe_free_model_hooks`; without it SeaCache reads the next generation's first step as a jump)."""
    if peer == CACHE_DIT:
        refresh, disable = enable_dbcache(model, settings, cfg_batched)
    else:
        model.enable_cache(peer_config(peer, CLOCK, cfg_batched, mag_ratios, settings))
        refresh, disable = model._reset_stateful_cache, model.disable_cache
    try:
        yield refresh
    finally:
        disable()


def peer_compiled(name: str) -> bool:
    """Whether a peer configuration runs its hooks around blocks compiled with Inductor ('fbcache@inductor')."""
    return name.partition(":")[0].endswith(COMPILED_PEER)


def compile_blocks(model: torch.nn.Module) -> Callable[[], None]:
    """Compile each repeated block's forward with Inductor, below any hook diffusers adds later, so that
    a cache's Python decisions run eagerly around compiled blocks (regional compilation, as
    `ModelMixin.compile_repeated_blocks` does, which would trace the hooks too). Returns the undo."""
    names = getattr(model, "_repeated_blocks", None) or []
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"{type(model).__name__} names no _repeated_blocks: there is no block to compile "
                         "under the peer's hooks")
    for block in blocks:
        block.forward = torch.compile(block.forward, backend="inductor")

    def undo():
        for block in blocks:
            del block.forward

    return undo


def magcache_ratios(model: torch.nn.Module, generate: Callable) -> list[float]:
    """MagCache's per-step residual magnitude ratios for this model and sampler, from one full-compute
    generation in diffusers' calibration mode (which prints them, its documented interface)."""
    import io
    import re

    import diffusers

    calls = [0]
    counter = model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        generate(model)  # how many model calls one generation makes: MagCache's step count
    finally:
        counter.remove()
    model.enable_cache(diffusers.MagCacheConfig(calibrate=True, num_inference_steps=calls[0]))
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            generate(model)
    finally:
        model.disable_cache()
    found = re.findall(r"\[MagCache\] Calibration Complete.*?\n(\[[^\]]*\])", printed.getvalue(), re.S)
    if not found:
        raise RuntimeError("MagCache's calibration printed no ratios: does the model call its blocks "
                           f"as diffusers expects? Output was: {printed.getvalue()[:200]!r}")
    return [float(x) for x in found[-1].strip("[]").split(",")]


CLOCK = _Clock()


def _prepare(model: torch.nn.Module, name: str, lowering: str = "inductor", cfg_batched: bool = False,
             mag_ratios: list[float] | None = None):
    """(callable, how it runs, cleanup, what to do before each generation) for a configuration name."""
    peer = peer_of(name)
    if peer is not None:
        # compiled blocks first, so that the hooks wrap them (FLOPs are counted with the eager lowering)
        uncompile = compile_blocks(model) if peer_compiled(name) and lowering != "eager" else (lambda: None)
        hooks = contextlib.ExitStack()
        try:
            refresh = hooks.enter_context(peer_enabled(model, peer[0], peer[1], cfg_batched, mag_ratios))
        except Exception:
            uncompile()
            raise

        def cleanup():
            hooks.close()
            uncompile()

        library = "cache-dit" if peer[0] == CACHE_DIT else "diffusers"
        how = f"{'inductor blocks' if peer_compiled(name) else 'eager'} + {library} hooks"
        return model, how, cleanup, refresh
    fn = compile_config(model, name, lowering)
    how = "eager" if fn is model else ("inductor" if name == "inductor" else f"ditopt ({lowering})")
    return fn, how, lambda: None, lambda: None


def measure(
    model: torch.nn.Module,
    generate: Callable[[Callable], torch.Tensor],
    configs: list[str],
    repeats: int = 2,
    flops: bool = True,
    cfg_batched: bool = False,
    lowering: str = "inductor",
    other_seeds: list[Callable[[Callable], torch.Tensor]] = (),
) -> list[Result]:
    """Run `generate(fn)` (one whole sampling loop that calls fn) for each configuration and compare.

    Speed is compared with full compute under Inductor and eagerly. diffusers' peers run as hooks in
    eager mode, their documented use, or ('<peer>@inductor') around blocks compiled with Inductor
    (`compile_blocks`: a whole-model torch.compile would trace the hooks' Python decisions). Fidelity and FLOPs are compared with full compute.  `generate` should set
    `CLOCK.t` to the current timestep before each step (FasterCache and PAB read it);
    `cfg_batched` says that it batches CFG's two halves into one call (see `peer_config`).  A peer that
    does not apply to the model (no diffusers cache support, or its hooks fail) is left out with a warning.
    `lowering` is how the timed ditopt configurations are lowered ("eager" times the runtime's logic alone).
    `other_seeds`: more sampling loops (other seeds or prompts), run once each after the timed ones; the
    fidelity figures are then the worst over all of them.
    """
    from tqdm import tqdm

    check_configs(configs)
    reference_outs, reference_flops = None, None
    results, raw = [], []
    progress = tqdm(configs, desc="ditopt bench", unit="config")
    for name in progress:
        progress.set_postfix_str(name)
        try:
            peer = peer_of(name)
            ratios = magcache_ratios(model, generate) if peer is not None and peer[0] == "magcache" else None
            how, first, times, outs, peak_mb, seen = _timed_generations(model, name, [generate, *other_seeds],
                                                                        repeats, cfg_batched, ratios, lowering)
        except Exception as err:
            if peer is None:
                raise
            warnings.warn(f"ditopt bench: diffusers' {name} does not apply to {type(model).__name__} and is left "
                          f"out ({type(err).__name__}: {err})", stacklevel=2)
            continue
        ours = name not in ("eager", "inductor") and peer is None
        skipped = _skipped_fraction(model) if ours else None
        asym = _asymrnr_figures(model, seen) if ours else None
        toca = _toca_fraction(model, seen) if ours else None
        steady = min(times)
        if steady < SMALL_SECONDS:
            warnings.warn(f"ditopt bench: {name} takes {steady * 1e3:.0f} ms per generation, too little for its "
                          "time to mean anything (per-call overheads and noise dominate); use a larger --size, "
                          "--batch or --steps for speed figures (the FLOP ratios stay exact)", stacklevel=2)
        if name in ("eager", "inductor") and reference_outs is None:
            reference_outs = outs
        psnrs = None if reference_outs is None else [round(psnr(o, r), 2) for o, r in zip(outs, reference_outs)]
        gflops, attention = (x / 1e9 for x in count_generation_flops(model, name, generate, cfg_batched, ratios)) if flops else (None, None)
        if gflops is not None and name in ("eager", "inductor") and reference_flops is None:
            reference_flops = gflops
        results.append(Result(
            config=name, how=how,
            seconds_per_generation=round(steady, 4), speedup_vs_inductor=None, speedup_vs_eager=None,
            compile_seconds=round(max(0.0, first - steady), 2),
            gflops_per_generation=round(gflops, 3) if gflops is not None else None, flop_ratio=None,
            psnr_db=None if psnrs is None else min(psnrs),
            ssim=None if reference_outs is None else round(min(ssim(o, r) for o, r in zip(outs, reference_outs)), 4),
            blocks_skipped_fraction=None if skipped is None else round(skipped, 4),
            peak_memory_mb=peak_mb,
            attention_gflops=None if attention is None else round(attention, 3),
            matching_gflops=asym and round(asym[0], 4), video_attention_fraction=asym and asym[1],
            toca_computed_fraction=toca,
            seconds_median=round(statistics.median(times), 4), seconds_max=round(max(times), 4),
            psnr_per_seed=psnrs,
        ))
        raw.append((name, steady, gflops))
    times = {name: steady for name, steady, _ in raw}
    for r, (name, steady, gflops) in zip(results, raw):
        if "inductor" in times:
            r.speedup_vs_inductor = round(times["inductor"] / steady, 3)
        if "eager" in times:
            r.speedup_vs_eager = round(times["eager"] / steady, 3)
        if reference_flops and gflops is not None:
            r.flop_ratio = round(gflops / reference_flops, 4)
    return results


def _timed_generations(model, name: str, generates: list[Callable], repeats: int, cfg_batched: bool,
                       mag_ratios: list[float] | None, lowering: str = "inductor"):
    """Warm up (compiling), then time `repeats` generations of the first loop, then run each other loop once:
    (how, first seconds, timed seconds, the last output of each loop, peak memory of the timed generations,
    ditopt generations recorded before the last timed one)."""
    import ditopt

    torch._dynamo.reset()
    ditopt.reset(model)
    generate = generates[0]
    fn, how, cleanup, refresh = _prepare(model, name, lowering, cfg_batched=cfg_batched, mag_ratios=mag_ratios)
    try:
        start = time.perf_counter()
        out = generate(fn)
        first = time.perf_counter() - start
        times = []
        _reset_peak_memory()
        for _ in range(repeats):
            ditopt.reset(model)
            refresh()
            seen = len(ditopt.stats(model)["generations"])
            start = time.perf_counter()
            out = generate(fn)
            times.append(time.perf_counter() - start)
        peak = _peak_memory_mb()  # not compiling, not counting FLOPs
        stats_seen = len(ditopt.stats(model)["generations"])
        outs = [out]
        for other in generates[1:]:
            ditopt.reset(model)
            refresh()
            outs.append(other(fn))
        return how, first, times, outs, peak, slice(seen, stats_seen)
    finally:
        cleanup()


def count_generation_flops(model: torch.nn.Module, name: str, generate: Callable, cfg_batched: bool = False,
                           mag_ratios: list[float] | None = None) -> tuple[int, int]:
    """FLOPs of one generation under a configuration: (total, of which in attention cores).

    Full compute and diffusers' peers run eagerly under FlopCounterMode. ditopt configurations run
    with the eager lowering (same decisions) and are counted from inside the runtime
    (`ditopt.runtime.count_flops`), since Dynamo bypasses compiled code while a dispatch mode is active.
    MagCache without `mag_ratios` is calibrated here first (`magcache_ratios`).
    """
    import ditopt
    from ditopt.runtime import attention_flops, count_flops

    torch._dynamo.reset()
    ditopt.reset(model)
    peer = peer_of(name)
    if peer is not None and peer[0] == "magcache" and mag_ratios is None:
        mag_ratios = magcache_ratios(model, generate)
    fn, _, cleanup, refresh = _prepare(model, name, "eager", cfg_batched, mag_ratios)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # FlopCounterMode's module hooks make torch.compile warn
            if fn is model:
                refresh()
                counter = FlopCounterMode(display=False)
                with counter:
                    generate(fn)
                return counter.get_total_flops(), attention_flops(counter)
            generate(fn)  # compiles: Dynamo must not see a dispatch mode while it traces
            ditopt.reset(model)
            with count_flops() as tally:
                generate(fn)
            return tally.flops, tally.attention
    finally:
        cleanup()


def _skipped_fraction(model) -> float:
    import ditopt

    gens = ditopt.stats(model)["generations"]
    computed = sum(g["blocks_computed"] for g in gens)
    skipped = sum(g["blocks_skipped"] for g in gens)
    return skipped / (computed + skipped) if computed + skipped else 0.0


def _asymrnr_figures(model, seen: slice) -> tuple[float, float] | None:
    """(matching GFLOPs, video-video attention fraction) of the last run (generations after the first
    `seen`: the last timed one), if AsymRnR ran."""
    import ditopt

    gens = [g for g in ditopt.stats(model)["generations"][seen] if "asymrnr" in g]
    if not gens:
        return None
    pairs = sum(g["asymrnr"]["video_pairs"] for g in gens)
    full = sum(g["asymrnr"]["video_pairs_full"] for g in gens)
    return sum(g["asymrnr"]["matching_gflops"] for g in gens), round(pairs / max(1, full), 4)


def _toca_fraction(model, seen: slice) -> float | None:
    """The fraction of ToCa's site rows computed in the last run, if ToCa ran."""
    import ditopt

    gens = [g["toca"] for g in ditopt.stats(model)["generations"][seen] if "toca" in g]
    if not gens:
        return None
    return round(sum(g["rows_computed"] for g in gens) / max(1, sum(g["rows_total"] for g in gens)), 4)


def _reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_memory_mb() -> float | None:
    """The CUDA allocator's peak since the last reset.  None on the CPU: its allocator keeps no peak, and
    the process's resident high-water mark mostly measures what earlier configurations left behind."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return None


def euler_loop(model_inputs: dict, steps: int, latent_key: str, call: Callable) -> Callable[[Callable], torch.Tensor]:
    """A plain Euler sampling loop over a zoo model (random weights: for timing and FLOPs, not quality)."""

    def generate(fn):
        x = model_inputs[latent_key].clone()
        batch = x.shape[0]
        with torch.no_grad():
            for step, t in enumerate(torch.linspace(999, 0, steps)):
                CLOCK.t = float(t)
                inputs = {**model_inputs, latent_key: x, "timestep": t.expand(batch).to(x.device)}
                context = getattr(fn, "cache_context", None)  # as pipelines do, for diffusers' cache hooks
                where = dict(step_index=step, num_inference_steps=steps, timestep=float(t), sigma=float(t) / 1000)
                with context("denoise", **where) if context is not None else contextlib.nullcontext():
                    out = call(fn, inputs)
                for dim, (a, b) in enumerate(zip(out.shape, x.shape)):
                    if a != b:  # learned-sigma models predict extra channels: keep the first ones
                        out = out.narrow(dim, 0, b)
                x = x - (1.0 / steps) * out
        return x

    return generate


def to_markdown(results: list[Result], title: str) -> str:
    cols = ["config", "how", "seconds_per_generation", "seconds_median", "seconds_max", "speedup_vs_inductor",
            "speedup_vs_eager", "compile_seconds",
            "gflops_per_generation", "flop_ratio", "attention_gflops", "matching_gflops", "video_attention_fraction",
            "toca_computed_fraction", "psnr_db", "ssim", "blocks_skipped_fraction", "peak_memory_mb"]
    lines = [f"### {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        row = asdict(r)
        lines.append("| " + " | ".join("" if row[c] is None else str(row[c]) for c in cols) + " |")
    return "\n".join(lines)


# issue 19's targets for the presets on the fixture: (speed-up vs Inductor, worst-seed PSNR floor), and the factor
# over the fastest peer cache (diffusers' or cache-dit's) at equal or better PSNR
TARGETS = {"quality": (2.0, 35.0), "balanced": (3.0, 30.0), "fast": (4.5, 25.0)}
PEER_FACTOR = 1.3


def targets(results: list[Result]) -> list[str]:
    """One line per preset in `results`: its measured speed-up and worst-seed PSNR against its targets."""
    lines, peers = [], [r for r in results if peer_of(r.config) and r.speedup_vs_inductor is not None]
    for r in results:
        if r.config not in TARGETS or r.speedup_vs_inductor is None or r.psnr_db is None:
            continue
        speed, floor = TARGETS[r.config]
        met = r.speedup_vs_inductor >= speed and r.psnr_db >= floor
        line = (f"{r.config}: {r.speedup_vs_inductor:.2f}x at {r.psnr_db:.2f} dB (target >= {speed}x at >= {floor} dB): "
                + ("met" if met else "not met"))
        rivals = [p for p in peers if p.psnr_db is not None and p.psnr_db >= r.psnr_db]
        if rivals:
            best = max(rivals, key=lambda p: p.speedup_vs_inductor)
            factor = r.speedup_vs_inductor / best.speedup_vs_inductor
            line += (f"; {factor:.2f}x the fastest peer cache at >= {r.psnr_db:.2f} dB ({best.config}, "
                     f"{best.speedup_vs_inductor:.2f}x at {best.psnr_db:.2f} dB; target >= {PEER_FACTOR}x): "
                     + ("met" if factor >= PEER_FACTOR else "not met"))
        elif peers:
            line += f"; no peer cache measured reaches {r.psnr_db:.2f} dB"
        lines.append(line)
    return lines


EXACT_DB = 60.0  # PSNR at or above this (or infinite: identical output) is drawn in the "exact" column


LABEL_CHARS = 40  # longer configuration names are numbered on the plot and listed under it


def plot(results: list[Result], title: str):
    """Speed-up against Inductor over PSNR against full compute, every configuration with a speed-up, as a
    matplotlib figure.  Outputs at or above EXACT_DB (lossless, full compute) share one "exact" column
    at the right, so a 130 dB row does not squeeze the others."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results if r.speedup_vs_inductor is not None and r.psnr_db is not None]
    finite = [r.psnr_db for r in rows if r.psnr_db < EXACT_DB]
    lo = math.floor(min(finite, default=EXACT_DB - 10)) - 1
    exact_x = max(finite, default=lo + 10) + 4
    # a configuration with its settings spelled out (ditopt:{...}) is a numbered point, named under the axes
    long = [r.config for r in rows if len(r.config) > LABEL_CHARS]
    notes = [textwrap.fill(f"[{i}] {name}", 150, subsequent_indent="     ") for i, name in enumerate(long, 1)]
    notes_height = 0.14 * sum(n.count("\n") + 1 for n in notes)  # inches under the axes
    fig, ax = plt.subplots(figsize=(8, 5 + notes_height), dpi=120)
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="Inductor, full compute")
    in_exact = 0
    for r in sorted(rows, key=lambda r: (r.psnr_db, r.speedup_vs_inductor)):
        exact = r.psnr_db >= EXACT_DB
        x = exact_x if exact else r.psnr_db
        ours = r.how.startswith("ditopt")
        ax.scatter([x], [r.speedup_vs_inductor], color="#1f77b4" if ours else "#ff7f0e", zorder=3)
        offset = (6, 10 - 11 * in_exact) if exact else (6, -3)  # right of its point; the exact column: a list
        in_exact += exact
        label = f"[{long.index(r.config) + 1}]" if r.config in long else r.config
        ax.annotate(label, (x, r.speedup_vs_inductor), xytext=offset, textcoords="offset points", fontsize=8)
    ticks = [t for t in ax.get_xticks() if lo <= t < exact_x - 2]
    ax.set_xticks([*ticks, exact_x], [f"{t:g}" for t in ticks] + [f"exact\n(>= {EXACT_DB:g})"])
    ax.set_xlim(lo, exact_x + 3)
    ax.set_ylim(0, max([r.speedup_vs_inductor for r in rows] + [1.0]) * 1.15)
    ax.set_xlabel("PSNR against full compute (dB)")
    ax.set_ylabel("speed-up against Inductor")
    ax.set_title(textwrap.fill(title, 90), fontsize=10)
    ax.scatter([], [], color="#1f77b4", label="ditopt")
    ax.scatter([], [], color="#ff7f0e", label="full compute / peer caches")
    ax.legend(fontsize=8, loc="lower center")
    ax.grid(alpha=0.3)
    if notes:
        fig.text(0.01, 0.01, "\n".join(notes), fontsize=6, va="bottom", family="monospace")
        fig.tight_layout(rect=(0, notes_height / (5 + notes_height) + 0.02, 1, 1))
    else:
        fig.tight_layout()
    return fig


def finite(value):
    """Strict JSON: infinite or NaN numbers (identical outputs' PSNR) become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def write(results: list[Result], out_dir: Path, title: str) -> None:
    """bench.json (strict JSON: null for an infinite PSNR), bench.md (the table) and bench.png (speed-up
    against PSNR) in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = finite([asdict(r) for r in results])
    (out_dir / "bench.json").write_text(json.dumps(rows, indent=2, allow_nan=False))
    (out_dir / "bench.md").write_text(to_markdown(results, title) + "\n")
    plot(results, title).savefig(out_dir / "bench.png")
