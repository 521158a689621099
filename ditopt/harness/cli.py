"""The `ditopt` command line: `ditopt inspect FAMILY`, `ditopt bench ...`, `ditopt tune ...`, `ditopt calibrate`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
import warnings


def _inspect(args) -> int:
    import torch

    from . import models
    from ..analysis import UnsupportedGraph, analyze

    case = models.build(args.family, args.size)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models.call(torch.compile(case.model, backend=capture), case.inputs())
    print(f"{args.family} ({type(case.model).__name__}, size {args.size}): {len(graphs)} graph(s) from Dynamo")
    for i, gm in enumerate(graphs):
        try:
            structure = analyze(gm)
        except UnsupportedGraph as why:
            print(f"graph {i}: not analysed: {why}")
            continue
        print(f"graph {i}:")
        print(json.dumps(structure.to_json(), indent=2) if args.json else structure.describe())
    return 0


FIXTURES = ("fixture", "fixture-deep")  # the trained fixtures: 4 blocks over 8 x 8 tokens, 12 over 16 x 16


def _fixture(name: str):
    """(loader, clip size) of a trained fixture."""
    from . import fixture

    if name == "fixture-deep":
        from .fixture.deep import DEEP_SPEC, load_deep

        return load_deep, DEEP_SPEC
    return fixture.load_fixture, fixture.VideoSpec()


def _sampler(args, prompts: int, prompt_start: int = 0, cfg_batched: bool = True):
    """(model, loop, what) for `--model`: loop(seed) is one whole sampling loop, generate(fn) -> output; the
    fixture samples `prompts` of its prompts from `prompt_start` with CFG, a zoo model an Euler loop over its
    inputs of batch `--batch` (random weights)."""
    from . import bench, models

    if args.model in FIXTURES:
        from . import fixture

        load, spec = _fixture(args.model)
        chosen = list(fixture.PROMPTS[prompt_start: prompt_start + prompts])
        if len(chosen) < prompts:
            raise ValueError(f"ditopt: the fixture has {len(fixture.PROMPTS)} prompts; prompts {prompt_start}.."
                             f"{prompt_start + prompts - 1} (--prompt-start, and --prompts or --batch) run past them")

        def loop(seed):
            return lambda fn: fixture.sample(fn, chosen, seed=seed, steps=args.steps, cfg_batched=cfg_batched,
                                             spec=spec, sampler=args.sampler, shift=args.shift,
                                             on_step=lambda t: setattr(bench.CLOCK, "t", float(t)))
        return load(), loop, f"{args.model}, prompts {prompt_start}..{prompt_start + prompts - 1}"
    case = models.build(args.model, args.size)
    latent = "x" if args.model == "stdit" else "hidden_states"

    def loop(seed):
        return bench.euler_loop(case.inputs(args.batch, seed), args.steps, latent, models.call)
    return case.model, loop, f"{args.model} ({args.size}), batch {args.batch}"


def _bench(args) -> int:
    from pathlib import Path

    import torch

    from . import bench

    bench.check_configs(args.configs)  # before any model is built
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = args.seeds or [args.seed]
    model, loop, _ = _sampler(args, args.batch, args.prompt_start)
    if args.model in FIXTURES:
        title = (f"{args.model} (WanTransformer3DModel), {args.steps} {args.sampler} steps (shift {args.shift:g}), "
                 f"prompts {args.prompt_start}.."
                 f"{args.prompt_start + args.batch - 1} with CFG")
    else:
        title = f"{args.model} ({args.size}), {args.steps} steps, batch {args.batch}"
    title += f", seeds {' '.join(map(str, seeds))}"
    with torch.no_grad():
        results = bench.measure(model, loop(seeds[0]), args.configs, repeats=args.repeats, flops=not args.no_flops,
                                cfg_batched=args.model in FIXTURES, other_seeds=[loop(s) for s in seeds[1:]])
    print(bench.to_markdown(results, title))
    print("peak_memory_mb: the CUDA allocator's peak over the timed generations (empty on the CPU); times and "
          f"FLOPs: seed {seeds[0]}; psnr_db, ssim: the worst over the seeds")
    if args.model in FIXTURES:
        print(f"\nTargets ({title}; wall time against Inductor, full compute):")
        print("\n".join(bench.targets(results)) or "no preset among the configurations")
    if args.out:
        bench.write(results, Path(args.out), title)
    return 0


def _calibrate(args) -> int:
    import torch

    from ditopt.passes import adacache

    model, loop, _ = _sampler(args, args.batch)
    generate = loop(args.seed)
    result = adacache.calibrate(model, generate, args.target)
    codebook = {("inf" if k == float("inf") else k): v for k, v in result["codebook"].items()}
    print(json.dumps({"codebook": codebook, "predicted_speedup": result["predicted_speedup"],
                      "metrics": [round(m, 5) for m in result["metrics"]]}, indent=2))
    return 0


def _tune(args) -> int:
    import time

    from ditopt.tune import METHODS, tune

    metric, budget = ("ssim", args.ssim) if args.ssim is not None else ("psnr", args.psnr)
    model, loop, what = _sampler(args, args.prompts, args.prompt_start, cfg_batched=not args.separate_cfg)

    def sample_fn(fn, seed):
        return loop(seed)(fn)

    start = time.perf_counter()
    result = tune(model, sample_fn, budget, metric=metric, cases=args.seeds, speed=args.speed, margin=args.margin,
                  methods=args.methods or METHODS, out=args.out, plot=args.plot, relative=args.relative)
    chosen = result.chosen.to_dict(result.full_seconds)
    print(json.dumps({"model": what, "steps": args.steps, "seeds": args.seeds, "metric": metric,
                      "budget": result.budget, "met": result.met, "options": result.options,
                      "worst": chosen["worst"], "per_seed": chosen["per_case"], "flop_ratio": chosen["flop_ratio"],
                      "speedup": chosen["speedup"], "candidates": len(result.candidates), "notes": result.notes,
                      "seconds": round(time.perf_counter() - start, 1)}, indent=2))
    if args.out:
        print(f"wrote {args.out}: load it with options={{'config': {args.out!r}}}")
    return 0


def _gpu_check(args) -> int:
    from . import gpu_check

    return gpu_check.main(args.out, device=args.device, size=args.size, steps=args.steps, configs=args.configs,
                          repeats=args.repeats)


def _plan(args) -> int:
    import json

    from . import plan

    names = list(plan.MODELS) if args.model == ["all"] else args.model
    unknown = [n for n in names if n not in plan.MODELS]
    if unknown:
        raise ValueError(f"ditopt plan: unknown model(s) {unknown}; choose from {list(plan.MODELS)} or all")
    decisions = dict(d.split("=", 1) for d in args.decisions or [])
    sections, rows = [], []
    for name in names:
        print(f"ditopt plan: {name} ...", file=sys.stderr, flush=True)
        result = plan.plan(name, presets=args.presets, decisions=decisions, max_cache_mb=args.max_cache_mb)
        sections.append(plan.to_markdown(result))
        print(sections[-1] + "\n", flush=True)
        rows.append({"model": name, "note": result.note, "steps": result.steps, "flops_per_call": result.call.total,
                     "attention_flops_per_call": result.call.attention, "weight_bytes": result.call.weight_bytes,
                     "regions": result.regions, "compiled_variants": result.compiled_variants,
                     "spans": result.spans, "presets": result.presets})
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "plan.md").write_text("# ditopt plan\n\n" + "\n\n".join(sections) + "\n")
        (out / "plan.json").write_text(json.dumps(rows, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    from ditopt import __version__

    from . import bench
    from .models import FAMILIES, SIZES

    parser = argparse.ArgumentParser(prog="ditopt", description="ditopt: a torch.compile backend for video DiTs")
    parser.add_argument("--version", action="version", version=f"ditopt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="print the structure ditopt finds in a model of the zoo")
    p.add_argument("family", choices=FAMILIES)
    p.add_argument("--size", choices=SIZES, default="tiny")
    p.add_argument("--json", action="store_true", help="print the full structure as JSON")
    p.set_defaults(func=_inspect)
    b = sub.add_parser("bench", help="time, FLOPs and fidelity of configurations side by side")
    b.add_argument("--model", default="fixture", choices=(*FIXTURES, *FAMILIES))
    b.add_argument("--sampler", choices=("euler", "unipc"), default="euler",
                   help="fixtures: flow-matching Euler or UniPC (as Wan's pipelines; default euler)")
    b.add_argument("--shift", type=float, default=1.0, help="fixtures: the sampler's sigma shift (default 1)")
    b.add_argument("--size", choices=SIZES, default="tiny")
    b.add_argument("--configs", nargs="+", default=["eager", "inductor", "lossless", "quality", "balanced", "fast",
                                                     "asymrnr", "toca", "fbcache", "pab", "fastercache",
                                                     "taylorseer", "magcache", "seacache", "textkvcache"],
                   help="configurations to compare (default: full compute, every preset, each single method "
                        f"and diffusers' caches); names: {', '.join(bench.config_names())}, "
                        "or ditopt:<options as JSON>; a peer takes <peer>:<its settings as JSON>, and "
                        "<peer>@inductor runs its hooks around blocks compiled with Inductor")
    b.add_argument("--steps", type=int, default=30)
    b.add_argument("--batch", type=int, default=2)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="seeds: the first is timed, fidelity is the worst over all (default: --seed)")
    b.add_argument("--prompt-start", type=int, default=0, help="fixture: index of the first prompt (default 0)")
    b.add_argument("--repeats", type=int, default=2)
    b.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    b.add_argument("--no-flops", action="store_true", help="skip the FLOP count (an extra eager run per config)")
    b.add_argument("--out", default="out/bench", help="folder for bench.json, bench.md and bench.png (default out/bench)")
    b.set_defaults(func=_bench)
    c = sub.add_parser("calibrate", help="an AdaCache codebook for a target speed-up, from full-compute runs")
    c.add_argument("--model", default="fixture", choices=(*FIXTURES, *FAMILIES))
    c.add_argument("--sampler", choices=("euler", "unipc"), default="euler",
                   help="fixtures: flow-matching Euler or UniPC (as Wan's pipelines; default euler)")
    c.add_argument("--shift", type=float, default=1.0, help="fixtures: the sampler's sigma shift (default 1)")
    c.add_argument("--size", choices=SIZES, default="tiny")
    c.add_argument("--target", type=float, default=2.0, help="target speed-up (fraction of steps computed ~ 1/target)")
    c.add_argument("--steps", type=int, default=30)
    c.add_argument("--batch", type=int, default=2)
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(func=_calibrate)
    t = sub.add_parser("tune", help="the fastest configuration whose worst-seed PSNR (or SSIM) against full "
                                    "compute meets a budget, searched over every method (docs/tune.md)")
    t.add_argument("--model", default="fixture", choices=(*FIXTURES, *FAMILIES))
    t.add_argument("--sampler", choices=("euler", "unipc"), default="euler",
                   help="fixtures: flow-matching Euler or UniPC (as Wan's pipelines; default euler)")
    t.add_argument("--shift", type=float, default=1.0, help="fixtures: the sampler's sigma shift (default 1)")
    t.add_argument("--size", choices=SIZES, default="tiny")
    budget = t.add_mutually_exclusive_group()
    budget.add_argument("--psnr", type=float, default=30.0, help="worst-seed PSNR floor in dB (default 30)")
    budget.add_argument("--ssim", type=float, default=None, help="worst-seed SSIM floor instead, in (0, 1]")
    t.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="calibration seeds (default 0 1)")
    t.add_argument("--prompts", type=int, default=4, help="fixture prompts per generation (default 4)")
    t.add_argument("--prompt-start", type=int, default=0, help="index of the first fixture prompt (default 0)")
    t.add_argument("--steps", type=int, default=30)
    t.add_argument("--batch", type=int, default=2, help="batch of the zoo models' inputs")
    t.add_argument("--separate-cfg", action="store_true", help="fixture: cond and uncond as two calls per step")
    t.add_argument("--margin", type=float, default=None,
                   help="added to the budget when choosing: headroom for unseen prompts (default 2 dB for PSNR, 0 for SSIM)")
    t.add_argument("--methods", nargs="+", default=None, help="methods to search (default: all)")
    t.add_argument("--relative", action="store_true",
                   help="AdaCache thresholds relative to a generation's first change (they transfer across models)")
    t.add_argument("--speed", choices=("flops", "wall"), default="flops",
                   help="what 'fastest' means: the exact FLOP ratio (default) or measured time per generation")
    t.add_argument("--out", default="tuned.json", help="the chosen config, as JSON (default tuned.json)")
    t.add_argument("--plot", default="tuned.png", help="the Pareto plot, PNG (default tuned.png)")
    t.set_defaults(func=_tune)
    g = sub.add_parser("gpu-check", help="every GPU figure in one run: kernels, their timing, a realistic model "
                                         "(docs/gpu.md); --device cpu --size tiny checks the logic on the CPU")
    g.add_argument("--out", default="out/gpu_check", help="folder for gpu_check.json and gpu_check.md "
                                                          "(default out/gpu_check)")
    g.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    g.add_argument("--size", choices=("realistic", "tiny"), default="realistic")
    g.add_argument("--steps", type=int, default=None, help="sampling steps per generation (default 10; tiny: 8)")
    g.add_argument("--configs", nargs="+", default=None, help="model configurations (default: inductor, lossless, "
                                                              "balanced, fast, asymrnr, toca)")
    g.add_argument("--repeats", type=int, default=10, help="timed repeats per kernel (median)")
    g.set_defaults(func=_gpu_check)
    pl = sub.add_parser("plan", help="a scale model of real video DiTs on the meta device: FLOPs, cache memory, "
                                     "fit and a roofline time on H100/H200 per preset (docs/gpu.md)")
    pl.add_argument("--model", nargs="+", default=["wan2.1-1.3b-480p"],
                    help="wan2.1-1.3b-480p, wan2.1-14b-720p, hunyuanvideo-720p, cogvideox-5b, flux.1-dev-1024, "
                         "or all (default wan2.1-1.3b-480p)")
    pl.add_argument("--presets", nargs="+", default=["lossless", "quality", "balanced", "fast"])
    pl.add_argument("--decisions", nargs="+", metavar="PRESET=CCSS...",
                    help="a preset's schedule (C computed, S skipped, one per step) instead of the fixture's")
    pl.add_argument("--max-cache-mb", type=float, default=None, help="the cache budget (the max_cache_mb option)")
    pl.add_argument("--out", default="out/plan", help="folder for plan.md and plan.json (default out/plan)")
    pl.set_defaults(func=_plan)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:  # a bad option or an unsupported model: the message says what to change
        print(err, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
