"""Training on many processes through torchrun: DDP or FSDP2, rank-0 writes, resharding resume.

    torchrun --nproc_per_node=8 -m llm_maker pretrain RECIPE

torchrun starts one process per GPU and sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT; `init_distributed` joins that process group (NCCL on GPUs, gloo on CPUs). One
process (no torchrun, or WORLD_SIZE=1) is the degenerate case where every helper here does
nothing, so the trainer has one code path.

How ranks share a step: the recipe's `grad_accum_steps` micro-batches of a step are dealt
round-robin, rank r taking global micro-batches step*A + r, step*A + r + N, ... (N ranks, A a
multiple of N). The global batch, the data order and so the loss curve are one process's;
only the order in which gradients are summed differs. Each rank reads a disjoint slice.

Models (`train.distributed`):
  ddp    every rank holds the same weights and optimizer state.
  fsdp2  each rank holds a shard (`fully_shard` per block, then the root).
Checkpoints of either kind, and their resharding on resume, are train/checkpoint.py's.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from llm_maker.errors import RecipeError

_control_group: Any = None  # a gloo group for the per-step stop vote, which must not touch the GPU


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistContext:
    """Join torchrun's process group (once; later calls return the same context)."""
    global _control_group
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    ctx = DistContext(rank=int(os.environ["RANK"]), local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                      world_size=world)
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(ctx.local_rank)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if _control_group is None:
        _control_group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
    return ctx


def shutdown_distributed() -> None:
    global _control_group
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _control_group = None


def local_device(device: torch.device, ctx: DistContext) -> torch.device:
    """Each rank drives the GPU torchrun gave it (LOCAL_RANK)."""
    if ctx.enabled and device.type == "cuda":
        return torch.device("cuda", ctx.local_rank)
    return device


def rank_micro_batches(step: int, grad_accum_steps: int, ctx: DistContext) -> list[int]:
    """Global indices of this rank's micro-batches in `step` (disjoint across ranks)."""
    if grad_accum_steps % ctx.world_size:
        raise RecipeError(f"`train.grad_accum_steps` is {grad_accum_steps}, not a multiple of the {ctx.world_size} "
                          f"ranks torchrun started: it counts the micro-batches of a step over all ranks")
    first = step * grad_accum_steps
    return list(range(first + ctx.rank, first + grad_accum_steps, ctx.world_size))


def wrap_model(module: torch.nn.Module, blocks: Iterable[torch.nn.Module], mode: str, ctx: DistContext,
               device: torch.device) -> torch.nn.Module:
    """The module to run forward/backward through: DDP around `module` (the model with its loss,
    train/loss.py), or `module` sharded in place by FSDP2, each of `blocks` first, then the root
    (so it must be wrapped before the optimizer is built)."""
    if not ctx.enabled:
        return module
    if mode == "ddp":
        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                       gradient_as_bucket_view=True)
    mesh = init_device_mesh(device.type, (ctx.world_size,))
    for block in blocks:  # one all-gather per block, overlapped with the previous block's compute
        fully_shard(block, mesh=mesh)
    fully_shard(module, mesh=mesh)  # the root: embeddings, final norm, head
    return module


def gradient_sync(train_module: torch.nn.Module, last_micro_batch: bool):
    """DDP all-reduces only after the last micro-batch of a step (FSDP2 reduce-scatters each one,
    which keeps its gradients sharded)."""
    if not last_micro_batch and hasattr(train_module, "no_sync"):
        return train_module.no_sync()
    return nullcontext()


def mean_over_ranks(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """In place: the mean of `t` over ranks (gloo has no AVG, hence SUM / N)."""
    if ctx.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= ctx.world_size
    return t


def agree_on_stop(reason: Optional[str], ctx: DistContext) -> Optional[str]:
    """Stop on every rank when any rank was asked to (a signal or a STOP file seen by one rank
    only), so all ranks reach the same checkpoint. A CPU (gloo) vote: no GPU sync."""
    if not ctx.enabled:
        return reason
    flag = torch.tensor([1 if reason else 0], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=_control_group)
    return reason or ("stop requested on another rank" if int(flag) else None)


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier(group=_control_group)


def to_float(t: torch.Tensor) -> float:
    """A scalar, also from FSDP2's DTensor grad norm."""
    return float(t.full_tensor() if hasattr(t, "full_tensor") else t)
