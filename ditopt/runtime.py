"""Runtime of a ditopt-compiled graph: the step clock, streams, generations, region calls.

All state that lives across denoising steps lives here, in plain Python and
tensors held by this object, never in attributes Dynamo guards on: a
sampling loop never recompiles.

Step clock: the timestep input is read once per call.  A new generation of a
stream starts when its timestep does not decrease.  Several calls at one
timestep (separate cond and uncond passes) are separate streams, each with
its own caches and decisions: named by diffusers' `cache_context` when the
call runs in one (ditopt/contexts.py), else by their order at that timestep.
"""

from __future__ import annotations

import contextlib
import itertools
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
from torch.utils._python_dispatch import TorchDispatchMode

from .lowering import Lowered, Region, VariantCache, fill_template, fuse_regions
from .method import Hook


_GENERATION_IDS = itertools.count()


@dataclass
class GenerationStats:
    """One generation of one stream: core counters, and one section per method (its hook's stats)."""

    stream: int
    generation: int
    name: str | None = None  # the diffusers cache_context the stream's calls ran in, if any
    steps: int = 0
    blocks_computed: int = 0
    blocks_skipped: int = 0
    methods: dict[str, dict] = field(default_factory=dict)  # the method sections, once the generation ended
    order: int = field(default_factory=lambda: next(_GENERATION_IDS))  # when it started, across all graphs
    # While the generation runs, its method sections are read from the hooks' states when asked for (not
    # rebuilt at every call); `freeze` keeps them when it ends, before the states are dropped.
    live: Callable[[], dict] | None = field(default=None, repr=False, compare=False)

    def freeze(self) -> None:
        if self.live is not None:
            self.methods, self.live = self.live(), None

    def to_dict(self) -> dict:
        sections = self.live() if self.live is not None else self.methods
        return {
            "stream": self.stream, "name": self.name, "generation": self.generation, "steps": self.steps,
            "blocks_computed": self.blocks_computed, "blocks_skipped": self.blocks_skipped, **sections,
        }


@dataclass
class StreamState:
    """One stream of calls: its clock position and each hook's state for the current generation."""

    index: int  # order of first appearance: 0 is the stream that leads at each timestep
    name: str | None = None
    generation: int = -1
    step: int = -1  # index of the current call within its generation
    last_t: float | None = None
    timesteps: list[float] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)  # hook name -> its state for this stream
    stats: GenerationStats | None = None


class StepClock:
    """Assigns each call to a stream and a step; starts generations."""

    def __init__(self):
        self.streams: dict[int | str, StreamState] = {}
        self._prev_t: float | None = None
        self._call_index = 0
        self.finished: list[GenerationStats] = []

    def observe(self, t: float | None, name: str | None = None) -> StreamState:
        """The stream of a call at timestep `t`, run in the cache context `name` (None: outside one)."""
        if t is not None and t == self._prev_t:
            self._call_index += 1
        else:
            self._call_index = 0
        self._prev_t = t
        key = self._call_index if name is None else name
        stream = self.streams.get(key)
        if stream is None:
            stream = self.streams[key] = StreamState(len(self.streams), name)
        if stream.stats is None or (t is not None and stream.last_t is not None and t >= stream.last_t):
            self._new_generation(stream)
        stream.step += 1
        stream.last_t = t if t is not None else stream.last_t
        if t is not None:
            stream.timesteps.append(t)
        stream.stats.steps += 1
        return stream

    def stream(self, index: int) -> StreamState:
        """The stream that appeared `index`-th (0: the one that leads at each timestep)."""
        return next(s for s in self.streams.values() if s.index == index)

    def _new_generation(self, stream: StreamState) -> None:
        if stream.stats is not None:
            stream.stats.freeze()
            self.finished.append(stream.stats)
        stream.generation += 1  # every hook's state lives in stream.state: a new generation starts empty
        stream.step = -1
        stream.timesteps = []
        stream.state = {}
        stream.stats = GenerationStats(stream.index, stream.generation, stream.name)

    def reset(self) -> None:
        """End every stream's generation: the next call of each starts a fresh one."""
        for s in self.streams.values():
            if s.stats is not None:
                s.stats.freeze()
                self.finished.append(s.stats)
        self.streams = {}
        self._prev_t = None
        self._call_index = 0

    def all_stats(self) -> list[GenerationStats]:
        return self.finished + [s.stats for s in self.streams.values() if s.stats is not None]


class Call:
    """One call of the model's graph, as hooks see it: its stream and step, and the values by slot."""

    def __init__(self, runtime: "Runtime", stream: StreamState, values: list):
        self.runtime = runtime
        self.stream = stream
        self.values = values

    @property
    def step(self) -> int:
        return self.stream.step

    @property
    def t(self) -> float | None:
        return self.stream.last_t

    def state(self, hook: Hook) -> Any:
        """This stream's state of `hook` (made by its `new_state()` at the start of a generation)."""
        states = self.stream.state
        if hook.name not in states:
            states[hook.name] = hook.new_state()
        return states[hook.name]

    def all_sum(self, values: torch.Tensor) -> torch.Tensor:
        """`values` summed over the context-parallel ranks (unchanged in one process): a decision's metric
        sums go through here, once per step, so that every rank decides from the same numbers."""
        group = self.runtime.group
        return values if group is None else group.all_sum(values)

    def free(self, slots) -> None:
        for s in slots:
            self.values[s] = None

    def compiled(self, region: Region, inputs: list, variant: Any = None, gm: fx.GraphModule | None = None):
        """Compiled code for a region, or for a hook's specialised graph `gm` of it, named by `variant`;
        `inputs` are what it will be called with (the region's own first, then any the hook adds)."""
        key = (self.runtime.code_key(region, inputs[:len(region.input_slots)]), variant)
        self.runtime.region_calls += 1  # a hook asks for code to run it
        return self.runtime.compiled(key, gm if gm is not None else region.gm, inputs)


class Runtime:
    """The callable the backend hands to Dynamo for one graph: runs the regions, drives the hooks."""

    def __init__(self, lowered: Lowered, hooks: list[Hook], config, report: dict, context=None, group=None):
        self.lowered = lowered
        self.group = group  # a parallel.RankGroup under context parallelism: decisions read reduced metrics
        self.context = context  # a contexts.CacheContextReader: diffusers' name of each call's stream
        self.structure = lowered.structure
        self.regions = lowered.regions
        self.template = lowered.template
        self.hooks = hooks
        self.config = config
        self.report = report
        self.index = next(_RUNTIME_IDS)  # creation order
        timestep = self.structure.timestep_input
        self.timestep_slot = lowered.slot[timestep] if timestep is not None else None
        regions = self.regions
        self._block_ends = {r.index for r in regions if r.kind == "block"
                            and (r.index + 1 == len(regions) or regions[r.index + 1].block != r.block)}
        # A region that reads what a hook-run region made (a plan whose length varies by step) compiles one
        # variant per input shape there: key its code by those shapes.
        self._hook_made = {s for r in regions if r.kind == "own" for s in r.output_slots}
        self._varying = {(r.index, r.last): self._hook_made_inputs(r) for r in regions}
        self._before = [h for h in hooks if type(h).before_region is not Hook.before_region]
        self._run = [h for h in hooks if type(h).run_region is not Hook.run_region]
        self._after = [h for h in hooks if type(h).after_region is not Hook.after_region]
        self.fused = self._fuse(lowered)  # first index -> merged region
        self._varying.update({(r.index, r.last): self._hook_made_inputs(r) for r in self.fused.values()})
        self.clock = StepClock()
        self.variants = VariantCache(config)
        self.num_slots = max((s for r in regions for s in r.output_slots), default=0) + 1
        self._fns: dict[tuple, Callable] = {}
        self.params: dict[int, weakref.ref] = {}  # id -> weak reference, to recognise the model
        self.calls = 0
        self.region_calls = 0  # compiled region code run (hooks' reuse of cached outputs not counted)

    def _hook_made_inputs(self, region: Region) -> list[int]:
        return [i for i, s in enumerate(region.input_slots) if s in self._hook_made]

    def _fuse(self, lowered: Lowered) -> dict[int, Region]:
        """Runs of regions no hook claims or cuts between, merged (see `Hook.cuts`)."""
        cuts, unfusable = set(), set()
        everything = set(range(len(self.regions) + 1))
        for h in self.hooks:
            hook_cuts, hook_claims = h.cuts(), h.claims()
            cuts |= everything if hook_cuts is None else hook_cuts
            unfusable |= everything if hook_claims is None else hook_claims
        return fuse_regions(lowered, cuts, unfusable, self.config.fuse_regions)

    # -- execution -----------------------------------------------------------

    def __call__(self, *args):
        """One forward of the model's graph: the same arguments and result as the graph Dynamo traced."""
        if not _FLOP_TALLIES:
            return self._forward(*args)
        from torch.utils.flop_counter import FlopCounterMode

        counter, collectives = FlopCounterMode(display=False), _CollectiveCounter()
        group = self.group
        before = (group.collectives, group.bytes) if group is not None else None
        with counter, collectives:
            out = self._forward(*args)
        attention = attention_flops(counter)
        if group is not None:  # ditopt's own all-reduces of decision sums
            _add_collective(collectives.ops, "ditopt all_reduce (decision sums)", group.collectives - before[0],
                            group.bytes - before[1])
        for tally in _FLOP_TALLIES:
            tally.flops += counter.get_total_flops()
            tally.attention += attention
            for op, (calls, size) in collectives.ops.items():
                _add_collective(tally.collectives, op, calls, size)
        return out

    def _forward(self, *args):
        self.calls += 1
        t = read_timestep(args, self.timestep_slot)
        name = self.context.name if self.context is not None else None
        if name is None and self.calls == 1:
            self.context = None  # its first call ran outside a cache context: streams are counted, always
        stream = self.clock.observe(t, name)
        call = Call(self, stream, list(args) + [None] * max(0, self.num_slots - len(args)))
        for hook in self.hooks:
            hook.begin_call(call)
        values = call.values
        i, n = 0, len(self.regions)
        while i < n:
            jump = _first(h.before_region(call, i) for h in self._before)
            if jump is not None:
                i = self._jumped(stream, i, jump)
                continue
            region = self.fused.get(i) or self.regions[i]
            inputs = [values[s] for s in region.input_slots]
            outputs = None if region.kind == "fused" else _first(h.run_region(call, region, inputs) for h in self._run)
            if outputs is None:
                outputs = self.run_region(region, inputs)
            for s, v in zip(region.output_slots, outputs):
                values[s] = v
            for k in range(i, region.last + 1):
                jump = _first(h.after_region(call, k) for h in self._after)
                if jump is not None and k < region.last:
                    raise RuntimeError(f"ditopt: a hook jumped after region {k}, inside the fused {region.name}; "
                                       f"its cuts() must name {k + 1}")
                if k in self._block_ends:
                    stream.stats.blocks_computed += 1
            for s in region.free_after:
                values[s] = None
            i = self._jumped(stream, region.last + 1, jump) if jump is not None else region.last + 1
        for hook in self.hooks:
            hook.end_call(call)
            call.state(hook)  # every hook has a state, so a section, from the first call on
        if stream.stats.live is None:
            stream.stats.live = lambda: {h.name: h.stats(stream.state[h.name]) for h in self.hooks}
        return fill_template(self.template, values)

    def _jumped(self, stream: StreamState, start: int, to: int) -> int:
        """Count the block ends a hook jumped over (start .. to-1) as skipped blocks."""
        stream.stats.blocks_skipped += sum(1 for j in range(start, to) if j in self._block_ends)
        return to

    def run_region(self, region: Region, inputs: list) -> list:
        """Run a region's compiled code (compiled on first use, shared between identical regions)."""
        self.region_calls += 1
        return self.compiled((self.code_key(region, inputs), None), region.gm, inputs)(*inputs)

    def code_key(self, region: Region, inputs: list) -> tuple:
        """A region's code key: the regions it stands for, and the shapes of the hook-made values it reads."""
        varying = self._varying[region.index, region.last]
        return (region.index, region.last, *(tuple(inputs[p].shape) for p in varying))

    def compiled(self, key, gm, inputs: list) -> Callable:
        fn = self._fns.get(key)
        if fn is None:
            fn = self._fns[key] = self.variants.get(gm, inputs)
        return fn

    # -- inspection ----------------------------------------------------------

    def stats(self) -> dict:
        return {
            "calls": self.calls,
            "blocks": len(self.structure.blocks),
            "regions": len(self.regions),
            "fused": [[r.index, r.last] for r in self.fused.values()],  # runs of regions compiled as one
            "region_calls": self.region_calls,
            "methods": [h.name for h in self.hooks],
            "compiled_variants": len(self.variants.variants),
            **({"context_parallel": {"ranks": self.group.size, "rank": self.group.rank,
                                     "decision_all_reduces": self.group.collectives}} if self.group else {}),
            "compile_seconds": round(self.variants.compile_seconds, 3),
            "generations": [g.to_dict() for g in self.clock.all_stats()],
        }

    def reset(self) -> None:
        self.clock.reset()


_LAST_TIMESTEP: list = [None]  # the timestep the latest graph with one took: a tensor, a number or None


def read_timestep(args, slot: int | None) -> float | None:
    """The timestep of this call: read from the graph's own input, or, for a graph without one (a graph
    break put the timestep embedding in an earlier graph of the same forward), the one that graph took."""
    if slot is not None:
        _LAST_TIMESTEP[0] = args[slot]
    t = _LAST_TIMESTEP[0]
    if isinstance(t, torch.Tensor):  # the one host read, made where the step is needed
        t = _LAST_TIMESTEP[0] = float(t.reshape(-1)[0])
    return t


def keep_timestep(args, slot: int) -> None:
    """What a graph compiled without acceleration does with its timestep: keep it for the graphs after it,
    unread (no host read where nothing needs the step)."""
    _LAST_TIMESTEP[0] = args[slot]


class Fallback:
    """A graph compiled with plain Inductor (no acceleration), kept so that `ditopt.stats` says so and why.

    Where it holds the timestep input (the first graph of a forward that graph breaks cut), it reads it, so
    that the accelerated graphs after it know their step."""

    def __init__(self, fn: Callable, reason: str, timestep_slot: int | None = None):
        self.fn = fn
        self.reason = reason
        self.timestep_slot = timestep_slot
        self.index = next(_RUNTIME_IDS)
        self.params: dict[int, weakref.ref] = {}
        self.calls = 0

    def __call__(self, *args):
        self.calls += 1
        if self.timestep_slot is not None:
            keep_timestep(args, self.timestep_slot)
        return self.fn(*args)

    def stats(self) -> dict:
        return {"calls": self.calls, "fallback": self.reason, "compiled_variants": 0, "generations": []}

    def reset(self) -> None:
        pass


def _first(results):
    """The first result that is not None (each hook is asked until one answers)."""
    for r in results:
        if r is not None:
            return r
    return None


_RUNTIME_IDS = itertools.count()


# ---------------------------------------------------------------------------
# counting FLOPs


@dataclass
class FlopTally:
    flops: int = 0
    attention: int = 0  # of which in attention cores (scaled-dot-product ops)
    collectives: dict[str, tuple[int, int]] = field(default_factory=dict)  # op -> (calls, bytes of results)


def _add_collective(ops: dict[str, tuple[int, int]], op: str, calls: int, size: int) -> None:
    if calls:
        c, b = ops.get(op, (0, 0))
        ops[op] = (c + calls, b + size)


class _CollectiveCounter(TorchDispatchMode):
    """Counts the functional collectives (context parallelism's all-to-alls and gathers) and their bytes."""

    def __init__(self):
        super().__init__()
        self.ops: dict[str, tuple[int, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.namespace == "_c10d_functional" and not func.__name__.startswith("wait_tensor"):
            results = out if isinstance(out, (list, tuple)) else [out]
            _add_collective(self.ops, func.__name__.split(".")[0], 1,
                            sum(t.numel() * t.element_size() for t in results if isinstance(t, torch.Tensor)))
        return out


def register_cpu_sdpa_flops() -> None:
    """On the CPU, SDPA runs as an op that torch's FLOP registry has no formula for (it would count 0, and
    every attention saving with it): register the SDPA formula for it. Idempotent; run at import."""
    from torch.utils.flop_counter import flop_registry, register_flop_formula, sdpa_flop_count

    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if op in flop_registry:  # the counter looks ops up by their overload packet
        return

    @register_flop_formula(op)
    def _(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)


register_cpu_sdpa_flops()


def attention_flops(counter) -> int:
    """The FLOPs a FlopCounterMode counted in scaled-dot-product attention ops."""
    return sum(n for op, n in counter.get_flop_counts().get("Global", {}).items() if "scaled_dot_product" in str(op))


_FLOP_TALLIES: list[FlopTally] = []


@contextlib.contextmanager
def count_flops():
    """Count the FLOPs of every ditopt runtime call inside the block: `with count_flops() as tally: ...`.

    torch.utils.flop_counter.FlopCounterMode cannot be wrapped around a torch.compile'd model (Dynamo
    runs the frame without the backend while a dispatch mode is active), so the runtime counts from
    inside. Counts are exact with the "eager" lowering; Inductor's kernels bypass the dispatcher.
    """
    tally = FlopTally()
    _FLOP_TALLIES.append(tally)
    try:
        yield tally
    finally:
        _FLOP_TALLIES.remove(tally)


# ---------------------------------------------------------------------------
# finding the runtimes of a model

_RUNTIMES: "weakref.WeakSet[Runtime]" = weakref.WeakSet()


def register(runtime: "Runtime | Fallback", example_inputs) -> None:
    for x in example_inputs:
        if isinstance(x, torch.nn.Parameter):
            runtime.params[id(x)] = weakref.ref(x)
    _RUNTIMES.add(runtime)


def runtimes_of(model: torch.nn.Module) -> list["Runtime | Fallback"]:
    """The runtimes ditopt built for a model (or its torch.compile wrapper), fallbacks included, oldest first."""
    model = getattr(model, "_orig_mod", model)
    params = list(model.parameters())
    found = [r for r in list(_RUNTIMES) if any(_holds(r, p) for p in params)]
    return sorted(found, key=lambda r: r.index)


def _holds(runtime: Runtime, param: torch.Tensor) -> bool:
    ref = runtime.params.get(id(param))
    return ref is not None and ref() is param


def reset(model: torch.nn.Module) -> None:
    """Forget all cross-step state of a model: the next call starts a new generation in every stream."""
    for r in runtimes_of(model):
        r.reset()


def stats(model: torch.nn.Module) -> dict:
    """What ditopt did for a model: per compiled graph (oldest first) its regions, methods and variants, or
    the reason it fell back; per generation (in the order they started) the steps seen, the block calls
    computed and skipped, and one section per method."""
    found = runtimes_of(model)
    graphs = [r.stats() for r in found]
    generations = sorted((g for r in found if isinstance(r, Runtime) for g in r.clock.all_stats()),
                         key=lambda g: g.order)
    return {
        "graphs": graphs,
        "generations": [g.to_dict() for g in generations],
        "fallbacks": [g["fallback"] for g in graphs if "fallback" in g],
        "compiled_variants": sum(g["compiled_variants"] for g in graphs),
    }


def explain(model: torch.nn.Module) -> str:
    """What ditopt did for a model, in words: graphs, fallbacks and why, and the last generation."""
    s = stats(model)
    lines = []
    accelerated = [g for g in s["graphs"] if "blocks" in g]
    dynamic = [g for g in s["graphs"] if g.get("dynamic")]
    if not s["graphs"]:
        return "ditopt has compiled no graph of this model yet (call the compiled model first)."
    lines.append(f"{len(s['graphs']) - len(dynamic)} graph(s) compiled: {len(accelerated)} accelerated, "
                 f"{len(s['fallbacks'])} compiled unchanged (no acceleration).")
    for g in dynamic:
        lines.append(f"  a graph with symbolic sizes, specialised for {g['shapes_specialised']} input shape(s)")
    for reason in dict.fromkeys(s["fallbacks"]):
        lines.append(f"  not accelerated: {reason}")
    for g in accelerated:
        lines.append(f"  {g['blocks']} blocks in {g['regions']} regions, {g['compiled_variants']} compiled "
                     f"variants; methods on: {', '.join(g['methods']) or 'none (lossless)'}")
    for g in accelerated[-1:]:
        if "context_parallel" in g:
            cp = g["context_parallel"]
            lines.append(f"  context parallel: rank {cp['rank']} of {cp['ranks']}; decisions read metrics all-reduced "
                         f"over the ranks ({cp['decision_all_reduces']} all-reduces so far)")
    if s["generations"]:
        g = s["generations"][-1]
        calls = g["blocks_computed"] + g["blocks_skipped"]
        stream = f"stream {g['stream']}" + (f", {g['name']!r}" if g.get("name") else "")
        lines.append(f"last generation ({stream}): {g['steps']} steps, {g['blocks_computed']} of "
                     f"{calls} block calls computed, {g['blocks_skipped']} skipped")
        for name in accelerated[-1]["methods"] if accelerated else []:
            section = g.get(name, {})
            summary = {k: v for k, v in section.items() if not isinstance(v, (list, dict))}
            lines.append(f"  {name}: " + ", ".join(f"{k} {v}" for k, v in summary.items()))
    return "\n".join(lines)


@contextlib.contextmanager
def generation(model: torch.nn.Module):
    """Run one generation explicitly: state is reset on entry and on exit."""
    reset(model)
    try:
        yield
    finally:
        reset(model)
