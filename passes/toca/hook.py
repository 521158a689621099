"""ToCa at run time: per-step modes, specialised block graphs, caches, scores and statistics.

The rewrite (rewrite.py) leaves each site as `toca_rows` / `gather_rows` /
`toca_update` nodes around the unchanged module.  At each step every site is
in one of three modes:

- fresh: computed whole.  The specialised graph drops the three ops.
- partial: rows chosen by score are computed; `toca_rows` becomes an input
  (the rows, [B, K]) and `toca_update` a `cache_lookup` into the site's
  cache, another input.
- reuse: `toca_update` becomes the cache input, and dead-code elimination
  removes the module's whole computation (K = 0 rows, or self-attention).

A block region is specialised once per mode combination and compiled once
per (specialised graph, input shapes): K is quantised (`levels`,
`row_multiple`) so a sampling loop needs few variants and never recompiles.
Selection runs on the device (top-k of scores); the only host values are the
step, the timestep and the schedule, so there is no per-layer sync.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ditopt.method import Hook, Tag, tag_of, tensor_bytes
from ditopt.patterns import walk

from . import scores as ts
from .config import ToCaConfig
from .rewrite import NAME, SiteRef

OPS = torch.ops.ditopt
FRESH, PARTIAL, REUSE = "fresh", "partial", "reuse"


Site = SiteRef  # one cached site, as the rewrite tagged it


@dataclass
class Specialised:
    gm: fx.GraphModule
    inputs: list[tuple[str, int]]  # extra inputs after the region's own: ("rows" | "cache", site)
    outputs: list[tuple[str, int]]  # extra outputs after the region's own: ("cache", site) | ("score", site)


def _tag(node: fx.Node) -> Tag | None:
    t = tag_of(node)
    return t if t is not None and t.method == NAME else None


def specialise(gm: fx.GraphModule, modes: dict[int, str]) -> Specialised:
    """A copy of a block region's graph for one mode per site (see the module docstring)."""
    g = fx.Graph()
    out = g.graph_copy(gm.graph, {})
    g.output(out)
    placeholders = [n for n in g.nodes if n.op == "placeholder"]
    anchor = placeholders[-1] if placeholders else None
    extra_in: list[tuple[str, int]] = []
    extra_out: list[tuple[str, int, fx.Node]] = []

    def new_input(role: str, site: int, like: fx.Node) -> fx.Node:
        nonlocal anchor
        if anchor is None:
            with g.inserting_before(next(iter(g.nodes))):
                p = g.placeholder(f"toca_{role}_{site}")
        else:
            with g.inserting_after(anchor):
                p = g.placeholder(f"toca_{role}_{site}")
        p.meta = {"example_value": like.meta.get("example_value")}
        anchor = p
        extra_in.append((role, site))
        return p

    for node in list(g.nodes):
        tag = _tag(node)
        if tag is None or node.op != "call_function":
            continue
        site, role = tag.payload.id, tag.role
        mode = modes.get(site, FRESH)
        if role == "gather" and mode == FRESH:
            node.replace_all_uses_with(node.args[0])
        elif role == "update":
            fresh, rows = node.args[0], node.args[1]
            if mode == FRESH:
                node.replace_all_uses_with(fresh)
                extra_out.append(("cache", site, fresh))
            elif mode == REUSE:
                node.replace_all_uses_with(new_input("cache", site, node))
            else:
                cache = new_input("cache", site, node)
                with g.inserting_before(node):
                    merged = g.call_function(OPS.cache_lookup.default, (fresh, cache, rows))
                merged.meta = dict(node.meta)
                node.replace_all_uses_with(merged)
                extra_out.append(("cache", site, merged))
        elif role == "rows" and mode == PARTIAL:
            node.replace_all_uses_with(new_input("rows", site, node))
        elif role == "score" and mode in ((FRESH, PARTIAL) if tag.payload.kind == "entropy" else (FRESH,)):
            extra_out.append(("score", site, node))
    output = g.output_node()
    output.args = (tuple(output.args[0]) + tuple(n for *_, n in extra_out),)
    g.eliminate_dead_code()
    g.lint()
    return Specialised(fx.GraphModule(gm, g, class_name=type(gm).__name__), extra_in,
                       [(role, site) for role, site, _ in extra_out])


def region_sites(gm: fx.GraphModule) -> list[Site]:
    """The sites a region holds, in graph order."""
    found = {}
    for n in gm.graph.nodes:
        tag = _tag(n)
        if tag is not None and tag.role == "update":
            found[tag.payload.id] = tag.payload
    return list(found.values())


def score_kinds(gm: fx.GraphModule) -> dict[int, str]:
    """site -> "entropy" / "column" for the score nodes of a region."""
    return {t.payload.id: t.payload.kind for n in gm.graph.nodes if (t := _tag(n)) is not None and t.role == "score"}


def step_factor(weight: float, x: float) -> float:
    """The reference's linear factor 1 + w - 2 w x for a position x in [0, 1]."""
    return 1.0 + weight - 2.0 * weight * x


def quantised_rows(fraction: float, tokens: int, levels: int, multiple: int) -> int:
    """Rows to recompute: the fraction rounded up to a multiple of 1/levels, then to `multiple` rows."""
    fraction = min(max(fraction, 0.0), 1.0)
    if fraction == 0.0:
        return 0
    fraction = math.ceil(fraction * levels - 1e-9) / levels
    return min(tokens, math.ceil(fraction * tokens / multiple) * multiple)


@dataclass
class SiteState:
    cache: torch.Tensor | None = None
    age: torch.Tensor | None = None  # [B, N] steps since each row was computed
    rows: torch.Tensor | None = None  # the rows computed at the last partial step (for inspection)


@dataclass
class StreamToCa:
    sites: dict[int, SiteState] = field(default_factory=dict)
    scores: dict[int, torch.Tensor] = field(default_factory=dict)  # block -> raw s1 or s2, [B, N]
    score_kind: dict[int, str] = field(default_factory=dict)
    first_t: float | None = None
    runs: dict[int, int] = field(default_factory=dict)  # region index -> steps it ran (skipped steps do not count)
    stats: dict = field(default_factory=lambda: _empty_stats())


class TocaPlanner(Hook):
    """Decides every site's mode and rows per step, runs the specialised block regions, keeps the caches."""

    name = NAME

    def __init__(self, cfg: ToCaConfig, regions, num_blocks: int, layout, video_spans: dict[int, tuple[int, int]],
                 probed_blocks: frozenset = frozenset()):
        self.cfg = cfg
        self.probed_blocks = probed_blocks  # blocks a skip guard's probe reads: their sites always compute
        self.num_blocks = num_blocks
        self.sites: dict[int, list[Site]] = {}  # region index -> its sites
        self.score_sites: dict[int, dict[int, str]] = {}
        for r in regions:
            sites = region_sites(r.gm)
            if sites:
                self.sites[r.index] = sites
                self.score_sites[r.index] = score_kinds(r.gm)
        self.block_of_site = {s.id: s.block for ss in self.sites.values() for s in ss}
        self.grid = layout.grid
        self.video_spans = video_spans  # block -> (start, length) of the video tokens in joint sequences
        self._specialised: dict[tuple, Specialised] = {}
        self._cells: dict[tuple, torch.Tensor] = {}
        self.uncached: set[int] = set()  # sites that keep no cache (always computed): shed under a memory budget

    # -- the schedule ---------------------------------------------------------

    def interval(self, kind: str) -> int:
        return self.cfg.intervals.get(kind, self.cfg.interval)

    def fraction(self, site: Site, progress: float) -> float:
        cfg = self.cfg
        layer = site.block / max(1, self.num_blocks - 1)
        if site.kind == "self":  # reused whole at partial steps, never recomputed in part
            return 0.0
        return (cfg.ratio * step_factor(cfg.step_weight, progress) * step_factor(cfg.layer_weight, layer)
                * cfg.module_factors.get(site.kind, 1.0))

    def plan_site(self, site: Site, step: int, progress: float, state: SiteState) -> tuple[str, int]:
        """(mode, rows) of a site at the `step`-th step its block runs (steps a skip guard skipped do not count,
        so a refresh is never lost to a skip)."""
        if (step < self.cfg.first_fresh or step % self.interval(site.kind) == 0 or state.cache is None
                or site.block in self.probed_blocks or site.id in self.uncached):
            return FRESH, site.tokens
        k = quantised_rows(self.fraction(site, progress), site.tokens, self.cfg.levels, self.cfg.row_multiple)
        if k == 0:
            return REUSE, 0
        return (FRESH, site.tokens) if k >= site.tokens else (PARTIAL, k)

    # -- running a region -----------------------------------------------------

    def cuts(self) -> set[int]:
        return set()

    def claims(self) -> set[int]:
        return set(self.sites)

    def new_state(self) -> StreamToCa:
        return StreamToCa()

    def stats(self, state: StreamToCa) -> dict:
        return {**state.stats, "rows_by_step": list(state.stats["rows_by_step"])}

    def cache_bytes(self, state: StreamToCa) -> int:
        return tensor_bytes([(s.cache, s.age) for s in state.sites.values()], state.scores)

    def shed(self, states: list[StreamToCa]) -> str | None:
        """One cached site fewer: the one holding most; it computes whole at every step from now on."""
        held: dict[int, int] = {}
        for st in states:
            for sid, site in st.sites.items():
                if sid not in self.uncached and site.cache is not None:
                    held[sid] = held.get(sid, 0) + tensor_bytes(site.cache, site.age)
        if not held:
            return None
        sid = max(held, key=held.get)
        self.uncached.add(sid)
        for st in states:
            if sid in st.sites:
                st.sites[sid] = SiteState()
        total = sum(len(v) for v in self.sites.values())
        return f"toca: {total - len(self.uncached)} of {total} sites keep a cache (site {sid} of block " \
               f"{self.block_of_site[sid]} always computes)"

    def run_region(self, call, region, inputs: list) -> list | None:
        """Run block region `region` for this step, specialised for its sites' modes."""
        if region.index not in self.sites:
            return None
        st: StreamToCa = call.state(self)
        stats = st.stats
        t = call.t
        if call.step == 0 or st.first_t is None:
            st.first_t = t
        # progress through sampling, 0 at the first step and 1 at t = 0 (no timestep: 0.5, factor 1)
        progress = 1.0 - t / st.first_t if (t is not None and st.first_t) else 0.5
        modes, ks, extra = {}, [], {}
        runs = st.runs[region.index] = st.runs.get(region.index, -1) + 1
        for site in self.sites[region.index]:
            state = st.sites.setdefault(site.id, SiteState())
            mode, k = self.plan_site(site, runs, min(max(progress, 0.0), 1.0), state)
            modes[site.id] = mode
            ks.append(k)
            _count(stats, site, mode, k, call.step)
            if mode == PARTIAL:
                extra[("rows", site.id)] = self.select(site, k, st, state)
            if mode in (PARTIAL, REUSE):
                extra[("cache", site.id)] = state.cache
        spec_key = (region.index, tuple(sorted(modes.items())))
        spec = self._specialised.get(spec_key)
        if spec is None:
            spec = self._specialised[spec_key] = specialise(region.gm, modes)
        full_inputs = list(inputs) + [extra[e] for e in spec.inputs]
        outputs = call.compiled(region, full_inputs, variant=(spec_key, tuple(ks)), gm=spec.gm)(*full_inputs)
        n = len(region.outputs)
        for (role, sid), value in zip(spec.outputs, outputs[n:]):
            if role == "cache":
                if sid not in self.uncached:
                    self._store(st.sites[sid], modes[sid], value, extra.get(("rows", sid)))
            else:
                self._store_score(st, sid, value, extra.get(("rows", sid)), self.score_sites[region.index][sid])
        for site in self.sites[region.index]:
            if modes[site.id] == REUSE:
                st.sites[site.id].age += 1
        return list(outputs[:n])

    def _store(self, state: SiteState, mode: str, value: torch.Tensor, rows) -> None:
        state.cache = value
        if mode == FRESH or state.age is None:
            state.age = torch.zeros(value.shape[:2], dtype=torch.int32, device=value.device)
        else:
            state.age += 1
            state.age.scatter_(1, rows, 0)
            state.rows = rows

    def _store_score(self, st: StreamToCa, sid: int, value: torch.Tensor, rows, kind: str) -> None:
        block = self.block_of_site[sid]
        st.score_kind[block] = kind
        if rows is None or block not in st.scores:
            st.scores[block] = value
        else:  # the rows recomputed at a partial step refresh their own scores
            st.scores[block] = st.scores[block].scatter(1, rows, value)

    # -- selection ------------------------------------------------------------

    def score(self, site: Site, st: StreamToCa, state: SiteState) -> torch.Tensor:
        """Scores of a site's rows, [B, N]: s1 or s2 of its block (when their shape fits), + s3, then s4."""
        cfg = self.cfg
        age = state.age.float()
        score = torch.zeros_like(age)
        raw = st.scores.get(site.block)
        if raw is not None and raw.numel() == age.numel():
            raw = raw.reshape(age.shape)
            score = ts.l2_normalized(1.0 + raw if st.score_kind[site.block] == "entropy" else raw)
        score = score + cfg.age_weight * age / self.interval(site.kind)
        cells = self._uniform_cells(site, age.device)
        if cells is not None:
            score = ts.uniformity_bonus(score, cells[1], cfg.uniform_bonus, offset=cells[0])
        if cfg.cfg_shared and score.shape[0] % 2 == 0:
            uncond, cond = score.chunk(2)
            score = ((uncond + cond) / 2).repeat(2, 1)
        return score

    def select(self, site: Site, k: int, st: StreamToCa, state: SiteState) -> torch.Tensor:
        return ts.select_rows(self.score(site, st, state), k)

    def _uniform_cells(self, site: Site, device) -> tuple[int, torch.Tensor] | None:
        if self.cfg.uniform_bonus == 0 or self.grid is None:
            return None
        n = math.prod(self.grid)
        if site.tokens == n:
            offset = 0
        elif site.block in self.video_spans and self.video_spans[site.block][1] == n:
            offset = self.video_spans[site.block][0]
            if offset + n > site.tokens:
                return None
        else:
            return None
        key = (tuple(self.grid), tuple(self.cfg.uniform_cell), str(device))
        if key not in self._cells:
            self._cells[key] = ts.cell_ids(tuple(self.grid), tuple(self.cfg.uniform_cell), device)
        return offset, self._cells[key]


def _empty_stats() -> dict:
    return {"fresh": 0, "partial": 0, "reused": 0, "rows_computed": 0, "rows_total": 0, "computed_fraction": 1.0,
            "rows_by_step": []}


def _count(stats: dict, site: Site, mode: str, k: int, step: int) -> None:
    stats[{FRESH: "fresh", PARTIAL: "partial", REUSE: "reused"}[mode]] += 1
    stats["rows_computed"] += k
    by_step = stats["rows_by_step"]
    by_step.extend([0] * (step + 1 - len(by_step)))
    by_step[step] += k
    stats["rows_total"] += site.tokens
    stats["computed_fraction"] = round(stats["rows_computed"] / max(1, stats["rows_total"]), 4)


def _site_blocks_upstream(node, lowered) -> set[int]:
    """The blocks of the ToCa sites whose cached outputs `node` reads, directly or not."""
    updates = {n: t.payload.block for n, t in lowered.tagged(NAME, "update")}
    return {updates[n] for n in walk(node, lambda n: n.all_input_nodes) if n in updates}


def make_hook(cfg: ToCaConfig, lowered) -> TocaPlanner | str:
    """The planner for a lowered graph's ToCa sites, or why there is none."""
    structure = lowered.structure
    spans = {b.index: a.video_span for b in structure.blocks for a in b.attention
             if a.kind == "joint" and a.video_span is not None}
    # A skip guard's metric is the change of a probe between computed steps: a probe reading reused rows would
    # measure no change and skip on, so the blocks that hold one are computed whole.
    probed = frozenset(block for node, t in lowered.tags if t.role == "probe" and node in lowered.slot
                       for block in [lowered.regions[lowered.region_of(node)].block]
                       if block is not None and block in _site_blocks_upstream(node, lowered))
    planner = TocaPlanner(cfg, lowered.regions, len(structure.blocks), structure.layout, spans, probed)
    return planner if planner.sites else "no cached site is left in the lowered graph"
