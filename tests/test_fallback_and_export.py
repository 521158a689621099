"""Unsupported graphs fall back with one warning; export writes code and a JSON report; the CLI."""

import json
import subprocess
import sys
import warnings

import torch

from ditopt.harness import models

from conftest import compile_ditopt


def test_plain_mlp_falls_back_with_exactly_one_warning():
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
    x = torch.randn(2, 4, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = compile_ditopt(mlp)(x)
        out_again = compile_ditopt(mlp)(x + 1)
    ours = [w for w in caught if "ditopt" in str(w.message)]
    assert len(ours) == 1
    assert "the graph holds no attention" in str(ours[0].message)
    torch.testing.assert_close(out, mlp(x))
    torch.testing.assert_close(out_again, mlp(x + 1))


def test_stats_record_every_graph_that_fell_back_and_why():
    import ditopt

    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = torch.compile(mlp, backend="ditopt", options={"preset": "lossless"})  # Inductor: boxed calls
        compiled(torch.randn(2, 4, 8))
        compiled(torch.randn(2, 4, 8))
    s = ditopt.stats(mlp)
    assert len(s["graphs"]) == 1 and s["graphs"][0]["calls"] == 2
    assert s["fallbacks"] == [s["graphs"][0]["fallback"]] and "no attention call" in s["fallbacks"][0]
    text = ditopt.explain(mlp)
    assert "0 accelerated, 1 compiled unchanged (no acceleration)" in text and "no attention call" in text


def test_export_writes_each_stage_and_a_report(tmp_path):
    case = models.build("wan")
    with torch.no_grad():
        models.call(compile_ditopt(case.model, export_dir=str(tmp_path)), case.inputs())
    (graph_dir,) = list(tmp_path.iterdir())
    files = sorted(p.name for p in graph_dir.iterdir())
    assert files == ["00_dynamo.py", "01_remove_inference_noops.py", "02_normalize_attention.py",
                     "03_packed_attention.py", "04_flex_attention.py", "05_hoist_block_constants.py", "06_invariants.py",
                     "07_lowered.py",
                     "report.json"]
    report = json.loads((graph_dir / "report.json").read_text())
    assert len(report["structure"]["blocks"]) == 2
    assert report["passes"]["remove_inference_noops"]["removed"]["dropout"] == 2 * 3  # attn1.to_out.1, attn2.to_out.1, ffn.net.1 in each Wan block
    assert "same computation as region2_block0" in (graph_dir / "07_lowered.py").read_text()  # after the invariant region
    assert "functional.dropout(" not in (graph_dir / "01_remove_inference_noops.py").read_text()
    assert "functional.dropout(" in (graph_dir / "00_dynamo.py").read_text()


def test_cli_inspect_prints_the_structure():
    out = subprocess.run([sys.executable, "-m", "ditopt", "inspect", "cogvideox"], capture_output=True, text=True,
                         check=True).stdout
    assert "blocks: 2" in out and "joint-attn[full](40x40, 2h, sdpa)" in out and "grid F x H x W = 2x4x4" in out


def test_regional_compilation_warns_what_to_call_instead():
    case = models.build("wan")
    case.model.compile_repeated_blocks(backend="ditopt", options={"preset": "lossless", "lowering": "eager"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            out = models.call(case.model, case.inputs(1))
    ours = [str(w.message) for w in caught if "ditopt" in str(w.message)]
    assert len(ours) == 1 and "compile_repeated_blocks" in ours[0] and "torch.compile(transformer" in ours[0]
    assert torch.isfinite(out).all()
