"""One prepared run that prints every GPU figure ditopt needs: `python -m ditopt gpu-check --out DIR`.

Three parts, each recorded as it finishes (DIR/gpu_check.json is rewritten after every part, so a run
stopped by a time limit still leaves what it measured):

1. kernels: each Triton kernel against its torch reference in fp32, bf16 and fp16 at a realistic shape
   (a CogVideoX-2B sequence: 13 x 30 x 45 = 17,550 video tokens, heads of 64, stride (2, 2, 2)); on
   CUDA also the kernel tests of tests/test_asymrnr.py compiled for real (TRITON_INTERPRET=0).
2. kernel timing: each kernel against its reference, and the matching against the attention time it
   lets AsymRnR save (goal: matching <= 5% of the attention time saved).
3. model: a random-weight CogVideoX-2B-like diffusers transformer (the real 30 blocks of width 1920,
   17,550 video + 226 text tokens, bf16), `--steps` steps: Inductor full compute, the presets and each
   method alone, with seconds per generation, FLOP ratio, PSNR, peak memory, compile time and host
   synchronisations per step (torch.cuda.set_sync_debug_mode; goal <= 1).

`--device cpu --size tiny` runs the same logic on the CPU (kernels in Triton's interpreter, tiny shapes,
the tiny CogVideoX of the model zoo, the eager lowering) in under two minutes; a test runs it.
docs/gpu.md says how to run it on a GPU machine without diffusers (carried wheels).
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

SIZES = {
    # grid (frames, height, width) of video tokens, heads, head dim, batch (CFG's two halves)
    "realistic": dict(grid=(13, 30, 45), heads=30, head_dim=64, batch=2),
    "tiny": dict(grid=(2, 4, 8), heads=2, head_dim=16, batch=1),
}
STRIDE = (2, 2, 2)
STRIDES = ((2, 2, 2), (6, 2, 2))  # CogVideoX's, and HunyuanVideo's and Mochi's (the reference's schedules)
DTYPES = ("float32", "bfloat16", "float16")
MODEL_CONFIGS = ("inductor", "lossless", "balanced", "fast", "asymrnr", "toca")
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 1e-2}  # on distances, relative to their scale


class Report:
    """The check's results, written to DIR after every part."""

    def __init__(self, out: Path, meta: dict):
        self.out = out
        self.data = {"meta": meta, "kernels": [], "kernel_timing": [], "model": [], "errors": []}
        out.mkdir(parents=True, exist_ok=True)

    def add(self, part: str, row: dict) -> None:
        self.data[part].append(row)
        self.write()

    def write(self) -> None:
        from .bench import finite

        (self.out / "gpu_check.json").write_text(json.dumps(finite(self.data), indent=2, allow_nan=False))
        (self.out / "gpu_check.md").write_text(to_markdown(self.data))


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _median_ms(fn: Callable, device: str, repeats: int) -> float:
    fn()  # warm-up (compiles a Triton kernel on first use)
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return round(statistics.median(times), 4)


def check_kernels(report: Report, device: str, size: str) -> None:
    """Part 1: every kernel against its reference, per dtype."""
    import torch

    from ditopt.kernels import gather, matching
    from ditopt.passes.asymrnr import plans

    s = SIZES[size]
    grid, heads, head_dim, batch = s["grid"], s["heads"], s["head_dim"], s["batch"]
    n = math.prod(grid)
    for name in DTYPES:
        dtype = getattr(torch, name)
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(batch, heads, n, head_dim, device=device, dtype=dtype, generator=gen)
        for stride in STRIDES:
            dst, src = plans.split_grid(grid, stride, 0, device)
            nearest, distance = matching.nearest_destination_triton(x, src, dst)
            ref_nearest, ref_distance = matching.nearest_destination_reference(x, src, dst)
            scale = ref_distance.abs().max().clamp_min(1e-6)
            error = float(((distance - ref_distance).abs() / scale).max())
            agree = float((nearest == ref_nearest).float().mean())
            report.add("kernels", {"kernel": "nearest_destination", "dtype": name, "stride": list(stride),
                                   "shape": list(x.shape), "max_relative_distance_error": round(error, 6),
                                   "same_nearest": round(agree, 6), "ok": error <= TOLERANCE[name]})
        keep = torch.sort(torch.randperm(n, device=device)[: n // 2]).values.expand(batch, heads, -1).contiguous()
        same = torch.equal(gather.gather_tokens_triton(x, keep), gather.gather_tokens_reference(x, keep))
        report.add("kernels", {"kernel": "gather_tokens", "dtype": name, "stride": None, "shape": list(x.shape),
                               "exact": same, "ok": same})


def run_kernel_tests(report: Report) -> None:
    """On CUDA: the kernel tests compiled for real (the CPU suite runs them in the interpreter)."""
    tests = Path(__file__).resolve().parents[2] / "tests" / "test_asymrnr.py"
    if not tests.exists():
        report.add("errors", {"part": "kernel tests", "error": f"{tests} not found (run from a checkout)"})
        return
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests), "-k", "kernel"],
                          capture_output=True, text=True, env=env, cwd=tests.parents[1])
    summary = (proc.stdout.strip().splitlines() or [""])[-1]
    report.add("kernels", {"kernel": "tests/test_asymrnr.py -k kernel (TRITON_INTERPRET=0)", "dtype": "all",
                           "summary": summary, "ok": proc.returncode == 0})


def time_kernels(report: Report, device: str, size: str, repeats: int, q_ratio: float = 0.5,
                 kv_ratio: float = 0.3, match_every: int = 5) -> None:
    """Part 2: kernel against reference, and matching against the attention time it saves."""
    import torch
    import torch.nn.functional as F

    from ditopt.kernels import gather, matching
    from ditopt.passes.asymrnr import plans

    s = SIZES[size]
    grid, heads, head_dim, batch = s["grid"], s["heads"], s["head_dim"], s["batch"]
    n = math.prod(grid)
    dst, src = plans.split_grid(grid, STRIDE, 0, device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x = torch.randn(batch, heads, n, head_dim, device=device, dtype=dtype)
    keep = torch.arange(n // 2, device=device).expand(batch, heads, -1).contiguous()
    rows = [
        ("nearest_destination", lambda: matching.nearest_destination_triton(x, src, dst),
         lambda: matching.nearest_destination_reference(x, src, dst)),
        ("gather_tokens", lambda: gather.gather_tokens_triton(x, keep), lambda: gather.gather_tokens_reference(x, keep)),
    ]
    for name, kernel, reference in rows:
        k_ms, r_ms = _median_ms(kernel, device, repeats), _median_ms(reference, device, repeats)
        report.add("kernel_timing", {"what": name, "dtype": str(dtype).split(".")[-1], "shape": list(x.shape),
                                     "kernel_ms": k_ms, "reference_ms": r_ms,
                                     "speedup": round(r_ms / k_ms, 3) if k_ms else None})
    q_len, kv_len = (plans.reduced_length(n, dst.numel(), r) for r in (q_ratio, kv_ratio))
    q, k = x, x
    full = _median_ms(lambda: F.scaled_dot_product_attention(q, k, k), device, repeats)
    reduced = _median_ms(lambda: F.scaled_dot_product_attention(q[:, :, :q_len], k[:, :, :kv_len], k[:, :, :kv_len]),
                         device, repeats)
    match = 2 * _median_ms(lambda: matching.nearest_destination_triton(x, src, dst), device, repeats)  # q and kv
    saved = full - reduced
    report.add("kernel_timing", {
        "what": f"matching vs attention saved (q {q_ratio}, kv {kv_ratio}, match every {match_every} steps)",
        "dtype": str(dtype).split(".")[-1], "shape": list(x.shape), "attention_full_ms": full,
        "attention_reduced_ms": reduced, "matching_ms": match,
        "matching_per_saved_step": round(match / saved, 4) if saved > 0 else None,
        "matching_per_saved_amortised": round(match / (saved * match_every), 4) if saved > 0 else None,
        "goal": "matching_per_saved_amortised <= 0.05"})


def _model(size: str, device: str):
    """A CogVideoX-2B-like transformer with random weights, and a sampling loop over it."""
    import torch

    from ditopt.harness import bench, models

    if size == "tiny":
        case = models.build("cogvideox", "tiny")
        model, inputs = case.model.to(device), case.inputs(batch=2)
    else:
        from diffusers import CogVideoXTransformer3DModel

        torch.manual_seed(0)
        model = CogVideoXTransformer3DModel(num_attention_heads=30, attention_head_dim=64, in_channels=16,
                                            out_channels=16, num_layers=30, sample_frames=49, sample_height=60,
                                            sample_width=90, text_embed_dim=4096, max_text_seq_length=226)
        model = model.to(device=device, dtype=torch.bfloat16).eval()
        gen = torch.Generator().manual_seed(0)
        inputs = dict(hidden_states=torch.randn(2, 13, 16, 60, 90, generator=gen),
                      encoder_hidden_states=torch.randn(2, 226, 4096, generator=gen),
                      timestep=torch.tensor([999, 999]), return_dict=False)
    dtype = next(model.parameters()).dtype
    inputs = {k: (v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
                  if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    return model, inputs, bench


def check_model(report: Report, device: str, size: str, steps: int, configs: list[str], lowering: str) -> None:
    """Part 3: the bench's side-by-side figures at a realistic size, plus host syncs per step."""
    import torch

    import ditopt

    model, inputs, bench = _model(size, device)
    generate = bench.euler_loop(inputs, steps, "hidden_states", _call)
    with torch.no_grad():
        results = bench.measure(model, generate, configs, repeats=1, flops=True, lowering=lowering)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    for r in results:
        row = {k: v for k, v in vars(r).items()}
        row.update(roofline_columns(row, weight_bytes, steps, device))
        row["host_syncs_per_step"] = _syncs_per_step(model, r.config, generate, steps, lowering) \
            if device == "cuda" and r.config not in ("eager", "inductor") else None
        report.add("model", row)
    ditopt.reset(model)


def roofline_columns(row: dict, weight_bytes: int, steps: int, device: str) -> dict:
    """The scale model's prediction for this row (ditopt plan's roofline: GEMMs at max(FLOPs / peak, weights /
    bandwidth) per call, attention at FLOPs / peak), beside the measured seconds: the first GPU run tests it."""
    import torch

    from .plan import GPUS, roofline_seconds

    if not row.get("gflops_per_generation"):
        return {}
    name = torch.cuda.get_device_name() if device == "cuda" else ""
    gpus = [g for g in GPUS if g in name] or list(GPUS)
    flops, attention = row["gflops_per_generation"] * 1e9, (row.get("attention_gflops") or 0) * 1e9
    out = {}
    for gpu in gpus:
        predicted = roofline_seconds(int(flops), int(attention), weight_bytes, steps, gpu)["total_s"]
        out[f"roofline_s_{gpu}"] = predicted
        if device == "cuda" and row.get("seconds_per_generation"):
            out[f"measured_over_roofline_{gpu}"] = round(row["seconds_per_generation"] / max(predicted, 1e-9), 2)
    return out


def _call(fn, inputs):
    from ditopt.harness.models import call

    return call(fn, inputs)


def _syncs_per_step(model, name: str, generate: Callable, steps: int, lowering: str) -> float:
    """Host synchronisations per step of a compiled configuration, counted by CUDA's sync debug mode."""
    import torch

    import ditopt
    from ditopt.harness import bench

    torch._dynamo.reset()
    ditopt.reset(model)
    fn = bench.compile_config(model, name, lowering)
    with torch.no_grad():
        generate(fn)  # compile first: compilation syncs are not the runtime's
        ditopt.reset(model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                generate(fn)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    syncs = sum(1 for w in caught if "synchroniz" in str(w.message))
    return round(syncs / steps, 3)


def to_markdown(data: dict) -> str:
    meta = data["meta"]
    lines = [f"# ditopt gpu-check: {meta['device_name']} ({meta['size']})", "",
             f"torch {meta['torch']}, triton {meta['triton']}, python {meta['python']}; {meta['when']}", ""]
    sections = [("kernels", "Kernels against their torch references"),
                ("kernel_timing", "Kernel timing"), ("model", "Model (seconds per generation, FLOPs, syncs)")]
    for key, title in sections:
        rows = data[key]
        if not rows:
            continue
        cols = list(dict.fromkeys(c for r in rows for c in r))
        lines += [f"## {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in cols) + " |" for r in rows]
        lines.append("")
    for err in data["errors"]:
        lines.append(f"- error in {err['part']}: {err['error']}")
    return "\n".join(lines) + "\n"


def main(out: str, device: str = "cuda", size: str = "realistic", steps: int | None = None,
         configs: list[str] | None = None, repeats: int = 10) -> int:
    """Run the three parts; returns 0 when every kernel check passed and no part failed."""
    from ditopt.kernels.matching import triton_interprets

    if device == "cpu" and not triton_interprets():
        # triton fixes the interpreter choice for its own language functions when it is first imported
        # (torch imports it), so on the CPU the kernels can only run interpreted in a fresh process
        cmd = [sys.executable, "-m", "ditopt", "gpu-check", "--device", "cpu", "--size", size, "--out", str(out),
               "--repeats", str(repeats), *(["--steps", str(steps)] if steps else []),
               *(["--configs", *configs] if configs else [])]
        return subprocess.run(cmd, env={**os.environ, "TRITON_INTERPRET": "1"}).returncode
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("ditopt gpu-check: no CUDA device here; run with --device cpu --size tiny to check the "
                         "logic on the CPU")
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    lowering = "inductor" if device == "cuda" else "eager"
    steps = steps or (10 if size == "realistic" else 8)
    report = Report(Path(out), {
        "device": device, "device_name": torch.cuda.get_device_name() if device == "cuda" else platform.processor()
        or "cpu", "size": size, "steps": steps, "lowering": lowering, "torch": torch.__version__,
        "triton": triton_version, "python": platform.python_version(),
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})
    parts = [("kernels", lambda: check_kernels(report, device, size)),
             ("kernel timing", lambda: time_kernels(report, device, size, repeats if device == "cuda" else 2)),
             ("model", lambda: check_model(report, device, size, steps, list(configs or MODEL_CONFIGS), lowering))]
    if device == "cuda":
        parts.insert(1, ("kernel tests", lambda: run_kernel_tests(report)))
    for part, run in parts:
        print(f"ditopt gpu-check: {part} ...", flush=True)
        start = time.perf_counter()
        try:
            run()
        except Exception as err:  # noqa: BLE001 - record and go on: the other parts still report
            report.add("errors", {"part": part, "error": f"{type(err).__name__}: {err}"})
        print(f"ditopt gpu-check: {part} done in {time.perf_counter() - start:.1f} s", flush=True)
    report.write()
    print(to_markdown(report.data))
    ok = all(r["ok"] for r in report.data["kernels"]) and not report.data["errors"]
    return 0 if ok else 1
