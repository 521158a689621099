"""Block skipping, shared by the AdaCache and TeaCache methods: spans, guards, residual caches.

A span is a maximal run of blocks with nothing between them in the graph.  It is
skippable when every value it hands on is a residual update of one of its inputs
(out = in + sum of branches, reached from `out` through adds and pass-through ops
only): then a skipped step computes `out = in + cached`, with one summed residual
per stream for the whole span, exactly what running each block on its own cached
residual would give.

`insert_guards` puts `torch.ops.ditopt.skip_guard(x, span)` on each stream input at
the span's entry (a marker: the lowering replaces it by its input).  `SkipHook` is the
runtime part: it records each span's inputs, asks the method's `Policy` whether to
skip, writes `input + cached residual` for a skipped span and refreshes the residual
of a computed one.  A policy is only a decision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.fx as fx
from torch import Tensor

from ditopt.analysis import DiTStructure, example
from ditopt.method import Hook, Tag, tag, tensor_bytes
from ditopt.patterns import RESIDUAL_PATH, is_call, nodes_between

LIB = "ditopt"


@torch.library.custom_op(f"{LIB}::skip_guard", mutates_args=())
def skip_guard(x: Tensor, region: int) -> Tensor:
    """Marks the entry of a skippable span.  The lowering replaces it with a runtime decision;
    run unlowered (an exported graph executed as is) it is the identity."""
    return x.clone()


@skip_guard.register_fake
def _(x, region):
    return torch.empty_like(x)


@dataclass(eq=False)
class Span:
    """Adjacent blocks skipped together; `streams` = [(input node, output node)] in the parent graph."""

    id: int
    blocks: list[int]
    streams: list[tuple[fx.Node, fx.Node]]
    decide_after: fx.Node | None = None  # a probe inside the span that the decision waits for
    # outputs that are not residual updates (Wan VACE's conditioning states): replayed from the last computed step
    side: list[fx.Node] = field(default_factory=list)


def _runs_of_adjacent_blocks(gm: fx.GraphModule, structure: DiTStructure) -> list[list[int]]:
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    runs: list[list[int]] = []
    for b in structure.blocks:
        if runs and order[b.first_node] == order[structure.blocks[runs[-1][-1]].last_node] + 1:
            runs[-1].append(b.index)
        else:
            runs.append([b.index])
    return runs


def residual_source(out: fx.Node, inside: set, inputs: set) -> fx.Node | None:
    """The span input that `out` is a residual update of, or None if not exactly one."""
    want = example(out)
    found, frontier, seen = set(), [out], set()
    while frontier:
        node = frontier.pop()
        if node in seen:
            continue
        seen.add(node)
        if node in inputs:
            val = example(node)
            if val is not None and want is not None and val.shape == want.shape and val.dtype == want.dtype:
                found.add(node)
            continue
        if node in inside and is_call(node, RESIDUAL_PATH):
            frontier.extend(node.all_input_nodes)
    return found.pop() if len(found) == 1 else None


def residual_streams(nodes: list[fx.Node]) -> tuple[list[fx.Node], list[tuple[fx.Node, fx.Node]]]:
    """(every value the nodes hand on, the (input, output) pairs among them that are residual updates)."""
    inside = set(nodes)
    inputs = {a for n in nodes for a in n.all_input_nodes if a not in inside}
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]
    return outputs, [(src, out) for out in outputs if (src := residual_source(out, inside, inputs)) is not None]


def insert_guards(gm: fx.GraphModule, structure: DiTStructure, method: str, compute_first: int = 0,
                  compute_last: int = 0, span_blocks: int = 0) -> tuple[list[Span], list[dict]]:
    """Guard every skippable span; returns (spans, rejected runs of blocks with why).  The first
    `compute_first` and the last `compute_last` blocks of each run always compute (DBCache's Fn and Bn
    compute blocks): the span is what lies between, or, with `span_blocks`, consecutive spans of at most
    that many blocks (each then skipped on its own decision)."""
    spans, rejected = [], []
    pieces = []
    for run in _runs_of_adjacent_blocks(gm, structure):
        blocks = run[compute_first:len(run) - compute_last]
        if not blocks:
            rejected.append({"blocks": run, "reason": f"compute_first {compute_first} + compute_last {compute_last} "
                                                      f"leave none of its {len(run)} blocks to skip"})
            continue
        size = span_blocks or len(blocks)
        pieces += [blocks[i:i + size] for i in range(0, len(blocks), size)]
    for blocks in pieces:
        nodes = nodes_between(gm.graph, structure.blocks[blocks[0]].first_node, structure.blocks[blocks[-1]].last_node)
        inside = set(nodes)
        outputs, streams = residual_streams(nodes)
        side = [o for o in outputs if o not in {out for _, out in streams}]
        if not streams:
            rejected.append({"blocks": blocks, "reason": f"no output is a residual update of the span's inputs "
                                                         f"(outputs {[o.name for o in outputs]})"})
            continue
        odd = [o.name for o in side if example(o) is None or not example(o).is_floating_point()]
        if odd:
            rejected.append({"blocks": blocks, "reason": f"outputs {odd} are neither residual updates of the span's "
                                                         "inputs nor tensors a skipped step can replay"})
            continue
        span = Span(len(spans), blocks, streams, side=side)
        for src, _ in streams:
            with gm.graph.inserting_before(nodes[0]):
                guard = gm.graph.call_function(torch.ops.ditopt.skip_guard.default, (src, span.id))
            tag(guard, Tag(method, "guard", span, marker=True), like=nodes[0])
            guard.meta["example_value"] = example(src)
            for user in [u for u in list(src.users) if u in inside]:
                user.replace_input_with(src, guard)
        spans.append(span)
    gm.recompile()
    return spans, rejected


def no_spans_reason(rejected: list[dict]) -> str:
    """Why no span was guarded, from the runs insert_guards rejected."""
    reasons = sorted({r["reason"] for r in rejected})
    return "no span of blocks can be skipped: " + ("; ".join(reasons) if reasons else "the graph has no run of blocks")


def mark_probe(node: fx.Node, method: str, name: str, decide_here: bool = False) -> None:
    """The value a policy reads; with decide_here, the region ends after it (the decision waits for it)."""
    tag(node, Tag(method, "probe", name, split_after=decide_here, output=True))


def spans_report(spans: list[Span], rejected: list[dict]) -> dict:
    return {"spans": [{"id": s.id, "blocks": s.blocks, "streams": len(s.streams),
                       **({"replayed_side_outputs": [n.name for n in s.side]} if s.side else {})} for s in spans],
            "guards": sum(len(s.streams) for s in spans), "rejected": rejected}


def in_last_steps(last_steps: int, num_steps: int | None, step: int, timesteps: list[float]) -> bool:
    """Whether this call is one of the last `last_steps` of its generation: from `num_steps` when given,
    else from the timesteps (with the last decrement d, ceil(t / d) steps remain)."""
    if num_steps is not None:
        return step >= num_steps - last_steps
    if len(timesteps) < 2 or timesteps[-2] <= timesteps[-1]:
        return False
    remaining = math.ceil(timesteps[-1] / (timesteps[-2] - timesteps[-1]) - 1e-3)  # steps left, this one included
    return remaining <= last_steps


def relative_l1_sums(current: Tensor, cached: Tensor) -> Tensor:
    """[|current - cached|_1, |cached|_1]: sums, so that ranks holding shards of a sequence can add theirs
    (Call.all_sum) before dividing."""
    cur, old = current.float(), cached.float()
    return torch.stack([(cur - old).abs().sum(), old.abs().sum()])


def ratio(sums: Tensor) -> Tensor:
    """num / den of relative_l1_sums (or motion sums), along the last axis."""
    return sums[..., 0] / sums[..., 1].clamp_min(1e-12)


# ---------------------------------------------------------------------------
# the runtime part


def mean_per_step(series: list[list[float | None]]) -> list[float]:
    """Step by step, the mean of per-step signals recorded by several generations or streams (None as 0),
    over the steps all of them reached: what calibration reads."""
    return [sum((s[i] or 0.0) for s in series) / len(series) for i in range(min(map(len, series)))]


def extrapolation_weights(ts: list[float], t: float) -> list[float] | None:
    """Lagrange weights w_j with sum_j w_j f(ts[j]) = p(t), p the polynomial through the points
    (degree len(ts) - 1); None when two timesteps coincide."""
    if len(set(ts)) < len(ts):
        return None
    weights = []
    for j, tj in enumerate(ts):
        w = 1.0
        for m, tm in enumerate(ts):
            if m != j:
                w *= (t - tm) / (tj - tm)
        weights.append(w)
    return weights


def keep_residuals(points: list, t: float | None, residuals: list[Tensor], forecast: int) -> None:
    """Add a computed step's residuals to a span's history, keeping the forecast + 1 newest."""
    points.append((t, residuals))
    del points[:-(forecast + 1)]


def forecast_residuals(points: list[tuple[float | None, list[Tensor]]], t: float | None) -> list[Tensor]:
    """What a skipped span adds to its inputs, from its last computed steps [(t, residual per stream)], newest
    last: the last residual, or (forecast) the polynomial through them, in the timestep, evaluated at t."""
    ts = [tp for tp, _ in points]
    weights = extrapolation_weights(ts, t) if len(points) > 1 and None not in (t, *ts) else None
    if weights is None:
        return points[-1][1]
    return [sum(w * r[i] for w, (_, r) in zip(weights, points)) for i in range(len(points[-1][1]))]


class Policy(Protocol):
    """Decides, for one stream, which spans to skip at this call."""

    def new_state(self) -> Any: ...

    def begin_call(self, call, state) -> None: ...

    def should_skip(self, call, state, span: "SpanPlan", probes: dict[str, Tensor]) -> bool: ...

    def end_call(self, call, state, probes: dict[str, Tensor]) -> None: ...

    def stats(self, state) -> dict: ...


@dataclass
class SpanPlan:
    """A guarded span in slot terms."""

    id: int
    first: int  # region index
    last: int
    streams: list[tuple[int, int]]  # (input slot, output slot)
    free_after: list[int]  # slots read last inside the span, to free when it is skipped
    decide_at: int  # the region before which the decision is taken (the first, or the one after a probe)
    side_slots: list[int] = field(default_factory=list)  # side outputs, replayed when the span is skipped


@dataclass
class SkipState:
    policy: Any
    # span -> its last computed steps, newest last (one, or forecast + 1): (t, residual per stream)
    computed: dict[int, list[tuple[float | None, list[Tensor]]]] = field(default_factory=dict)
    inputs: dict[int, list[Tensor]] = field(default_factory=dict)  # span -> this call's inputs
    probes: dict[str, Tensor] = field(default_factory=dict)
    side: dict[int, list[Tensor]] = field(default_factory=dict)  # span -> its side outputs at its last computed step


def plan_spans(lowered, spans: list[Span]) -> list[SpanPlan]:
    """The spans whose guards survived into the lowered graph, in slot terms."""
    plans = []
    for span in spans:
        members = [r for r in lowered.regions if r.block is not None and r.block in span.blocks]
        if not members:
            continue
        streams = [(lowered.slot[i], lowered.slot[o]) for i, o in span.streams]
        side = [lowered.slot[n] for n in span.side]
        free = sorted({s for r in members for s in r.free_after} - {dst for _, dst in streams} - set(side))
        decide_at = members[0].index
        if span.decide_after is not None:
            decide_at = next((r.index + 1 for r in members if span.decide_after in r.outputs), decide_at)
        plans.append(SpanPlan(span.id, members[0].index, members[-1].index, streams, free, decide_at, side))
    return plans


def probe_slots(lowered, method: str) -> dict[int, list[tuple[str, int]]]:
    """region index -> [(probe name, slot)] for the probes `method` marked."""
    at: dict[int, list[tuple[str, int]]] = {}
    for node, t in lowered.tagged(method, "probe"):
        if node in lowered.slot:
            at.setdefault(lowered.region_of(node), []).append((t.payload, lowered.slot[node]))
    return at


def guarded_spans(lowered, method: str) -> list[Span]:
    """The spans `method`'s guards stood for, in id order."""
    found = {t.payload.id: t.payload for _, t in lowered.tagged(method, "guard")}
    return [found[i] for i in sorted(found)]


class SkipHook(Hook):
    """Runs a method's skip decisions on the guarded spans of one graph."""

    def __init__(self, name: str, policy: Policy, spans: list[SpanPlan], probes: dict[int, list[tuple[str, int]]],
                 forecast: int = 0):
        self.name = name
        self.policy = policy
        self.forecast = forecast  # 0: a skipped span replays its last residual; 1, 2: extrapolates it
        self.spans = spans
        self._entry = {s.first: s for s in spans}
        self._decide = {s.decide_at: s for s in spans}
        self._exit = {s.last: s for s in spans}
        self._probes = probes
        self._cached: set[int] | None = None  # spans that keep a residual (None: all); fewer under a memory budget

    def cuts(self) -> set[int]:
        # Probes are region outputs no region frees: reading them once a fused run has computed is the same.
        return {i for s in self.spans for i in (s.first, s.decide_at, s.last + 1)}

    def claims(self) -> set[int]:
        return set()

    def new_state(self) -> SkipState:
        return SkipState(self.policy.new_state())

    def begin_call(self, call) -> None:
        st = call.state(self)
        st.probes = {}
        self.policy.begin_call(call, st.policy)

    def before_region(self, call, index: int) -> int | None:
        st = call.state(self)
        span = self._entry.get(index)
        if span is not None:
            st.inputs[span.id] = [call.values[src] for src, _ in span.streams]
        span = self._decide.get(index)
        if span is None or span.id not in st.inputs:
            return None
        wants = self.policy.should_skip(call, st.policy, span, st.probes)  # the policy sees every step
        if not wants or span.id not in st.computed or (span.side_slots and span.id not in st.side):
            return None
        residuals = forecast_residuals(st.computed[span.id], call.t)
        for (_, dst), x, residual in zip(span.streams, st.inputs.pop(span.id), residuals):
            call.values[dst] = x + residual
        for slot, value in zip(span.side_slots, st.side.get(span.id, ())):
            call.values[slot] = value
        call.free(span.free_after)
        return span.last + 1

    def after_region(self, call, index: int) -> int | None:
        st = call.state(self)
        for name, slot in self._probes.get(index, ()):
            st.probes[name] = call.values[slot]
        span = self._exit.get(index)
        if span is not None and span.id in st.inputs and self._cached is not None and span.id not in self._cached:
            st.inputs.pop(span.id)  # shed under the memory budget: this span always computes
        elif span is not None and span.id in st.inputs:
            residuals = [call.values[dst] - x for (_, dst), x in zip(span.streams, st.inputs.pop(span.id))]
            keep_residuals(st.computed.setdefault(span.id, []), call.t, residuals, self.forecast)
            if span.side_slots:
                st.side[span.id] = [call.values[slot] for slot in span.side_slots]
        return None

    def end_call(self, call) -> None:
        st = call.state(self)
        self.policy.end_call(call, st.policy, st.probes)

    def stats(self, state: SkipState) -> dict:
        cache = tensor_bytes([ts for points in state.computed.values() for _, ts in points])
        return {**self.policy.stats(state.policy), "cache_mb": round(cache / 2**20, 3)}

    def cache_bytes(self, state: SkipState) -> int:
        return tensor_bytes([ts for points in state.computed.values() for _, ts in points], state.side, state.policy)

    def shed(self, states: list[SkipState]) -> str | None:
        """First a lower forecast order (fewer residuals per span), then fewer spans that keep one."""
        if self.forecast > 0:
            self.forecast -= 1
            for st in states:
                for points in st.computed.values():
                    del points[:-(self.forecast + 1)]
            return f"{self.name}: forecast order lowered to {self.forecast}"
        cached = sorted(self._cached if self._cached is not None else (s.id for s in self.spans))
        if not cached:
            return None
        self._cached = set(cached[:-1])
        for st in states:
            st.computed.pop(cached[-1], None)
            st.side.pop(cached[-1], None)
        return (f"{self.name}: {len(self._cached)} of {len(self.spans)} spans keep a residual to skip with "
                "(the others always compute)")
