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

Checkpoints (`train.distributed`):
  ddp    every rank holds the same weights and optimizer state; rank 0 writes the usual
         checkpoint (train/checkpoint.py), which any number of ranks resumes from.
  fsdp2  each rank holds a shard (`fully_shard` per block, then the root). Every rank writes
         its shard with torch.distributed.checkpoint into step_N/dcp/, which loads back into
         any number of ranks, one process included (DCP reshards on load). Rank 0 also
         gathers and writes the full weights, so a checkpoint is still a model directory.
         One process with `fsdp2` in its recipe shards nothing but writes the same format,
         so its run can be continued on N ranks.
Either way a checkpoint is assembled in a `.tmp-*` directory and renamed into place by rank 0.
"""
from __future__ import annotations

import os
import shutil
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from llm_maker.artifacts import atomic_write_json
from llm_maker.errors import CheckpointError, RecipeError
from llm_maker.model.llama import LlamaModel
from llm_maker.tokenizer.tokenizer import Tokenizer
from llm_maker.train.checkpoint import (WEIGHTS, list_checkpoints, load_optimizer_state, load_weights,
                                        rng_state, save_checkpoint, save_model_dir, write_model_files)

DCP_DIR = "dcp"
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


def wrap_model(model: LlamaModel, mode: str, ctx: DistContext, device: torch.device) -> torch.nn.Module:
    """The module to run forward/backward through: DDP around the model, or the model itself
    sharded in place by FSDP2 (so it must be wrapped before the optimizer is built)."""
    if not ctx.enabled:
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                       gradient_as_bucket_view=True)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (ctx.world_size,))
    for layer in model.layers:  # one all-gather per block, overlapped with the previous block's compute
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)  # the root: embeddings, final norm, head
    return model


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


# ----------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------

@contextmanager
def _one_process_is_intended():
    """DCP warns whenever it runs without a process group; one process is a supported case here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _optimizers(optimizer: Any) -> list[torch.optim.Optimizer]:
    return list(optimizer.optimizers.values()) if hasattr(optimizer, "optimizers") else [optimizer]


def _dcp_state(model: LlamaModel, optimizer: Any) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    # Keys are parameter names, whatever the sharding: what lets N ranks load M ranks' shards.
    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, _optimizers(optimizer))}


def full_model(model: LlamaModel, ctx: DistContext) -> Optional[LlamaModel]:
    """The whole model on rank 0 (gathered from FSDP2 shards: a collective), None elsewhere."""
    if not (ctx.enabled and any(hasattr(p, "full_tensor") for p in model.parameters())):
        return model if ctx.is_main else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not ctx.is_main:
        return None
    with torch.device("meta"):  # a shell that takes the gathered CPU tensors without copying them
        gathered = LlamaModel(model.config)
    gathered.load_state_dict(sd, assign=True)
    if model.config.tie_embeddings:
        gathered.lm_head.weight = gathered.embed_tokens.weight
    return gathered


def save_training_checkpoint(ctx: DistContext, sharded: bool, ckpt_root: Path, step: int, model: LlamaModel,
                             optimizer: Any, tokenizer: Tokenizer, meta: dict[str, Any],
                             trainer_state: dict[str, Any], keep: int) -> None:
    """checkpoints/step_N: rank 0 alone (one process, DDP) or every rank's shard (FSDP2)."""
    if not sharded:
        if ctx.is_main:
            save_checkpoint(ckpt_root, step, model, optimizer, tokenizer, meta, trainer_state, keep=keep)
        barrier(ctx)
        return
    import torch.distributed.checkpoint as dcp

    out = Path(ckpt_root) / f"step_{step:08d}"
    tmp = out.with_name(f".tmp-{out.name}-dcp")  # `.tmp-*`: never chosen by resume, even half-written
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(ctx)
    with _one_process_is_intended():
        dcp.save(_dcp_state(model, optimizer), checkpoint_id=tmp / DCP_DIR, no_dist=not ctx.enabled)
    whole = full_model(model, ctx)
    if ctx.is_main:
        write_model_files(tmp, whole, tokenizer, meta)
        atomic_write_json(tmp / "trainer_state.json", {**trainer_state, "step": step, "rng": rng_state()})
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        for old in list_checkpoints(ckpt_root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(ctx)


def save_final_model(ctx: DistContext, out_dir: Path, model: LlamaModel, tokenizer: Tokenizer,
                     meta: dict[str, Any]) -> Path:
    whole = full_model(model, ctx)
    if ctx.is_main:
        save_model_dir(out_dir, whole, tokenizer, meta)
    barrier(ctx)
    return out_dir


def load_training_state(ckpt: Path, model: LlamaModel, optimizer: Any) -> None:
    """Weights and optimizer state from a checkpoint of any world size into this one's model."""
    if (ckpt / DCP_DIR).is_dir():
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        state = _dcp_state(model, optimizer)
        no_dist = not (dist.is_available() and dist.is_initialized())
        with _one_process_is_intended():
            dcp.load(state, checkpoint_id=ckpt / DCP_DIR, no_dist=no_dist)  # reshards to this run's ranks
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, _optimizers(optimizer), state["optim"])
        return
    if any(hasattr(p, "full_tensor") for p in model.parameters()):
        raise CheckpointError(f"{ckpt}: written by one process or DDP (no {DCP_DIR}/), but this run shards the "
                              f"model (train.distributed: fsdp2); resume it with train.distributed: ddp")
    load_weights(model, ckpt / WEIGHTS)
    optimizer.load_state_dict(load_optimizer_state(ckpt))
