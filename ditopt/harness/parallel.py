"""Context parallelism for the examples and tests: diffusers' own, on GPUs and on the CPU.

On a machine with an accelerator this is `model.enable_parallelism(config=ContextParallelConfig(...))`.
diffusers 0.42.1's `enable_parallelism` cannot run on a CPU-only machine: `_resolve_parallel_config`
picks `rank % torch.accelerator.device_count()`, a ZeroDivisionError when there is no accelerator.
There, `enable_context_parallel` does what `enable_parallelism` does, with the CPU as the device: the
same `ParallelConfig.setup`, the same processors' `_parallel_config`, the same
`apply_context_parallel` hooks, so the model runs diffusers' split / all-to-all / gather code.

One more diffusers 0.42.1 bug is stepped around on every device: Wan's plan splits a 2-D `timestep`
(Wan 2.2), and for the usual 1-D one its `_prepare_cp_input` calls `logger.warning_once`, which
diffusers' logger does not have (AttributeError).  A 1-D timestep needs no split, so the plan's
entry for it is left out when the model is called with one.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def init(backend: str | None = None) -> tuple[int, int, torch.device]:
    """Initialise torch.distributed from torchrun's environment: (rank, world size, this rank's device)."""
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"))
    rank, world = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available():
        torch.cuda.set_device(rank % torch.cuda.device_count())
        return rank, world, torch.device("cuda", torch.cuda.current_device())
    return rank, world, torch.device("cpu")


def enable_context_parallel(model: torch.nn.Module, ulysses: int = 1, ring: int = 1,
                            timestep_dims: int = 1) -> None:
    """Split the model's sequence over `ulysses * ring` ranks with diffusers' context parallelism."""
    from diffusers import ContextParallelConfig

    from ditopt.parallel import check_split, prime_context_parallel

    check_split(model, ulysses)
    cp = ContextParallelConfig(ulysses_degree=ulysses, ring_degree=ring)
    plan = dict(model._cp_plan)
    if timestep_dims == 1:
        plan.pop("", None)  # see the module docstring
    if torch.accelerator.device_count() > 0:
        model.enable_parallelism(config=cp, cp_plan=plan)
    else:
        _enable_on_cpu(model, cp, plan)
    prime_context_parallel(model)  # else the first, traced call graph-breaks in diffusers' hooks


def _enable_on_cpu(model, cp, plan) -> None:
    from diffusers.hooks.context_parallel import apply_context_parallel
    from diffusers.models._modeling_parallel import ParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    config = ParallelConfig(context_parallel_config=cp)
    mesh = init_device_mesh("cpu", cp.mesh_shape, mesh_dim_names=cp.mesh_dim_names)
    config.setup(dist.get_rank(), dist.get_world_size(), torch.device("cpu"), mesh=mesh)
    model._parallel_config = config
    for module in model.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(processor, "_parallel_config"):
            processor._parallel_config = config
    apply_context_parallel(model, cp, plan)
