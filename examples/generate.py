"""ditopt demo: sample ditopt's trained fixture with full compute and with an acceleration preset.

    python examples/generate.py [--preset balanced] [--steps 30] [--out out/demo.gif]

Both runs are compiled (Inductor for full compute, ditopt for the preset) and
timed after a warm-up generation (median of three), side by side in this process.  FLOPs are
counted by FlopCounterMode over the same decisions run eagerly.  The GIF (and an
mp4 next to it) shows, per prompt, full compute (left) next to the accelerated
sample (right), labelled.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import ditopt
from ditopt.harness import fixture
from ditopt.harness.bench import compile_config, count_generation_flops
from ditopt.harness.metrics import psnr, ssim

PROMPTS = ["red square moving right", "blue circle moving down", "green square moving up", "yellow circle moving left"]


def generate(fn, args, label):
    bar = lambda ts: tqdm(ts, desc=label, leave=False)  # noqa: E731
    return fixture.sample(fn, PROMPTS, seed=args.seed, steps=args.steps, progress=bar)


def timed(fn, args, label):
    """The samples and the seconds of each of `args.repeats` generations, after a warm-up that compiles."""
    generate(fn, args, f"{label} (warm-up, compiles)")
    seconds = []
    for r in range(args.repeats):
        start = time.perf_counter()
        videos = generate(fn, args, f"{label} ({r + 1}/{args.repeats})")
        seconds.append(time.perf_counter() - start)
    return videos, seconds


def count_flops(model, config, args):
    return count_generation_flops(model, config, lambda fn: generate(fn, args, f"FLOPs {config}"))[0]


def write_videos(full, fast, path: Path, prompts, right_label: str, scale: int = 8) -> Path:
    """The side-by-side video as a GIF at `path` and an mp4 next to it: per prompt one row, full compute
    on the left and the accelerated sample on the right, with the prompt and the two sides labelled."""
    import imageio.v2 as imageio
    from PIL import Image, ImageDraw, ImageFont

    def to_uint8(v):  # [B, 3, F, H, W] -> [F, B, H*scale, W*scale, 3]
        v = ((v.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(2, 0, 3, 4, 1)
        return v.repeat_interleave(scale, 2).repeat_interleave(scale, 3).numpy()

    left, right = to_uint8(full), to_uint8(fast)
    num_frames, rows, h, w, _ = left.shape
    font = ImageFont.load_default(size=14)
    gap, header, caption = 8, 24, 20
    width = -(-(2 * w + 3 * gap) // 16) * 16  # ffmpeg's macro blocks: both sides multiples of 16
    height = -(-(header + rows * (caption + h + gap)) // 16) * 16
    frames = []
    for f in range(num_frames):
        canvas = Image.new("RGB", (width, height), "white")
        draw = ImageDraw.Draw(canvas)
        draw.text((gap, 4), "full compute", fill="black", font=font)
        draw.text((2 * gap + w, 4), right_label, fill="black", font=font)
        for r, prompt in enumerate(prompts):
            top = header + r * (caption + h + gap)
            draw.text((gap, top + 2), f'"{prompt}"', fill="black", font=font)
            canvas.paste(Image.fromarray(left[f, r]), (gap, top + caption))
            canvas.paste(Image.fromarray(right[f, r]), (2 * gap + w, top + caption))
        frames.append(canvas)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=250, loop=0)
    mp4 = path.with_suffix(".mp4")
    imageio.mimsave(mp4, [np.asarray(c) for c in frames], fps=4, macro_block_size=16)  # imageio-ffmpeg
    return mp4


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="balanced", choices=ditopt.config.PRESETS)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="timed generations per side (median reported)")
    parser.add_argument("--out", default="out/demo.gif")
    args = parser.parse_args()

    model = fixture.load_fixture()
    print(f"fixture: {type(model).__name__}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters; "
          f"{len(PROMPTS)} prompts x {args.steps} steps, CFG in one batched call")
    with torch.no_grad():
        full, t_full = timed(torch.compile(model, backend="inductor"), args, "full compute (inductor)")
        torch._dynamo.reset()
        fast, t_fast = timed(compile_config(model, args.preset), args, f"ditopt {args.preset}")
        stats = ditopt.stats(model)["generations"][-1]
        flops_full = count_flops(model, "inductor", args)
        flops_fast = count_flops(model, args.preset, args)

    speedup = statistics.median(t_full) / statistics.median(t_fast)
    mp4 = write_videos(full, fast, Path(args.out), PROMPTS, f"ditopt {args.preset}, {speedup:.2f}x")
    skipped = stats["blocks_skipped"] / max(1, stats["blocks_skipped"] + stats["blocks_computed"])
    score_full = fixture.conditioning_score(full, PROMPTS)
    score_fast = fixture.conditioning_score(fast, PROMPTS)
    spread = lambda ts: f"{statistics.median(ts):.2f} s per generation (min {min(ts):.2f}, max {max(ts):.2f})"  # noqa
    print(f"full compute : {spread(t_full)}, {flops_full / 1e9:.1f} GFLOP")
    print(f"ditopt {args.preset:<6}: {spread(t_fast)}, {flops_fast / 1e9:.1f} GFLOP, "
          f"{skipped:.0%} of block calls skipped ({stats.get('adacache', {}).get('decisions', '')})")
    print(f"speed-up {speedup:.2f}x (medians of {args.repeats}; range {min(t_full) / max(t_fast):.2f}x to "
          f"{max(t_full) / min(t_fast):.2f}x), FLOP ratio {flops_fast / flops_full:.3f}, "
          f"PSNR {psnr(fast, full):.2f} dB, SSIM {ssim(fast, full):.4f} against full compute")
    print(f"prompts shown correctly (colour and direction): full {score_full:.0%}, ditopt {score_fast:.0%}")
    print(f"side by side (left full compute, right ditopt): {args.out} and {mp4}")


if __name__ == "__main__":
    main()
