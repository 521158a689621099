"""The Triton kernels compile for NVIDIA GPUs ahead of time (no GPU needed), for every dtype, metric and
block configuration their launchers choose, and none spills registers (ditopt.kernels.aot; docs/gpu.md)."""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia")

from ditopt.kernels import aot  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
def test_every_kernel_configuration_compiles_for_the_gpu_without_spills(arch, tmp_path):
    """In a fresh process with TRITON_INTERPRET=0 (these tests interpret the kernels on the CPU)."""
    import json
    import os
    import subprocess
    import sys

    out = tmp_path / "aot.json"
    proc = subprocess.run([sys.executable, "-m", "ditopt.kernels.aot", "--arch", str(arch), "--json", str(out)],
                          capture_output=True, text=True, timeout=1200, env={**os.environ, "TRITON_INTERPRET": "0"})
    assert out.is_file(), proc.stderr[-3000:]
    rows = [aot.Compiled(**r) for r in json.loads(out.read_text())]
    assert len(rows) == len(list(aot.configurations()))
    spilled = [r for r in rows if r.spill_store_bytes or r.spill_load_bytes or r.stack_bytes]
    assert not spilled, aot.to_markdown(spilled)
    assert all(r.shared_bytes <= 99 * 1024 for r in rows)  # fits sm_80's and sm_90's shared memory per block
    assert proc.returncode == 0


def test_the_launchers_choose_the_configurations_compiled():
    import torch

    from ditopt.kernels import matching

    assert matching.launch_config(torch.float32, 128) == (32, 32, 128, False)
    assert matching.launch_config(torch.bfloat16, 128) == (64, 64, 128, True)
    assert matching.launch_config(torch.bfloat16, 128, interpreted=True)[3] is False  # no tensor cores there
    labels = {(k, d, c) for k, _, _, _, d, c in aot.configurations()}
    assert ("nearest_destination", "fp32", "euclidean, head dim 256: 16x16x256") in labels
