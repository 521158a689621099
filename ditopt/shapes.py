"""Graphs with symbolic sizes: specialise them per concrete shape at call time, guarded by the shapes.

Under torch.compile's default `dynamic=None`, the second shape a model is called with (another frame
count, resolution or batch) makes Dynamo hand the backend a graph with symbolic sizes.  ditopt's
analysis and methods need concrete token counts, so `ShapeDispatcher` keeps that graph and, for each
distinct set of input shapes, propagates the concrete shapes through a copy of it (fake tensors, no
compute), then compiles that copy as a static graph (analysis, methods, lowering, runtime).  At most
`MAX_SHAPES` shapes are specialised; beyond them the graph runs as compiled by plain Inductor for its
symbolic sizes, with one warning.  A wrong answer is impossible: a shape never seen is compiled, never
guessed.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any, Callable

import torch
import torch.fx as fx

MAX_SHAPES = 8

_IDS = itertools.count()


def is_dynamic(gm: fx.GraphModule) -> bool:
    """Whether any input of the graph has a symbolic size (or is a symbolic integer)."""
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        val = node.meta.get("example_value")
        if isinstance(val, torch.SymInt):
            return True
        if isinstance(val, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in val.shape):
            return True
    return False


def shape_key(args) -> tuple:
    return tuple((tuple(a.shape), a.dtype, a.device.type) if isinstance(a, torch.Tensor) else ("int", int(a))
                 if isinstance(a, int) else ("py", type(a).__name__) for a in args)


def concretize(gm: fx.GraphModule, args) -> fx.GraphModule:
    """A copy of gm whose every node's example_value has the concrete shapes these inputs give."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    g = fx.Graph()
    g.output(g.graph_copy(gm.graph, {}))
    copy = fx.GraphModule(gm, g, class_name=type(gm).__name__)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake = [mode.from_tensor(a, static_shapes=True) if isinstance(a, torch.Tensor) else a for a in args]

    class Propagate(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.op != "output":
                n.meta["example_value"] = out
            return out

    with mode, torch.no_grad():
        Propagate(copy).run(*fake)
    _fold_sizes(copy)
    return copy


def _fold_sizes(gm: fx.GraphModule) -> None:
    """Bake the concrete sizes in: every value that is an integer (a size, or arithmetic on sizes) is
    replaced by its number, as in a graph Dynamo traced for these shapes, so that blocks that computed
    sizes for their siblings look like them again."""
    for node in list(gm.graph.nodes):
        val = node.meta.get("example_value")
        if node.op not in ("placeholder", "call_function", "call_method") or type(val) is not int:
            continue
        for user in list(node.users):
            user.args = fx.node.map_arg(user.args, lambda a: val if a is node else a)
            user.kwargs = fx.node.map_arg(user.kwargs, lambda a: val if a is node else a)
        if node.op != "placeholder":
            gm.graph.erase_node(node)
    # Size queries left unread go too (only those: a general dead-code pass would drop in-place writes).
    for node in reversed(list(gm.graph.nodes)):
        val = node.meta.get("example_value")
        is_size = isinstance(val, torch.Size) or (isinstance(val, tuple) and all(type(v) is int for v in val))
        if node.op in ("call_function", "call_method") and is_size and not node.users:
            gm.graph.erase_node(node)
    gm.recompile()


class ShapeDispatcher:
    """The callable Dynamo gets for a graph with symbolic sizes: one specialised compile per shape."""

    def __init__(self, gm: fx.GraphModule, compile_static: Callable, compile_plain: Callable, warn: Callable):
        self.gm = gm
        self.compile_static = compile_static  # (concrete gm, real inputs) -> callable
        self.compile_plain = compile_plain  # () -> callable for the symbolic graph (any shape)
        self.warn = warn
        self.specialised: dict[tuple, Callable] = {}
        self.plain: Callable | None = None
        self.index = next(_IDS)
        self.params: dict[int, weakref.ref] = {}
        self.calls = 0

    def __call__(self, *args):
        self.calls += 1
        key = shape_key(args)
        fn = self.specialised.get(key)
        if fn is None:
            if len(self.specialised) >= MAX_SHAPES:
                if self.plain is None:
                    self.warn(f"ditopt: this graph was called with more than {MAX_SHAPES} input shapes; further "
                              "shapes run with plain Inductor and no acceleration")
                    self.plain = self.compile_plain()
                return self.plain(*args)
            fn = self.specialised[key] = self.compile_static(concretize(self.gm, args), list(args))
        return fn(*args)

    def stats(self, params: set[int] | None = None) -> dict[str, Any]:
        return {"calls": self.calls, "dynamic": True, "shapes_specialised": len(self.specialised),
                "compiled_variants": 0, "generations": []}

    def reset(self, params: set[int] | None = None) -> None:
        pass  # each specialisation is a runtime of its own, registered for the same model
