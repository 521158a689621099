"""Runtime of a ditopt-compiled graph: the step clock, streams, generations, region calls.

All state that lives across denoising steps lives here, in plain Python and
tensors held by this object, never in attributes Dynamo guards on: a
sampling loop never recompiles.

State is kept per model: models of one class (Wan 2.2's two transformers) share one Dynamo graph,
and the parameters each call passes say which model it is (`ModelState`).

Step clock (docs/architecture.md, "Steps and generations"): a call's step comes from the caller where it
says so (diffusers' `cache_context(..., step_index=i)`; `ditopt.generation(model)` counts calls), else
from the timestep input: a generation runs its timesteps one way, falling or rising, and a new one starts
where the direction turns or a timestep repeats.  A call with neither starts a new generation every time
(nothing cached can cross into another generation).  Several calls at one timestep (separate cond and
uncond passes) are separate streams, each with its own caches and decisions: named by diffusers'
`cache_context` when the call runs in one (ditopt/contexts.py), else by their order at that timestep.
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

from . import contexts
from .diagnostics import failure_reason, warn_once
from .lowering import Lowered, Region, VariantCache, fill_template, fuse_regions
from .method import Hook


_GENERATION_IDS = itertools.count()
UNCLEAR_STEPS = ("ditopt: this graph cannot tell the denoising steps of its calls apart (it takes no timestep, and "
                 "the caller gives no diffusers cache_context step_index): every call runs as the first step of a "
                 "generation, so nothing is skipped or reused; run the loop inside `with ditopt.generation(model):` "
                 "to count its calls as steps")


@dataclass
class GenerationStats:
    """One generation of one stream: core counters, and one section per method (its hook's stats)."""

    stream: int
    generation: int
    name: str | None = None  # the diffusers cache_context the stream's calls ran in, if any
    steps: int = 0
    blocks_computed: int = 0
    blocks_skipped: int = 0
    peak_cache_bytes: int = 0  # the most this stream's method caches held after a call of this generation
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
            "blocks_computed": self.blocks_computed, "blocks_skipped": self.blocks_skipped,
            "cache_mb": round(sum(s.get("cache_bytes", 0) for s in sections.values()) / 2**20, 3),
            "peak_cache_mb": round(self.peak_cache_bytes / 2**20, 3), **sections,
        }


@dataclass
class StreamState:
    """One stream of calls: its clock position and each hook's state for the current generation."""

    index: int  # order of first appearance: 0 is the stream that leads at each timestep
    name: str | None = None
    generation: int = -1
    step: int = -1  # index of the current call within its generation
    last_t: float | None = None
    direction: int = 0  # +1 rising or -1 falling timesteps in this generation, 0 until its second step
    last_index: int | None = None  # the caller's step index of the last call (cache_context step_index)
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

    def observe(self, t: float | None, name: str | None = None, step_index: int | None = None,
                explicit: bool = False) -> StreamState:
        """The stream of a call at timestep `t`, run in the cache context `name` (None: outside one) at the
        caller's `step_index` (None: not said); `explicit`: inside `ditopt.generation`, calls are steps."""
        if t is not None and t == self._prev_t:
            self._call_index += 1
        else:
            self._call_index = 0
        self._prev_t = t
        key = self._call_index if name is None else name
        stream = self.streams.get(key)
        if stream is None:
            stream = self.streams[key] = StreamState(len(self.streams), name)
        if stream.stats is None or (not explicit and self._starts_generation(stream, t, step_index)):
            self._new_generation(stream)
        elif t is not None and stream.last_t is not None and not stream.direction and t != stream.last_t:
            stream.direction = 1 if t > stream.last_t else -1
        stream.step += 1
        stream.last_t = t if t is not None else stream.last_t
        stream.last_index = step_index
        if t is not None:
            stream.timesteps.append(t)
        stream.stats.steps += 1
        return stream

    @staticmethod
    def _starts_generation(stream: StreamState, t: float | None, step_index: int | None) -> bool:
        if step_index is not None:  # the caller says where the loop is
            return step_index == 0 or (stream.last_index is not None and step_index < stream.last_index)
        if t is None or stream.last_t is None:
            return True  # no way to tell steps apart: every call is a first step, so nothing is reused
        if t == stream.last_t:
            return True
        return bool(stream.direction) and (1 if t > stream.last_t else -1) != stream.direction

    def stream(self, index: int) -> StreamState:
        """The stream that appeared `index`-th (0: the one that leads at each timestep)."""
        return next(s for s in self.streams.values() if s.index == index)

    def _new_generation(self, stream: StreamState) -> None:
        if stream.stats is not None:
            stream.stats.freeze()
            self.finished.append(stream.stats)
        stream.generation += 1  # every hook's state lives in stream.state: a new generation starts empty
        stream.step = -1
        stream.direction = 0
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


@dataclass
class ModelState:
    """What a runtime keeps for one model calling its graph: its step clock and where its cache context is
    read.  `key` is the parameter (in the graph's inputs) that identifies the model."""

    key: "weakref.ref | None"
    clock: StepClock = field(default_factory=StepClock)
    context: Any = None  # a contexts.CacheContextReader, or None
    owner: Any = None  # weak reference to the model's module where it is known (the forward-wide timestep store)
    calls: int = 0

    def observe(self, t: float | None, unclear: str) -> StreamState:
        """This call's stream and step (its clock observes the timestep `t`, the cache context it runs in, and
        whether it runs inside `ditopt.generation`); `unclear` is the warning, given once, when none of them
        tells the steps apart."""
        self.calls += 1
        name = self.context.name if self.context is not None else None
        step_index = self.context.step_index if self.context is not None else None
        if name is None and self.calls == 1:
            self.context = None  # its first call ran outside a cache context: streams are counted, always
        explicit = self.explicit
        if t is None and step_index is None and not explicit and self.calls == 2:
            warn_once(unclear)
        return self.clock.observe(t, name, step_index, explicit)

    @property
    def explicit(self) -> bool:
        """Inside `ditopt.generation(model)`: calls are the steps of one generation."""
        param = self.key() if self.key is not None else None
        return param is not None and any(id(param) in ids for ids in _EXPLICIT.values())


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

    def __init__(self, lowered: Lowered, hooks: list[Hook], config, report: dict, context=None, group=None,
                 plain: Callable[[], Callable] | None = None):
        self.lowered = lowered
        self._plain = plain  # compiles the graph as Dynamo gave it: what runs if ditopt's own code fails
        self.plain_fn: Callable | None = None
        self.gave_up: str | None = None  # why this graph runs plain from now on
        self.group = group  # a parallel.RankGroup under context parallelism: decisions read reduced metrics
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
        self.models: dict[int, ModelState] = {}  # id of the identifying parameter -> that model's state
        self.param_slot: int | None = None  # set by `register`: where the graph takes its first parameter
        self._compiled_context = context
        self.variants = VariantCache(config)
        self.num_slots = max((s for r in regions for s in r.output_slots), default=0) + 1
        self._fns: dict[tuple, Callable] = {}
        self.params: dict[int, weakref.ref] = {}  # id -> weak reference, to recognise the model
        self.calls = 0
        self.region_calls = 0  # compiled region code run (hooks' reuse of cached outputs not counted)
        self._running: Region | None = None  # the region being run (a failure's warning names it)
        self.shed: list[str] = []  # what the methods gave up to keep max_cache_mb, in order

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
        """One forward of the model's graph: the same arguments and result as the graph Dynamo traced.

        If ditopt's own code fails during a call (a region's lazy compile, a hook), the call runs again as
        the unaccelerated graph, and so does every later call: one warning names the exception and region.
        An exception the plain graph raises too is the model's own, and reaches the caller as it would."""
        if self.plain_fn is not None:
            return self.plain_fn(*args)
        try:
            return self._counted(*args)
        except Exception as err:  # noqa: BLE001 - the safety net (docs/architecture.md)
            if self._plain is None:
                raise
            self._give_up(err)
            return self.plain_fn(*args)

    def _give_up(self, err: Exception) -> None:
        region = self._running.name if self._running is not None else None
        self.gave_up = failure_reason(err, f"the runtime ({'region ' + region if region else 'between regions'})")
        self.plain_fn = self._plain()
        warn_once(f"ditopt: {self.gave_up}; this graph runs with plain {self.config.lowering} and no "
                  "acceleration from now on")

    def _counted(self, *args):
        return counted(self._forward, args, self.group)

    def model_state(self, args) -> ModelState:
        """The state of the model making this call (found by the identity of a parameter it passes)."""
        param = args[self.param_slot] if self.param_slot is not None else None
        model = self.models.get(id(param))
        if model is None or (model.key is not None and model.key() is not param):
            owner = model_of(self, param)
            context = contexts.reader_for(owner()) if owner is not None else self._compiled_context
            model = self.models[id(param)] = ModelState(weakref.ref(param) if param is not None else None,
                                                        context=context, owner=owner)
        return model

    @property
    def clock(self) -> StepClock:
        """The step clock of the model that called first (the only one, unless models share this graph)."""
        return next(iter(self.models.values())).clock if self.models else StepClock()

    def _forward(self, *args):
        self.calls += 1
        model = self.model_state(args)
        stream = model.observe(read_timestep(args, self.timestep_slot, model.owner), UNCLEAR_STEPS)
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
            region = self._running = self.fused.get(i) or self.regions[i]
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
            stream.stats.live = lambda: {h.name: {**h.stats(stream.state[h.name]),
                                                  "cache_bytes": h.cache_bytes(stream.state[h.name])}
                                         for h in self.hooks}
        held = sum(h.cache_bytes(stream.state[h.name]) for h in self.hooks)
        stream.stats.peak_cache_bytes = max(stream.stats.peak_cache_bytes, held)
        if self.config.max_cache_mb is not None:
            self._keep_to_budget()
        return fill_template(self.template, values)

    def _keep_to_budget(self) -> None:
        """While the caches of every model and stream of this graph hold more than `max_cache_mb`, the method
        holding most gives something up (Hook.shed), and the warning says what, once."""
        budget = self.config.max_cache_mb * 2**20
        while True:
            states = {h.name: [s.state[h.name] for m in self.models.values() for s in m.clock.streams.values()
                               if h.name in s.state] for h in self.hooks}
            held = {h: sum(h.cache_bytes(st) for st in states[h.name]) for h in self.hooks}
            total = sum(held.values())
            if total <= budget:
                return
            said = next((w for h in sorted(self.hooks, key=lambda h: -held[h]) if held[h]
                         for w in [h.shed(states[h.name])] if w), None)
            message = (f"ditopt: the method caches of this graph hold {total / 2**20:.3f} MiB, over max_cache_mb "
                       f"{self.config.max_cache_mb}: ")
            if said is None:
                warn_once(message + "no method has anything left to give up; the budget is not kept")
                return
            if not self.shed:  # one warning; what follows is listed in ditopt.stats (graphs[i]["shed"])
                warn_once(message + said + " (any further reduction is listed in ditopt.stats(model)'s \"shed\")")
            self.shed.append(said)

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

    def models_of(self, params: set[int] | None) -> list[ModelState]:
        """The states of the models among `params` (ids of parameters; None: every model)."""
        return [m for k, m in self.models.items() if params is None or k in params]

    def generations(self, params: set[int] | None = None) -> list[GenerationStats]:
        return [g for m in self.models_of(params) for g in m.clock.all_stats()]

    def stats(self, params: set[int] | None = None) -> dict:
        """This graph's figures; `params` (ids of a model's parameters) keeps that model's generations."""
        return {
            **({"fallback": self.gave_up} if self.gave_up else {}),
            "calls": sum(m.calls for m in self.models_of(params)) if params is not None else self.calls,
            "blocks": len(self.structure.blocks),
            "regions": len(self.regions),
            "fused": [[r.index, r.last] for r in self.fused.values()],  # runs of regions compiled as one
            "region_calls": self.region_calls,
            "methods": [h.name for h in self.hooks],
            "compiled_variants": len(self.variants.variants),
            **({"context_parallel": {"ranks": self.group.size, "rank": self.group.rank,
                                     "decision_all_reduces": self.group.collectives}} if self.group else {}),
            "compile_seconds": round(self.variants.compile_seconds, 3),
            **({"max_cache_mb": self.config.max_cache_mb, "shed": list(self.shed)}
               if self.config.max_cache_mb is not None else {}),
            "generations": [g.to_dict() for g in self.generations(params)],
        }

    def reset(self, params: set[int] | None = None) -> None:
        for m in self.models_of(params):
            m.clock.reset()


def model_of(holder: "Runtime | Fallback", param: torch.Tensor | None) -> "weakref.ref | None":
    """A weak reference to the model `param` belongs to (None if unknown); the parameter is noted in
    `holder.params`, so that ditopt.stats(that model) finds the holder.  Once per model, not per call."""
    if param is not None:
        holder.params[id(param)] = weakref.ref(param)
    owner = contexts.owner_of(param)
    return weakref.ref(owner) if owner is not None else None


# The timestep a graph of a forward took, for the graphs after it that take none (a graph break put the
# timestep embedding in an earlier graph): kept per model, so that no model reads another's.
_FORWARD_TIMESTEP: "weakref.WeakKeyDictionary[torch.nn.Module, Any]" = weakref.WeakKeyDictionary()


def read_timestep(args, slot: int | None, owner: "weakref.ref | None" = None) -> float | None:
    """The timestep of this call, as one number: the graph's own input (the largest value of a per-sample or
    per-token timestep: a per-token one is 0 on conditioning frames), or, for a graph without one, what an
    earlier graph of the same model's forward took.  One host read, made where the step is needed."""
    module = owner() if owner is not None else None
    if slot is not None:
        t = args[slot]
        if module is not None:
            _FORWARD_TIMESTEP[module] = t
    else:
        t = _FORWARD_TIMESTEP.get(module) if module is not None else None
    if isinstance(t, torch.Tensor):
        t = float(t.detach().amax()) if t.numel() > 1 else float(t.reshape(-1)[0])
        if module is not None:
            _FORWARD_TIMESTEP[module] = t
    return t


def keep_timestep(args, slot: int, owner: "weakref.ref | None") -> None:
    """What a graph compiled without acceleration does with its timestep: keep it for the graphs of the same
    model's forward after it, unread (no host read where nothing needs the step)."""
    module = owner() if owner is not None else None
    if module is not None:
        _FORWARD_TIMESTEP[module] = args[slot]


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
        self.param_slot: int | None = None
        self.owners: dict[int, Any] = {}  # id of the identifying parameter -> weak ref to its model, or None
        self.calls = 0

    def __call__(self, *args):
        self.calls += 1
        if self.timestep_slot is not None:
            keep_timestep(args, self.timestep_slot, self._owner(args))
        return counted(self.fn, args)  # count_flops counts a forward's every graph

    def _owner(self, args):
        param = args[self.param_slot] if self.param_slot is not None else None
        if id(param) not in self.owners:
            self.owners[id(param)] = model_of(self, param)
        return self.owners[id(param)]

    def stats(self, params: set[int] | None = None) -> dict:
        return {"calls": self.calls, "fallback": self.reason, "compiled_variants": 0, "generations": []}

    def reset(self, params: set[int] | None = None) -> None:
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


def counted(forward: Callable, args, group=None):
    """forward(*args), its FLOPs and collectives added to every open `count_flops` tally."""
    if not _FLOP_TALLIES:
        return forward(*args)
    from torch.utils.flop_counter import FlopCounterMode

    counter, collectives = FlopCounterMode(display=False), _CollectiveCounter()
    before = (group.collectives, group.bytes) if group is not None else None
    with counter, collectives:
        out = forward(*args)
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
    for i, x in enumerate(example_inputs):
        if isinstance(x, torch.nn.Parameter):
            runtime.params[id(x)] = weakref.ref(x)
            if getattr(runtime, "param_slot", 0) is None:
                runtime.param_slot = i  # the first parameter: which model a call is, where models share the graph
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


def _param_ids(model: torch.nn.Module) -> set[int]:
    return {id(p) for p in getattr(model, "_orig_mod", model).parameters()}


def reset(model: torch.nn.Module) -> None:
    """Forget all cross-step state of a model: the next call starts a new generation in every stream."""
    params = _param_ids(model)
    for r in runtimes_of(model):
        r.reset(params)


def stats(model: torch.nn.Module) -> dict:
    """What ditopt did for a model: per compiled graph (oldest first) its regions, methods and variants, or
    the reason it fell back; per generation (in the order they started) the steps seen, the block calls
    computed and skipped, and one section per method.  Where models share a graph, only this model's calls."""
    found = runtimes_of(model)
    params = _param_ids(model)
    graphs = [r.stats(params) for r in found]
    # graphs of one block list (blocks compiled one by one) share their generations: each is listed once
    generations = sorted({id(g): g for r in found if hasattr(r, "generations") for g in r.generations(params)}.values(),
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
    accelerated = [g for g in s["graphs"] if "blocks" in g and "fallback" not in g]
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
        if "chained_blocks" in g:  # blocks compiled one by one (passes/block_chain.py)
            spans = "; ".join(f"{c['list']}: spans {c['spans']}" for c in g["chained_blocks"])
            lines.append(f"  {g['blocks']} blocks compiled one by one, skipped across their graphs ({spans}); "
                         f"methods on: {', '.join(g['methods'])}")
            continue
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
    """Run one generation explicitly: state is reset on entry and on exit, and every call inside is the next
    step of it (whatever the timesteps say)."""
    reset(model)
    _EXPLICIT[model] = _param_ids(model)
    try:
        yield
    finally:
        _EXPLICIT.pop(model, None)
        reset(model)


# Models inside `generation()`, with their parameters' ids (a model's state reads whether it is in one)
_EXPLICIT: "weakref.WeakKeyDictionary[torch.nn.Module, set[int]]" = weakref.WeakKeyDictionary()
