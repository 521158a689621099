"""Ahead-of-time compilation of ditopt's Triton kernels for NVIDIA GPUs, on a machine without one.

`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))` gives each kernel's PTX and cubin
for sm_80, sm_90 or sm_100 here; the ptxas bundled with triton then reports registers, stack and
spills (`ptxas -v`).  Every dtype, metric and block configuration the launchers can choose (their
`launch_config`) is compiled, so a kernel that does not compile for a GPU, or spills, is seen in CI.

    python -m ditopt.kernels.aot [--arch 80 90 100]      # prints the table docs/gpu.md quotes
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass

import torch

from . import gather, matching

ARCHS = (80, 90, 100)
HEAD_DIMS = (64, 128, 256)  # what video DiTs use: CogVideoX and LTX 64, Wan and HunyuanVideo 128
DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass
class Compiled:
    kernel: str
    arch: int
    dtype: str
    config: str
    registers: int
    stack_bytes: int
    spill_store_bytes: int
    spill_load_bytes: int
    shared_bytes: int


def configurations():
    """(kernel name, JIT function, signature, constexprs, dtype name, config label) for every launch."""
    for dtype, name in DTYPES.items():
        for head_dim in HEAD_DIMS:
            block_src, block_dst, block_dim, dot_16bit = matching.launch_config(dtype, head_dim)
            for metric in range(len(matching.METRICS)):
                signature = {"x_ptr": f"*{name}", "src_ptr": "*i64", "dst_ptr": "*i64", "nearest_ptr": "*i64",
                             "distance_ptr": "*fp32", **{a: "i32" for a in ("H", "N_SRC", "N_DST", "HEAD_DIM",
                                                                            "stride_b", "stride_h", "stride_n",
                                                                            "stride_d")}}
                constexprs = {"METRIC": metric, "DOT_16BIT": dot_16bit, "BLOCK_SRC": block_src,
                              "BLOCK_DST": block_dst, "BLOCK_DIM": block_dim}
                label = f"{matching.METRICS[metric]}, head dim {head_dim}: {block_src}x{block_dst}x{block_dim}"
                yield "nearest_destination", matching._nearest_destination_kernel, signature, constexprs, name, label
            block_k, block_d = gather.launch_config(head_dim)
            signature = {"x_ptr": f"*{name}", "index_ptr": "*i64", "out_ptr": f"*{name}",
                         **{a: "i32" for a in ("H", "K", "D", "sx_b", "sx_h", "sx_n", "sx_d", "si_b", "si_h", "si_k")}}
            yield ("gather_tokens", gather._gather_tokens_kernel, signature, {"BLOCK_K": block_k, "BLOCK_D": block_d},
                   name, f"head dim {head_dim}: {block_k}x{block_d}")


def ptxas() -> str:
    """The newest ptxas triton bundles (its PTX needs it), for every arch."""
    import triton

    folder = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for name in ("ptxas-blackwell", "ptxas"):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"no ptxas in {folder}")


def resources(ptx: str, arch: int) -> dict:
    """ptxas -v's registers, stack and spills for one PTX module."""
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        report = subprocess.run([ptxas(), "-v", "--gpu-name", gpu, f.name, "-o", os.devnull],
                                capture_output=True, text=True, check=True).stderr
    finally:
        os.unlink(f.name)

    def number(pattern: str) -> int:
        found = re.search(pattern, report)
        return int(found.group(1)) if found else 0

    return {"registers": number(r"Used (\d+) registers"), "stack_bytes": number(r"(\d+) bytes stack frame"),
            "spill_store_bytes": number(r"(\d+) bytes spill stores"), "spill_load_bytes": number(r"(\d+) bytes spill loads")}


def compile_all(archs=ARCHS) -> list[Compiled]:
    """Every kernel configuration compiled for every arch in `archs`."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton's current default, stated (it warns otherwise)
    rows = []
    for arch in archs:
        for kernel, fn, signature, constexprs, dtype, label in configurations():
            compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                      target=GPUTarget("cuda", arch, 32))
            rows.append(Compiled(kernel, arch, dtype, label, shared_bytes=compiled.metadata.shared,
                                 **resources(compiled.asm["ptx"], arch)))
    return rows


def to_markdown(rows: list[Compiled]) -> str:
    lines = ["| kernel | arch | dtype | configuration | registers | stack | spill stores | spill loads | shared |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r.kernel} | sm_{r.arch} | {r.dtype} | {r.config} | {r.registers} | {r.stack_bytes} B | "
              f"{r.spill_store_bytes} B | {r.spill_load_bytes} B | {r.shared_bytes / 1024:.1f} KB |" for r in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    parser.add_argument("--json", help="also write the rows as JSON here")
    args = parser.parse_args()
    if matching.triton_interprets():  # e.g. run from the tests, which interpret kernels on the CPU: a fresh process
        import sys

        return subprocess.run([sys.executable, "-m", "ditopt.kernels.aot", *sys.argv[1:]],
                              env={**os.environ, "TRITON_INTERPRET": "0"}).returncode
    rows = compile_all(args.arch)
    print(to_markdown(rows))
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    spills = [r for r in rows if r.spill_store_bytes or r.spill_load_bytes or r.stack_bytes]
    print(f"\n{len(rows)} configurations compiled; {len(spills)} spill")
    return 1 if spills else 0


if __name__ == "__main__":
    raise SystemExit(main())
