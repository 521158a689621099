"""The pass pipeline: declared order, counted matches, and (all methods off) exact equivalence."""

import ast
from pathlib import Path

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ditopt
import ditopt.passes.pipeline
from ditopt import Config
from ditopt.analysis import analyze
from ditopt.passes.pipeline import METHODS, NORMALIZE, run_pipeline
from ditopt.harness.stdit import STDiT

from conftest import capture_graphs


def test_pipeline_is_declared_once_in_order():
    assert [name for name, _ in NORMALIZE] == ["remove_inference_noops", "normalize_attention", "packed_attention",
                                               "flex_attention", "hoist_block_constants"]
    assert [m.name for m in METHODS] == ["invariants", "toca", "asymrnr", "adacache", "teacache"]


def test_the_core_names_no_method():
    root = Path(ditopt.__file__).parent
    for module in ("backend.py", "lowering.py", "runtime.py"):
        text = (root / module).read_text().lower()
        named = [m.name for m in METHODS if m.name in text]
        assert named == [], f"ditopt/{module} names {named}"


def test_no_import_circle_among_the_compiler_modules():
    """Module-level imports of ditopt's core and passes form no cycle (imports inside functions are lazy)."""
    root = Path(ditopt.__file__).parent
    files = {f"ditopt.{p.stem}": p for p in root.glob("*.py") if p.stem != "__main__"}
    for p in Path(ditopt.passes.pipeline.__file__).parent.rglob("*.py"):
        rel = p.relative_to(Path(ditopt.passes.pipeline.__file__).parent).with_suffix("")
        name = ".".join(("ditopt.passes", *rel.parts))
        files[name.removesuffix(".__init__")] = p
    graph = {name: _module_imports(name, path, set(files)) for name, path in files.items()}
    state: dict[str, int] = {}

    def visit(name, path):
        state[name] = 1
        for dep in graph[name]:
            assert state.get(dep) != 1, f"import circle: {' -> '.join(path + [dep])}"
            if dep not in state:
                visit(dep, path + [dep])
        state[name] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])


def _module_imports(name: str, path: Path, known: set) -> set:
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.parse(path.read_text()).body:  # module level only
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in known else base)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {d for d in found if d in known and d != name}


@settings(max_examples=5, deadline=None)
@given(layers=st.integers(1, 3), heads=st.integers(1, 2), frames=st.integers(1, 3))
def test_noop_removal_counts_wan_dropouts_and_preserves_output(layers, heads, frames):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=8, in_channels=4,
                                  out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=layers,
                                  rope_max_seq_len=16).eval()
    inputs = dict(hidden_states=torch.randn(1, 4, frames, 4, 4), timestep=torch.tensor([300.0]),
                  encoder_hidden_states=torch.randn(1, 3, 16), return_dict=False)
    gm = capture_graphs(model, inputs)[0]
    flat = [n for n in gm.graph.nodes if n.op == "placeholder"]
    args = _example_args(gm)
    with torch.no_grad():
        before = gm(*args)[0]
        gm2, structure, reports = run_pipeline(gm, Config.from_options({"lowering": "eager"}))
        after = gm2(*args)[0]
    assert reports["remove_inference_noops"]["removed"]["dropout"] == 3 * layers
    assert len(structure.blocks) == layers
    assert len([n for n in gm2.graph.nodes if n.op == "placeholder"]) == len(flat)
    assert torch.equal(before, after)


def _example_args(gm):
    return gm.example_inputs


@settings(max_examples=5, deadline=None)
@given(depth=st.integers(1, 3), frames=st.integers(1, 4))
def test_pipeline_output_equals_input_graph_on_stdit(depth, frames):
    torch.manual_seed(depth)
    model = STDiT(dim=32, heads=2, depth=depth, caption_dim=16).eval()
    inputs = dict(x=torch.randn(1, 4, frames, 8, 8), timestep=torch.tensor([250.0]), y=torch.randn(1, 4, 16))
    gm = capture_graphs(model, inputs)[0]
    args = _example_args(gm)
    with torch.no_grad():
        before = gm(*args)[0]
        gm2, _, reports = run_pipeline(gm, Config.from_options({"lowering": "eager"}))
        assert torch.equal(gm2(*args)[0], before)
    assert reports["remove_inference_noops"]["removed"] == {"float": 1}  # timestep.float() on a float tensor
