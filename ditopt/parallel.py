"""Context parallelism: the ranks that share one sequence take the same decisions.

Under diffusers' context parallelism (Ulysses or ring attention, `ContextParallelConfig`) each rank
runs the whole model on its shard of the token sequence, and the graph Dynamo hands ditopt holds the
collectives diffusers calls (`_c10d_functional.all_to_all_single`, `all_gather_into_tensor`, ...).
A skip decision taken from one shard's metric would differ between ranks, and a rank that skips a
block no longer joins the collectives inside it: a hang.  So every decision that reads a metric
reads it reduced across the ranks: the hook builds the metric's sums (numerators and denominators)
into one tensor, `Call.all_sum` all-reduces it (one collective per step, a few floats), and the
decision is then the same function of the same numbers on every rank.

The group is found in the graph: the one the output is gathered over (the ranks that split the
sequence), else the group of any collective in it.
"""

from __future__ import annotations

import hashlib
import json

import torch
import torch.fx as fx

COLLECTIVES = "_c10d_functional"


def collective_groups(gm: fx.GraphModule) -> list[str]:
    """The process-group names of the functional collectives in the graph, the output gathers' first."""
    gathers, others = [], []
    for node in gm.graph.nodes:
        op = str(node.target)  # e.g. "_c10d_functional.all_to_all_single.default"
        if node.op != "call_function" or not op.startswith(COLLECTIVES):
            continue
        group = next((a for a in reversed(node.args) if isinstance(a, str)), None)  # the group's name
        if group is not None:
            (gathers if "all_gather" in op else others).append(group)
    return list(dict.fromkeys(gathers + others))


class RankGroup:
    """The ranks that share one sequence: sums across them, and checks that they agree."""

    def __init__(self, group_name: str):
        from torch.distributed.distributed_c10d import _resolve_process_group

        self.name = group_name
        self.group = _resolve_process_group(group_name)
        self.size = torch.distributed.get_world_size(self.group)
        self.rank = torch.distributed.get_rank(self.group)
        self.collectives = 0  # all-reduces issued by ditopt, and their bytes (for stats and docs)
        self.bytes = 0

    def all_sum(self, values: torch.Tensor) -> torch.Tensor:
        """`values` summed over the ranks (in place, and returned)."""
        self.collectives += 1
        self.bytes += values.numel() * values.element_size()
        torch.distributed.all_reduce(values, group=self.group)
        return values

    def agree(self, what: str, value: dict) -> None:
        """Raise the same ValueError on every rank when `value` differs between them."""
        digest = hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
        every: list = [None] * self.size
        torch.distributed.all_gather_object(every, (digest, value), group=self.group)
        if len({d for d, _ in every}) > 1:
            def differs(key):
                return len({json.dumps(v.get(key), sort_keys=True, default=str) for _, v in every}) > 1

            keys = sorted(k for k in {k for _, v in every for k in v} if differs(k))
            raise ValueError(f"ditopt: {what} differ between the ranks of the context-parallel group "
                             f"(different {keys}); give every rank the same options, or decisions would differ "
                             "and the ranks' collectives would hang")


def rank_group(gm: fx.GraphModule) -> RankGroup | None:
    """The context-parallel group of a graph, or None when it holds no collective."""
    groups = collective_groups(gm)
    if not groups or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return None
    group = RankGroup(groups[0])
    return group if group.size > 1 else None


def check_split(model: torch.nn.Module, ulysses: int | None = None) -> None:
    """A clear error for a Ulysses degree the model's attention heads cannot be split by (diffusers'
    own is a reshape error deep in attention); read from the model's parallel config when not given."""
    if ulysses is None:
        cp = getattr(getattr(model, "_parallel_config", None), "context_parallel_config", None)
        ulysses = getattr(cp, "ulysses_degree", None) or 1
    heads = getattr(getattr(model, "config", None), "num_attention_heads", None)
    if ulysses > 1 and isinstance(heads, int) and heads % ulysses:
        raise ValueError(f"ditopt: {type(model).__name__} has {heads} attention heads, which Ulysses attention "
                         f"cannot split over {ulysses} ranks; use a ulysses_degree that divides {heads} "
                         "(and ring_degree for the rest of the ranks)")


def prime_context_parallel(model: torch.nn.Module) -> int:
    """Fill in what diffusers' context-parallel hooks compute at their first call, so that Dynamo can
    trace that call in one graph; returns how many hooks were primed.

    Each split hook maps argument names to positions with `inspect.signature` the first time it runs
    and caches the map; traced, that call is a graph break (Dynamo cannot trace `inspect`), which cuts
    every block into its own graph for good.  The map written here is the one the hook would cache."""
    import inspect

    primed = 0
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        for hook in getattr(registry, "hooks", {}).values():
            meta = getattr(hook, "module_forward_metadata", None)
            if meta is not None and meta.cached_parameter_indices is None and meta._cls is not None:
                names = list(inspect.signature(meta._cls.forward).parameters)[1:]  # after self
                meta.cached_parameter_indices = {name: i for i, name in enumerate(names)}
                primed += 1
    return primed
