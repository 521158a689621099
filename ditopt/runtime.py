"""Runtime of a ditopt-compiled graph: the step clock, streams, generations, region calls.

All state that lives across denoising steps lives here, in plain Python and
tensors held by this object, never in attributes Dynamo guards on: a
sampling loop never recompiles.

Step clock: the timestep input is read once per call.  A new generation of a
stream starts when its timestep does not decrease.  Several calls at one
timestep (separate cond and uncond passes) are separate streams, each with
its own caches and decisions.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch

from .analysis import DiTStructure
from .config import Config
from .lowering import Region, SpanPlan, VariantCache, fill_template


@dataclass
class GenerationStats:
    stream: int
    generation: int
    steps: int = 0
    blocks_computed: int = 0
    blocks_skipped: int = 0
    method: dict = field(default_factory=dict)  # per-method counters and decisions

    def to_dict(self) -> dict:
        return {
            "stream": self.stream, "generation": self.generation, "steps": self.steps,
            "blocks_computed": self.blocks_computed, "blocks_skipped": self.blocks_skipped, **self.method,
        }


@dataclass
class StreamState:
    """One stream of calls: its clock position and the method state that belongs to it."""

    index: int
    generation: int = -1
    step: int = -1  # index of the current call within its generation
    last_t: float | None = None
    timesteps: list[float] = field(default_factory=list)
    state: dict = field(default_factory=dict)  # method name -> that method's state for this stream
    stats: GenerationStats | None = None


class StepClock:
    """Assigns each call to a stream and a step; starts generations."""

    def __init__(self):
        self.streams: dict[int, StreamState] = {}
        self._prev_t: float | None = None
        self._call_index = 0
        self.finished: list[GenerationStats] = []

    def observe(self, t: float | None) -> StreamState:
        if t is not None and t == self._prev_t:
            self._call_index += 1
        else:
            self._call_index = 0
        self._prev_t = t
        stream = self.streams.setdefault(self._call_index, StreamState(self._call_index))
        if stream.stats is None or (t is not None and stream.last_t is not None and t >= stream.last_t):
            self._new_generation(stream)
        stream.step += 1
        stream.last_t = t if t is not None else stream.last_t
        if t is not None:
            stream.timesteps.append(t)
        stream.stats.steps += 1
        return stream

    def _new_generation(self, stream: StreamState) -> None:
        if stream.stats is not None:
            self.finished.append(stream.stats)
        stream.generation += 1  # caches and decisions live in stream.state: a new generation starts empty
        stream.step = -1
        stream.timesteps = []
        stream.state = {}
        stream.stats = GenerationStats(stream.index, stream.generation)

    def reset(self) -> None:
        """End every stream's generation: the next call of each starts a fresh one."""
        for s in self.streams.values():
            if s.stats is not None:
                self.finished.append(s.stats)
        self.streams = {}
        self._prev_t = None
        self._call_index = 0

    def all_stats(self) -> list[GenerationStats]:
        return self.finished + [s.stats for s in self.streams.values() if s.stats is not None]


class SkipPolicy(Protocol):
    """Decides, for one stream, which spans to skip at this call. The guard machinery (span
    residual caches, probes, statistics) belongs to the runtime, so a policy is only a decision."""

    name: str

    def begin_call(self, runtime: "Runtime", stream: StreamState) -> None: ...

    def should_skip(self, runtime: "Runtime", span: SpanPlan, stream: StreamState, probes: dict) -> bool:
        """Called at a span's entry, or once the probe the span waits for is computed."""

    def end_call(self, runtime: "Runtime", stream: StreamState, probes: dict[str, torch.Tensor]) -> None: ...


class Runtime:
    """The callable the backend hands to Dynamo for one graph."""

    def __init__(self, structure: DiTStructure, regions: list[Region], template: Any, config: Config,
                 timestep_slot: int | None, spans: list[SpanPlan], probe_slots: dict[str, int],
                 policies: list[SkipPolicy], report: dict, planner=None, toca=None):
        self.structure = structure
        self.regions = regions
        self.template = template
        self.config = config
        self.timestep_slot = timestep_slot
        self.spans = spans
        self._span_at = {sp.first: sp for sp in spans}
        self._span_end = {sp.last: sp for sp in spans}
        self.probe_slots = probe_slots
        self._probes_at: dict[int, list[tuple[str, int]]] = {}
        for name, slot in probe_slots.items():
            at = next(r.index for r in regions if slot in r.output_slots)
            self._probes_at.setdefault(at, []).append((name, slot))
        self._block_ends = {r.index for r in regions
                            if r.kind == "block" and (r.index + 1 == len(regions) or regions[r.index + 1].block != r.block)}
        self.policies = policies
        self.planner = planner  # AsymRnR's MatchPlanner: runs the "match" regions
        self.toca = toca  # ToCa's TocaPlanner: runs the block regions that hold cached sites
        self.report = report
        # A region that reads a match plan compiles one variant per reduced length: key its code by those.
        match_slots = {s for r in regions if r.kind == "match" for s in r.output_slots}
        self._plan_inputs = {r.index: [i for i, s in enumerate(r.input_slots) if s in match_slots] for r in regions}
        self.clock = StepClock()
        self.variants = VariantCache(config)
        self.num_slots = max((s for r in regions for s in r.output_slots), default=0) + 1
        self._fns: dict[tuple, Callable] = {}
        self.params: dict[int, weakref.ref] = {}  # id -> weak reference, to recognise the model
        self.calls = 0

    # -- execution -----------------------------------------------------------

    def __call__(self, *args):
        """One forward of the model's graph: the same arguments and result as the graph Dynamo traced."""
        if not _FLOP_TALLIES:
            return self._run(*args)
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            out = self._run(*args)
        attention = attention_flops(counter)
        for tally in _FLOP_TALLIES:
            tally.flops += counter.get_total_flops()
            tally.attention += attention
        return out

    def _run(self, *args):
        self.calls += 1
        t = float(args[self.timestep_slot].reshape(-1)[0]) if self.timestep_slot is not None else None
        stream = self.clock.observe(t)
        for policy in self.policies:
            policy.begin_call(self, stream)
        values: list[Any] = list(args) + [None] * max(0, self.num_slots - len(args))
        caches = stream.state.setdefault("skip_cache", {})
        probes: dict[str, torch.Tensor] = {}
        span_inputs: dict[int, list] = {}
        pending: SpanPlan | None = None  # a span whose decision waits for a probe inside it
        i = 0
        while i < len(self.regions):
            span = self._span_at.get(i)
            if span is not None and self.policies:
                span_inputs[span.id] = [values[src] for src, _ in span.streams]
                if span.decide_after is None:
                    if self._skip(span, stream, caches, probes):
                        i = self._apply_skip(span, stream, caches, values, span_inputs)
                        continue
                else:
                    pending = span
            region = self.regions[i]
            inputs = [values[s] for s in region.input_slots]
            if region.kind == "match":
                outputs = self.planner.plan(region.index, inputs[0], stream)
            elif self.toca is not None and region.index in self.toca.sites:
                base = self._key(region, inputs)
                outputs = self.toca.run(region, inputs, stream,
                                        lambda key, gm, args: self._compiled((base, key), gm, args))
            else:
                outputs = self.run_region(region, inputs)
            for s, v in zip(region.output_slots, outputs):
                values[s] = v
            for s in region.free_after:
                values[s] = None
            for name, slot in self._probes_at.get(i, ()):
                probes[name] = values[slot]
            if pending is not None and pending.decide_after == i:
                span, pending = pending, None
                if self._skip(span, stream, caches, probes):
                    i = self._apply_skip(span, stream, caches, values, span_inputs)
                    continue
            if i in self._block_ends:
                stream.stats.blocks_computed += 1
            ended = self._span_end.get(i)
            if ended is not None and ended.id in span_inputs:
                caches[ended.id] = [values[dst] - x for (_, dst), x in zip(ended.streams, span_inputs.pop(ended.id))]
            i += 1
        for policy in self.policies:
            policy.end_call(self, stream, probes)
        stream.stats.method["cache_mb"] = round(
            sum(t.numel() * t.element_size() for ts in caches.values() for t in ts) / 2**20, 3)
        return fill_template(self.template, values)

    def _skip(self, span: SpanPlan, stream: StreamState, caches: dict, probes: dict) -> bool:
        wants = [p.should_skip(self, span, stream, probes) for p in self.policies]  # each policy sees every step
        return span.id in caches and any(wants)

    def _apply_skip(self, span: SpanPlan, stream: StreamState, caches: dict, values: list, span_inputs: dict) -> int:
        """Outputs of a skipped span: each stream's input plus its cached residual. Returns the next region."""
        inputs = span_inputs.pop(span.id)
        for (_, dst), x, residual in zip(span.streams, inputs, caches[span.id]):
            values[dst] = x + residual
        for s in span.free_after:
            values[s] = None
        stream.stats.blocks_skipped += span.num_blocks
        return span.last + 1

    def run_region(self, region: Region, inputs: list) -> list:
        """Run a region's compiled code (compiled on first use, shared between identical regions)."""
        return self._compiled(self._key(region, inputs), region.gm, inputs)(*inputs)

    def _key(self, region: Region, inputs: list) -> tuple:
        """A region's code key: its index, and the reduced lengths of the match plans it reads."""
        return (region.index, *(inputs[p].shape[-1] for p in self._plan_inputs[region.index]))

    def _compiled(self, key, gm, inputs: list) -> Callable:
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
            "skip_spans": len(self.spans),
            "compiled_variants": len(self.variants.variants),
            "compile_seconds": round(self.variants.compile_seconds, 3),
            "generations": [g.to_dict() for g in self.clock.all_stats()],
        }

    def reset(self) -> None:
        self.clock.reset()


# ---------------------------------------------------------------------------
# counting FLOPs


@dataclass
class FlopTally:
    flops: int = 0
    attention: int = 0  # of which in attention cores (scaled-dot-product ops)


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


def register(runtime: Runtime, example_inputs) -> None:
    for x in example_inputs:
        if isinstance(x, torch.nn.Parameter):
            runtime.params[id(x)] = weakref.ref(x)
    _RUNTIMES.add(runtime)


def runtimes_of(model: torch.nn.Module) -> list[Runtime]:
    """The runtimes ditopt built for a model (or its torch.compile wrapper), oldest first."""
    model = getattr(model, "_orig_mod", model)
    params = list(model.parameters())
    found = [r for r in list(_RUNTIMES) if any(_holds(r, p) for p in params)]
    return sorted(found, key=id)


def _holds(runtime: Runtime, param: torch.Tensor) -> bool:
    ref = runtime.params.get(id(param))
    return ref is not None and ref() is param


def reset(model: torch.nn.Module) -> None:
    """Forget all cross-step state of a model: the next call starts a new generation in every stream."""
    for r in runtimes_of(model):
        r.reset()


def stats(model: torch.nn.Module) -> dict:
    """What ditopt did for a model: per compiled graph, its regions and variants, and per generation
    the steps seen and, per method, what was skipped, reduced or reused."""
    graphs = [r.stats() for r in runtimes_of(model)]
    return {
        "graphs": graphs,
        "generations": [g for r in graphs for g in r["generations"]],
        "compiled_variants": sum(g["compiled_variants"] for g in graphs),
    }


@contextlib.contextmanager
def generation(model: torch.nn.Module):
    """Run one generation explicitly: state is reset on entry and on exit."""
    reset(model)
    try:
        yield
    finally:
        reset(model)
