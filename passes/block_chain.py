"""Block skipping across blocks compiled one graph each.

diffusers' `compile_repeated_blocks`, and a forward that a graph break cuts before its blocks
(HunyuanVideo 1.5), hand ditopt one Dynamo graph per block: usually one graph that every block of a
list calls with its own parameters.  A model's forward still calls the blocks in order, so the calls of
one list form a chain: block 0 starts a forward (a step), the list's last block ends it.

A `Chain` (one per model and block list) keeps that model's step clock, the skip method's per-stream
state and the cached residuals; `BlockGraph` (the callable the backend gives Dynamo for the block's
graph) asks it at every call whether this block computes.

- The first block always computes (the first `compute_first` of the method's options, at least one): the
  residual of those blocks (output - input) is the probe the method's policy reads, as DBCache's Fn compute
  blocks are; AdaCache's codebook and TeaCache's threshold then decide as they do in one graph.  The last
  `compute_last` blocks always compute too (DBCache's Bn).
- A span runs from the first block after those to the last before the `compute_last` ones, cut wherever the caller does anything between two blocks
  (the next block's input is not the tensor the previous block returned, as where Wan VACE adds its
  hints): a skipped span then adds exactly its cached residual.  Cuts are learned at computed steps;
  the first step of every generation computes every block.
- A skipped span's first block returns input + cached residual (or its forecast), and the span's other
  blocks return their input unchanged, without running.

The step comes as for one graph (ditopt/runtime.py): diffusers' cache_context step_index, or the
timestep of the model's forward: read by a graph of the forward that holds it (the part before a graph
break), or, where the forward is not compiled at all (compile_repeated_blocks), by a forward pre-hook
on the model that keeps its `timestep` argument.
"""

from __future__ import annotations

import gc
import inspect
import sys
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch._dynamo.eval_frame import OptimizedModule

from ditopt import contexts
from ditopt.diagnostics import failure_reason, warn_once
from ditopt.method import tensor_bytes
from ditopt.runtime import _FORWARD_TIMESTEP, _RUNTIME_IDS, Call, ModelState, counted, model_of, read_timestep, runtimes_of

from .skipping import forecast_residuals, keep_residuals, residual_source

FIRST_COMPUTED = 1  # at least this many blocks at the head of the list always compute (the probe is their residual)
PROBE = "first_blocks_residual"
TIMESTEP_NAMES = ("timestep", "timesteps", "t", "sigma", "sigmas")
UNCLEAR_STEPS = ("ditopt: the blocks compiled one by one cannot tell the denoising steps of their model's forwards "
                 "apart (no timestep argument was seen, and the caller gives no diffusers cache_context step_index): "
                 "every forward runs as the first step of a generation, so nothing is skipped; run the loop inside "
                 "`with ditopt.generation(model):` to count forwards as steps")


@dataclass(frozen=True)
class BlockStreams:
    """How a block's graph hands on its values: output j is a residual update of input `inputs[j]`."""

    inputs: tuple[int, ...]  # per graph output, the placeholder position it updates


def block_streams(gm: fx.GraphModule) -> BlockStreams | str:
    """The residual streams of a block's graph, or why it has none a skipped block could reproduce."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    output = next(n for n in gm.graph.nodes if n.op == "output")
    outs = output.args[0] if isinstance(output.args[0], (tuple, list)) else [output.args[0]]
    inside = {n for n in gm.graph.nodes if n.op not in ("placeholder", "output")}
    inputs = []
    for j, out in enumerate(outs):
        src = residual_source(out, inside, set(placeholders)) if isinstance(out, fx.Node) else None
        if src is None:
            name = out.name if isinstance(out, fx.Node) else repr(out)
            return (f"its output {j} ({name}) is not a residual update of one of its inputs, so a skipped block "
                    "could not reproduce it")
        inputs.append(placeholders.index(src))
    return BlockStreams(tuple(inputs)) if inputs else "it returns nothing"


def block_list_of(param: Tensor | None, module: nn.Module | None = None) -> tuple[nn.Module, str, nn.ModuleList] | None:
    """(the model, the name of its block list, the list) holding `param`, or None.

    The model is the outermost module holding it: a known one (compiled, or seen in a cache_context),
    else found from `module` upward through the garbage collector's referrers (a block compiled on its
    own knows no parent).  Once per block list, at compile time."""
    owner = contexts.owner_of(param)
    owner = module if owner is None else owner
    if owner is None:
        return None
    root = _root_of(owner)
    contexts.remember(root)
    for name, lst in root.named_modules():
        if isinstance(lst, nn.ModuleList) and any(p is param for blk in lst for p in blk.parameters()):
            return root, name, lst
    return None


def _root_of(module: nn.Module) -> nn.Module:
    seen = {id(module)}
    while True:
        parent = next((p for d in gc.get_referrers(module) if isinstance(d, dict) for p in _holders_of(d)), None)
        if parent is None or id(parent) in seen or isinstance(parent, OptimizedModule):
            return module
        seen.add(id(parent))
        module = parent


def _holders_of(modules: dict) -> list[nn.Module]:
    """The modules whose `_modules` dict is `modules` (reached through their instance dict)."""
    found = []
    for ref in gc.get_referrers(modules):
        if isinstance(ref, nn.Module) and ref.__dict__.get("_modules") is modules:
            found.append(ref)
        elif isinstance(ref, dict) and ref.get("_modules") is modules:
            found += [m for m in gc.get_referrers(ref) if isinstance(m, nn.Module) and m.__dict__ is ref]
    return found


def watch_timestep(model: nn.Module) -> bool:
    """Keep the timestep argument of each forward of `model` for its block graphs (a forward pre-hook);
    False when its forward takes no argument of a timestep's name."""
    if getattr(model, "_ditopt_watches_timestep", False):
        return True
    params = list(inspect.signature(model.forward).parameters)
    name = next((n for n in TIMESTEP_NAMES if n in params), None)
    if name is None:
        return False
    position = params.index(name)

    def keep(module, args, kwargs):
        value = kwargs.get(name, args[position] if position < len(args) else None)
        if value is not None:
            _FORWARD_TIMESTEP[module] = value

    model.register_forward_pre_hook(keep, with_kwargs=True)
    model._ditopt_watches_timestep = True
    # The hook comes too late for the forward running now (its first block is being compiled): read that one's
    # timestep from its frame, once.
    frame = sys._getframe()
    while frame is not None and not (frame.f_code.co_name == "forward" and frame.f_locals.get("self") is model):
        frame = frame.f_back
    if frame is not None and frame.f_locals.get(name) is not None:
        _FORWARD_TIMESTEP[model] = frame.f_locals[name]
    return True


@dataclass
class _SpanCache:
    inputs: list[Tensor] | None = None  # the span's inputs at this step, while it computes
    computed: list[tuple[float | None, list[Tensor]]] = field(default_factory=list)  # newest last


@dataclass
class _ChainState:
    """One stream's state for a generation."""

    policy: Any
    spans: dict[int, _SpanCache] = field(default_factory=dict)  # span start -> its cache
    probe_input: Tensor | None = None
    probes: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class _Forward:
    """The forward in progress: its call (stream, step) and what the blocks so far did."""

    call: Call
    state: _ChainState
    next_block: int = 0
    returned: list[Tensor] | None = None  # what the last block returned (its streams)
    skip_to: int = -1  # blocks up to this index return their input (a skipped span)


class Chain:
    """One model's block list, called block by block: step clock, decisions, cached span residuals."""

    def __init__(self, model: nn.Module, name: str, blocks: nn.ModuleList, method: str, policy, forecast: int,
                 compute_first: int = FIRST_COMPUTED, compute_last: int = 0, group=None):
        self.name = name
        self.length = len(blocks)
        self.first = max(FIRST_COMPUTED, compute_first)  # blocks 0 .. first-1 always compute: the probe
        self.last = compute_last  # and the last ones (DBCache's Bn)
        self.method = method
        self.policy = policy
        self.forecast = forecast
        self.group = group
        self.index_of = {id(p): k for k, blk in enumerate(blocks) for p in blk.parameters()}
        first = next(blocks.parameters(), None)
        owner = weakref.ref(model)
        self.model = ModelState(weakref.ref(first) if first is not None else None,
                                context=contexts.reader_for(model), owner=owner)
        self.cuts: set[int] = set()  # k: the caller changes the values between blocks k - 1 and k
        self.forward: _Forward | None = None
        self.blocks_run = 0

    # -- spans ---------------------------------------------------------------

    def span_starts(self) -> list[int]:
        end = self.length - self.last  # blocks from here on always compute
        return sorted(k for k in {self.first} | self.cuts if self.first <= k < end)

    def span_of(self, k: int) -> tuple[int, int] | None:
        """(first, last) block of the span holding block k, or None for an always computed block."""
        end = self.length - self.last
        if not self.first <= k < end:
            return None
        starts = self.span_starts()
        first = max(s for s in starts if s <= k)
        later = [s for s in starts if s > first]
        return first, (later[0] - 1 if later else end - 1)

    # -- calls ---------------------------------------------------------------

    def run(self, k: int, graph: "BlockGraph", args) -> Any:
        """Block k's call: computed by graph.fn, or returned from the cached span residual."""
        fw = self.forward
        if k == 0 or fw is None or k != fw.next_block:
            fw = self.forward = self._begin(k == 0)
        if fw is None:  # a forward that did not start at block 0: nothing is known of its step
            return graph.fn(*args)
        fw.next_block = k + 1
        streams_in = [args[p] for p in graph.streams.inputs]
        if fw.returned is not None and k > 0 and fw.skip_to < k and len(fw.returned) == len(streams_in) \
                and any(a is not b for a, b in zip(streams_in, fw.returned)):
            self.cuts.add(k)  # the caller changed a value between blocks: no span crosses here
        stats = fw.call.stream.stats
        span = self.span_of(k)
        out = None
        if span is not None and span[0] == k:
            out = self._enter_span(fw, span, streams_in, graph)
        elif span is not None and fw.skip_to >= k:
            out = graph.assemble(streams_in)  # inside a skipped span: the block's input, unchanged
        if out is not None:
            stats.blocks_skipped += 1
        else:
            out = graph.fn(*args)
            self.blocks_run += 1
            stats.blocks_computed += 1
            self._computed(fw, k, span, graph.outputs_of(out), streams_in)
        fw.returned = list(out)
        if k == self.length - 1:
            self._end(fw)
        return out

    def _begin(self, at_first_block: bool) -> _Forward | None:
        if not at_first_block:
            self.forward = None
            return None
        stream = self.model.observe(read_timestep((), None, self.model.owner), UNCLEAR_STEPS)
        call = Call(self, stream, [])
        st = stream.state.get(self.method)
        if st is None:
            st = stream.state[self.method] = _ChainState(self.policy.new_state())
            stream.stats.live = lambda: {self.method: self.section(st)}
        st.probes = {}
        self.policy.begin_call(call, st.policy)
        return _Forward(call, st)

    def _enter_span(self, fw: _Forward, span: tuple[int, int], streams_in: list[Tensor], graph) -> Any:
        """At a span's first block: skip it (returns the outputs) or note its inputs to cache its residual."""
        cache = fw.state.spans.setdefault(span[0], _SpanCache())
        wants = self.policy.should_skip(fw.call, fw.state.policy, _SpanId(span[0]), fw.state.probes)
        if wants and cache.computed and [r.shape for r in cache.computed[-1][1]] == [x.shape for x in streams_in]:
            fw.skip_to = span[1]
            residuals = forecast_residuals(cache.computed, fw.call.t)
            return graph.assemble([x + r for x, r in zip(streams_in, residuals)])
        cache.inputs = streams_in
        return None

    def _computed(self, fw: _Forward, k: int, span, outputs: list[Tensor], streams_in: list[Tensor]) -> None:
        st = fw.state
        if k == 0:
            st.probe_input = streams_in[0]
        if k == self.first - 1 and st.probe_input is not None:
            st.probes[PROBE] = outputs[0] - st.probe_input
            st.probe_input = None
        if span is not None and span[1] == k:
            cache = st.spans.get(span[0])
            if cache is not None and cache.inputs is not None:
                keep_residuals(cache.computed, fw.call.t, [o - x for o, x in zip(outputs, cache.inputs)], self.forecast)
                cache.inputs = None

    def _end(self, fw: _Forward) -> None:
        self.policy.end_call(fw.call, fw.state.policy, fw.state.probes)
        stats = fw.call.stream.stats
        stats.peak_cache_bytes = max(stats.peak_cache_bytes, self.cache_bytes(fw.state))
        self.forward = None

    # -- what Call asks of its runtime, and inspection -----------------------

    def section(self, st: _ChainState) -> dict:
        cache = self.cache_bytes(st)
        return {**self.policy.stats(st.policy), "cache_mb": round(cache / 2**20, 3), "cache_bytes": cache,
                "spans": [list(s) for s in (self.span_of(k) for k in self.span_starts()) if s]}

    @staticmethod
    def cache_bytes(st: _ChainState) -> int:
        return tensor_bytes([c.computed for c in st.spans.values()], st.policy)


@dataclass(frozen=True)
class _SpanId:
    id: int


class BlockGraph:
    """The callable for one block's graph: each call is one block of a chain (found by its parameters)."""

    def __init__(self, fn: Callable, streams: BlockStreams, make_chain: Callable[[Tensor], "Chain | None"],
                 config, methods: list[str], compile_seconds: float = 0.0):
        self.fn = fn
        self.streams = streams
        self._make_chain = make_chain
        self.config = config
        self.methods = methods
        self.compile_seconds = compile_seconds
        self.chains: list[Chain] = []
        self._chain_of: dict[int, tuple[Chain | None, int]] = {}  # id(param) -> (chain, block index)
        self.params: dict[int, weakref.ref] = {}
        self.param_slot: int | None = None
        self.timestep_slot = None
        self.index = next(_RUNTIME_IDS)  # creation order, among every graph's runtime
        self.calls = 0
        self.gave_up: str | None = None  # why these blocks run plain from now on
        self._tuple = True  # the graph returns a tuple (else a list), as Dynamo's code expects back

    def __call__(self, *args):
        return counted(self._call, args)

    def _call(self, *args):
        self.calls += 1
        if self.gave_up is not None:
            return self.fn(*args)
        try:
            param = args[self.param_slot] if self.param_slot is not None else None
            found = self._chain_of.get(id(param))
            if found is None:
                found = self._chain_of[id(param)] = self._locate(param)
            chain, k = found
            if chain is None:
                return self.fn(*args)
            return chain.run(k, self, args)
        except Exception as err:  # noqa: BLE001 - the safety net (docs/architecture.md): never in the caller's loop
            self.gave_up = failure_reason(err, "the block chain")
            warn_once(f"ditopt: {self.gave_up}; these blocks run with plain {self.config.lowering} and no "
                      "acceleration from now on")
            for chain in self.chains:
                chain.forward = None
            return self.fn(*args)

    def _locate(self, param) -> tuple[Chain | None, int]:
        model_of(self, param)
        chain = next((c for c in self.chains if id(param) in c.index_of), None)
        chain = self._make_chain(param) if chain is None else chain
        if chain is None:
            return None, -1
        if chain not in self.chains:
            self.chains.append(chain)
        return chain, chain.index_of[id(param)]

    def outputs_of(self, out) -> list[Tensor]:
        self._tuple = isinstance(out, tuple)
        return list(out)

    def assemble(self, outputs: list[Tensor]):
        return tuple(outputs) if self._tuple else list(outputs)

    # -- inspection, as Runtime ---------------------------------------------

    def _chains_of(self, params: set[int] | None) -> list[Chain]:
        return [c for c in self.chains if params is None or any(k in params for k in c.index_of)]

    def generations(self, params: set[int] | None = None):
        return [g for c in self._chains_of(params) for g in c.model.clock.all_stats()]

    def stats(self, params: set[int] | None = None) -> dict:
        chains = self._chains_of(params)
        return {
            **({"fallback": self.gave_up} if self.gave_up else {}),
            "calls": self.calls,
            "blocks": sum(c.length for c in chains),
            "regions": 1,
            "fused": [],
            "region_calls": sum(c.blocks_run for c in chains),
            "methods": self.methods,
            "compiled_variants": 1,
            "compile_seconds": round(self.compile_seconds, 3),
            "chained_blocks": [{"list": c.name, "blocks": c.length, "compute_first": c.first, "compute_last": c.last,
                                "spans": [list(s) for s in (c.span_of(k) for k in c.span_starts()) if s]}
                               for c in chains],
            "generations": [g.to_dict() for g in self.generations(params)],
        }

    def reset(self, params: set[int] | None = None) -> None:
        for c in self._chains_of(params):
            c.model.clock.reset()
            c.forward = None


# model -> (list name, method identity) -> its chain: shared by every graph of the list's blocks (a first block
# may compile on its own)
_CHAINS: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, Chain]]" = weakref.WeakKeyDictionary()


def chain_for(param: Tensor | None, module: nn.Module | None, method: str, make_policy: Callable[[], Any],
              cfg: Any, identity: Any = None) -> Chain | None:
    """The chain of the block list holding `param` for the method with this identity (its config: a recompile
    with other options makes a new chain), made on first use; None if `param` is in no block list."""
    found = block_list_of(param, module)
    if found is None:
        return None
    model, name, blocks = found
    chains = _CHAINS.setdefault(model, {})
    chain = chains.get((name, identity))
    if chain is None:
        chain = chains[name, identity] = Chain(model, name, blocks, method, make_policy(), getattr(cfg, "forecast", 0),
                                               getattr(cfg, "compute_first", 0), getattr(cfg, "compute_last", 0))
        if not any(not isinstance(r, BlockGraph) for r in runtimes_of(model)):
            watch_timestep(model)  # the forward itself is not compiled: keep its timestep for the blocks
    return chain


def build(gm: fx.GraphModule, config, module: nn.Module | None, compile_fn: Callable[[], Callable]) -> BlockGraph | str:
    """The callable for a block's graph that skips across the block list, or why there is none (the graph
    then runs as plain Inductor would)."""
    import time

    skippers = [(m, cfg) for m, cfg in config.enabled() if m.chain_policy is not None]
    if not skippers:
        from ditopt.passes.pipeline import METHODS

        names = " and ".join(m.name for m in METHODS if m.chain_policy is not None)
        return (f"only block skipping ({names}) acts across blocks compiled one by one, and it is off: turn it on, "
                "or call torch.compile(transformer, backend='ditopt') for the methods that act inside one graph")
    streams = block_streams(gm)
    if isinstance(streams, str):
        return f"the block's graph cannot be skipped: {streams}"
    method, cfg = skippers[0]
    inside = [m.name for m, _ in config.enabled() if m.chain_policy is None]
    if inside:
        warn_once(f"ditopt: the blocks are compiled one by one; {', '.join(inside)} act(s) inside one graph of the "
                  f"whole transformer only, so only {method.name} runs across them (compile the whole transformer "
                  "for the others)")
    start = time.perf_counter()
    fn = compile_fn()

    def make_chain(param):
        return chain_for(param, module, method.name, lambda: method.chain_policy(cfg, PROBE), cfg, method.uuid(cfg))

    return BlockGraph(fn, streams, make_chain, config, [method.name], time.perf_counter() - start)


def chained(model: nn.Module | None) -> bool:
    """Whether blocks of `model` run as chains (a graph of its forward without attention then needs no warning)."""
    return model is not None and bool(_CHAINS.get(model))
