"""The environment users have: run from the repository root, with transformers (and the PyPI package
`kernels` it installs) beside ditopt, every command README.md shows works.

Each README command runs as a user types it, from the root, with short settings appended where the README's
take long (argparse keeps the last value of an option).  A README command without an entry in COMMANDS fails
the test, so the README cannot show a command nothing runs.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str], tmp_path: Path, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def test_an_installed_kernels_package_is_not_shadowed_by_the_repository_root(tmp_path):
    """transformers 5 installs the PyPI package `kernels`; from the root, `import kernels` must find it."""
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("STAND_IN = True\n")
    code = ("import ditopt, ditopt.kernels.matching, ditopt.passes.pipeline, kernels; "
            "assert getattr(kernels, 'STAND_IN', False), kernels; print(kernels.__file__)")
    proc = run([sys.executable, "-c", code], tmp_path,
               env={"PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))})
    assert proc.stdout.strip() == str(site / "kernels" / "__init__.py")


def test_ditopt_subpackages_import_from_any_folder(tmp_path):
    code = "import ditopt.passes.pipeline as p, ditopt.kernels.gather as g; print(p.__file__, g.__file__)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all(Path(f).is_file() for f in proc.stdout.split())


def test_issue_commands_from_the_root_with_transformers_installed(tmp_path):
    pytest.importorskip("transformers")
    run([sys.executable, "-m", "ditopt", "inspect", "wan"], tmp_path)
    run([sys.executable, "-m", "ditopt", "gpu-check", "--device", "cpu", "--size", "tiny", "--out",
         str(tmp_path / "gpu")], tmp_path)
    assert (tmp_path / "gpu" / "gpu_check.md").is_file()


def readme_commands() -> list[str]:
    """Every command in README.md's bash blocks, and the inline `python ...` ones."""
    text = (ROOT / "README.md").read_text()
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            command = line.split("#")[0].strip()
            if command:
                found.append(command)
    found += [c for c in re.findall(r"`((?:python|torchrun) [^`]+)`", text)]
    return list(dict.fromkeys(found))


# README command -> what this test appends to it (None: not run here, and why)
COMMANDS = {
    "./dev.sh demo": ["--steps", "2", "--repeats", "1", "--out", "{tmp}/demo.gif"],
    "./dev.sh test": None,  # this test runs inside it
    "python -m pytest -q": None,  # the same, by hand
    "python examples/generate.py": ["--steps", "2", "--repeats", "1", "--out", "{tmp}/demo2.gif"],
    "python -m ditopt inspect cogvideox": [],
    "python -m ditopt bench --model fixture --batch 4 --prompt-start 8 --seeds 4 5":
        ["--steps", "2", "--repeats", "1", "--configs", "inductor", "balanced", "--out", "{tmp}/bench_fixture"],
    "python -m ditopt bench --model fixture-deep --configs inductor balanced dbcache seacache --seeds 8 9":
        ["--steps", "2", "--repeats", "1", "--configs", "eager", "dbcache", "--out", "{tmp}/bench_deep"],
    "python -m ditopt tune --model fixture --psnr 30":
        ["--steps", "3", "--methods", "adacache", "--out", "{tmp}/tuned.json", "--plot", "{tmp}/tuned.png"],
    "python -m ditopt bench --model cogvideox --size mid --configs inductor lossless --steps 5 --no-flops":
        ["--steps", "2", "--repeats", "1", "--out", "{tmp}/bench_cog"],
    "python -m ditopt bench --model cogvideox --size mid --configs inductor asymrnr --steps 5 --batch 1":
        ["--steps", "2", "--repeats", "1", "--out", "{tmp}/bench_asym"],
    "python -m ditopt bench --model pixart --size mid --configs inductor toca toca-pixart --steps 10 --batch 2":
        ["--steps", "4", "--repeats", "1", "--out", "{tmp}/bench_toca"],
    "torchrun --nproc-per-node 2 examples/context_parallel.py": None,  # tests/test_context_parallel.py runs it
    "python -m ditopt gpu-check --device cpu --size tiny": ["--out", "{tmp}/gpu"],
    "python -m ditopt plan --model wan2.1-1.3b-480p": ["--presets", "lossless", "fast", "--out", "{tmp}/plan"],
    "python -m ditopt.kernels.aot": ["--arch", "90"],
}


def test_every_readme_command_has_an_entry():
    assert set(readme_commands()) <= set(COMMANDS), sorted(set(readme_commands()) - set(COMMANDS))


@pytest.mark.slow
@pytest.mark.parametrize("command", [c for c, extra in COMMANDS.items() if extra is not None])
def test_readme_command_runs_from_the_root(command, tmp_path):
    if command not in readme_commands():
        pytest.skip("no longer in README.md")
    argv = command.split()
    if argv[0] == "python":
        argv[0] = sys.executable
    run(argv + [a.format(tmp=tmp_path) for a in COMMANDS[command]], tmp_path, timeout=1500)
