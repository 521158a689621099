"""The one interface every acceleration method implements, and what the core hands it.

A method is one package under `ditopt.passes` that exports one `Method`:

    METHOD = Method(name="toca", config_type=ToCaConfig, rewrite=rewrite, hook=make_hook)

- `rewrite(gm, structure, cfg) -> Rewrite` changes the graph (never the structure) and
  reports what it matched, what it declined and why.  Every node it inserts carries one
  `Tag` under `node.meta[TAG]`.
- `hook(cfg, lowered) -> Hook | str` builds the method's runtime part from the lowered
  graph, or says in a sentence why there is nothing for it to do.

The core (analysis, lowering, runtime, backend) knows methods only through this module, in
the manner of Inductor's `CustomGraphPass`: a name, a callable and an identity (`uuid`).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch.fx as fx

if TYPE_CHECKING:
    from .analysis import DiTStructure
    from .lowering import Lowered, Region
    from .runtime import Call

TAG = "ditopt"  # the one meta key a method's inserted nodes carry


@dataclass(frozen=True)
class Tag:
    """What a method says about a node it inserted.

    role: the node's part in the method ("guard", "probe", "match", "rows", ...); payload: a small
    method-owned value (a dataclass) its hook reads back.  The four flags are the only things the
    lowering reads: `own_region` (a key: the nodes sharing it form a region of their own, which the
    method's hook runs), `split_after` (end the region after this node: a decision waits for it),
    `output` (a region output even when nothing after reads it: the hook does), and `marker`
    (replaced by its first input before lowering: it only marks where the hook acts).
    """

    method: str
    role: str
    payload: Any = None
    own_region: str | None = None
    split_after: bool = False
    output: bool = False
    marker: bool = False


def tag_of(node: fx.Node) -> Tag | None:
    return node.meta.get(TAG)


def tag(node: fx.Node, value: Tag, like: fx.Node | None = None) -> fx.Node:
    """Put `value` on `node`, with the module stack of `like` (so the lowering knows its block)."""
    if like is not None:
        node.meta.update({k: like.meta[k] for k in ("nn_module_stack", "stack_trace") if k in like.meta})
    node.meta[TAG] = value
    return node


@dataclass
class Rewrite:
    """What a method's rewrite did: `report` (JSON-able; export writes it, tests count it) and, when it
    changed nothing, `nothing` saying why in a sentence (the backend warns with it)."""

    report: dict = field(default_factory=dict)
    nothing: str | None = None


class Hook:
    """A method's runtime part for one compiled graph.  The runtime calls, per model call:

        begin_call, then for each region i: before_region(i) -> run_region -> after_region(i),
        then end_call

    `before_region` / `after_region` may return a region index to continue from (the hook has then
    written the outputs of every region it jumps over into `call.values`); `run_region` may claim a
    region by returning its outputs.  Every method is optional.  Per-stream state is whatever
    `new_state()` returns, reached as `call.state(self)`; `stats(state)` is the method's section of
    `ditopt.stats`.

    `cuts()` and `claims()` tell the runtime which neighbouring regions it may fuse into one: it never
    fuses a region a hook may claim, nor across a cut.  The defaults (None: every region, every boundary)
    fuse nothing.  Inside a fused run the hook's `after_region(k)` is still called for every k, in order,
    once the whole run has computed, and must not jump; its `before_region` is called at the run's first
    region only; values made and read only inside the run are not in `call.values`.
    """

    name: str = "hook"

    def cuts(self) -> set[int] | None:
        """Indices i where the runtime must stop before region i: where `before_region` may act, and after
        every region whose `after_region` may jump or must see values before the next region runs."""
        return None

    def claims(self) -> set[int] | None:
        """The regions `run_region` may claim."""
        return None

    def new_state(self) -> Any:
        return None

    def begin_call(self, call: "Call") -> None:
        pass

    def before_region(self, call: "Call", index: int) -> int | None:
        return None

    def run_region(self, call: "Call", region: "Region", inputs: list) -> list | None:
        return None

    def after_region(self, call: "Call", index: int) -> int | None:
        return None

    def end_call(self, call: "Call") -> None:
        pass

    def stats(self, state: Any) -> dict:
        return {}

    def cache_bytes(self, state: Any) -> int:
        """Bytes of the tensors this hook holds for one stream's generation (counted in stats, bounded by
        the `max_cache_mb` option)."""
        return 0

    def shed(self, states: list) -> str | None:
        """Hold less from now on, and drop what that frees from `states` (every stream's state of this hook):
        a lower forecast order, fewer cached spans or sites.  Returns what was given up, in words, or None when
        there is nothing left to give up.  What is dropped is recomputed, never guessed."""
        return None


def tensor_bytes(*values) -> int:
    """Bytes of the distinct tensors among `values` (nested lists, tuples and dicts are walked)."""
    import torch

    seen, total, stack = set(), 0, list(values)
    while stack:
        v = stack.pop()
        if isinstance(v, torch.Tensor):
            if id(v) not in seen:
                seen.add(id(v))
                total += v.numel() * v.element_size()
        elif isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
        elif dataclasses.is_dataclass(v) and not isinstance(v, type):
            stack.extend(getattr(v, f.name) for f in dataclasses.fields(v))
    return total


def _keep(settings: dict, base: Any) -> dict:
    return settings


@dataclass(frozen=True)
class Method:
    """One acceleration method: its name (the option key), config dataclass, graph rewrite and hook."""

    name: str
    config_type: type
    rewrite: Callable[[fx.GraphModule, "DiTStructure", Any], Rewrite]
    hook: Callable[[Any, "Lowered"], "Hook | str"]
    # Turns the user's settings into dataclass fields (JSON keys, a named reference): settings, base -> fields.
    normalize: Callable[[dict, Any], dict] = _keep
    conflicts: tuple[str, ...] = ()  # methods that cannot be enabled together with this one
    exact: bool = False  # the output stays what the model computes (a lossless method)
    # For blocks compiled one graph each (passes/block_chain.py): cfg, probe name -> the skip policy, reading
    # the probe under that name; None for a method that acts inside one graph only.
    chain_policy: Callable[[Any, str], Any] | None = None
    version: int = 1

    def uuid(self, cfg: Any) -> tuple:
        """Identity of this method with this config, for caches keyed on what the graph was compiled with."""
        return (self.name, self.version, repr(dataclasses.asdict(cfg)))


def configure(method: Method, value: Any, base: Any) -> Any:
    """A method's config from an option value: a dict of settings, True (its defaults) or False/None (off).

    Unknown keys and values of the wrong type raise ValueError naming what is valid; the config's own
    `validate()` then checks ranges and choices."""
    section = method.config_type
    if value is False or value is None:
        return section(enabled=False)
    if value is True:
        return dataclasses.replace(base, enabled=True)
    if not isinstance(value, Mapping):
        raise ValueError(f"ditopt: option {method.name!r} must be a dict of settings, True or False; got {value!r}")
    names = [f.name for f in dataclasses.fields(section)]
    unknown = sorted(set(value) - set(names))
    if unknown:
        raise ValueError(f"ditopt: unknown key(s) {unknown} in {method.name!r}; valid keys: {names}")
    settings = method.normalize({"enabled": True, **value}, base)
    for f in dataclasses.fields(section):
        if f.name in settings:
            settings[f.name] = _typed(f"{method.name}.{f.name}", settings[f.name], f.type)
    return dataclasses.replace(base, **settings)


_TYPES = {"bool": bool, "int": int, "float": float, "str": str, "dict": dict, "list": list, "tuple": tuple}


def _typed(name: str, value: Any, annotation: Any) -> Any:
    """Check a setting against its field's annotation ("int | None", "tuple", ...); a list is taken for a
    tuple, an int for a float.  Ranges and choices are each config's own `validate()`."""
    names = re.findall(r"[A-Za-z_]+", annotation if isinstance(annotation, str) else getattr(annotation, "__name__", ""))
    allowed = [_TYPES[n] for n in names if n in _TYPES]
    if value is None and "None" in names or not allowed:
        return value
    if isinstance(value, list) and tuple in allowed:
        value = tuple(value)
    ok = any(isinstance(value, t) and (t is bool or not isinstance(value, bool)) for t in allowed)
    ok = ok or (float in allowed and isinstance(value, int) and not isinstance(value, bool))
    if not ok:
        want = " or ".join(t.__name__ for t in allowed) + (" or None" if "None" in names else "")
        raise ValueError(f"ditopt: {name} must be {want}; got {value!r} ({type(value).__name__})")
    return value
