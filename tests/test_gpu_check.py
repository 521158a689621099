"""The GPU check's whole logic, on the CPU: kernels in the interpreter, the tiny CogVideoX, eager lowering."""

import json

from ditopt.harness import gpu_check


def test_gpu_check_runs_every_part_on_the_cpu_and_writes_strict_json(tmp_path):
    rc = gpu_check.main(str(tmp_path), device="cpu", size="tiny", steps=8, configs=["inductor", "lossless", "fast"],
                        repeats=1)
    data = json.loads((tmp_path / "gpu_check.json").read_text())  # strict: no Infinity
    assert data["errors"] == [] and rc == 0
    kernels = [(r["kernel"], r["dtype"], r["stride"] and tuple(r["stride"])) for r in data["kernels"]]
    assert sorted(kernels, key=str) == sorted([("nearest_destination", d, s) for d in gpu_check.DTYPES
                                               for s in gpu_check.STRIDES]
                                              + [("gather_tokens", d, None) for d in gpu_check.DTYPES], key=str)
    assert all(r["ok"] for r in data["kernels"])
    timing = data["kernel_timing"]
    assert [r["what"] for r in timing][:2] == ["nearest_destination", "gather_tokens"]
    assert timing[2]["attention_full_ms"] > 0 and timing[2]["matching_ms"] > 0
    model = {r["config"]: r for r in data["model"]}
    assert set(model) == {"inductor", "lossless", "fast"}
    # lossless computes the step-invariant work once: fewer FLOPs, the same output (PSNR infinite: null)
    assert 0.5 < model["lossless"]["flop_ratio"] < 1.0 and model["lossless"]["psnr_db"] is None
    assert model["fast"]["flop_ratio"] < 1.0
    assert "## Kernels" in (tmp_path / "gpu_check.md").read_text()
