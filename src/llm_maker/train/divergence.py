"""Divergence: the rules that say a run has gone bad, and what a rollback records.

The trainer (train/trainer.py) skips every optimizer step whose loss or gradient norm is not
finite, on the device (no host sync on CUDA), and reads the per-step flags and losses once per
logged row. `check_window` then applies two rules to the steps of that window, in order:

  max_bad_steps   this many skipped (non-finite) steps in a row
  spike_factor    a step's loss above spike_factor x the mean loss of the last SPIKE_HISTORY
                  applied steps after warmup (once SPIKE_MIN_HISTORY of them are known), and
                  at least SPIKE_MIN_RISE above that mean

Either is a `Divergence`: the trainer reloads the newest checkpoint (weights, optimizer,
scaler, RNG: what exact resume restores) and skips the data it had read since, as PaLM did;
after train.max_rollbacks of them the run stops with a `TrainingError` (`divergence_error`).

What the rules need between steps, and the data offset a rollback leaves behind, are saved in
every checkpoint beside the TrainState (`RollbackState`), so resuming a run that rolled back
reads the same batches as the run that did not stop.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch.amp import GradScaler

from llm_maker.errors import TrainingError
from llm_maker.train.checkpoint import TRAINER_STATE, TrainState
from llm_maker.train.distributed import DistContext, mean_over_ranks

SPIKE_HISTORY = 50  # steps whose mean loss a step is compared with
SPIKE_MIN_HISTORY = 10  # the spike rule waits for this many applied steps after warmup
SPIKE_MIN_RISE = 1.0  # nats: near zero loss (SFT data learnt by heart) 3x the mean is noise, not a divergence


@dataclass
class RollbackState(TrainState):
    """TrainState plus what divergence handling carries from step to step (saved with it in
    trainer_state.json)."""

    data_skip_steps: int = 0  # steps' worth of batches rollbacks skipped: step s reads the batches of s + this
    bad_steps_in_a_row: int = 0  # skipped (non-finite) steps since the last applied one
    recent_losses: list[float] = field(default_factory=list)  # the last SPIKE_HISTORY applied steps' losses
    rollbacks: list[dict[str, Any]] = field(default_factory=list)  # `rollback_event`s, oldest first

    @classmethod
    def restore(cls, state: TrainState, ckpt: Optional[Path]) -> "RollbackState":
        """`state` (as load_checkpoint returns it) with the fields above from `ckpt`'s
        trainer_state.json; a fresh run (`ckpt` None) starts with none."""
        raw = json.loads((ckpt / TRAINER_STATE).read_text(encoding="utf-8")) if ckpt is not None else {}
        base = {f.name: getattr(state, f.name) for f in dataclasses.fields(TrainState)}
        ours = {f.name: raw[f.name] for f in dataclasses.fields(cls) if f.name not in base and f.name in raw}
        return cls(**base, **ours)

    def to_json(self, grad_accum_steps: int) -> dict[str, Any]:
        # the data cursor past the skipped batches (TrainState's is the step's own)
        return {**super().to_json(grad_accum_steps),
                "micro_batch_index": (self.step + self.data_skip_steps) * grad_accum_steps}


@dataclass(frozen=True)
class Divergence:
    step: int  # the step that went bad
    loss: float  # its loss (mean over ranks): nan, inf or the spike
    why: str  # which rule, in words


def check_window(state: RollbackState, losses: Sequence[float], skipped: Sequence[bool], warmup_steps: int,
                 max_bad_steps: int, spike_factor: Optional[float]) -> tuple[Optional[Divergence], list[int]]:
    """Apply the rules to the steps state.step - len(losses) + 1 .. state.step, in order:
    (the first divergence or None, the skipped steps). Counts skipped steps into the state and
    keeps its run of bad steps and loss history up to date (up to the divergence)."""
    first = state.step - len(losses) + 1
    skipped_steps = []
    for step, loss, skip in zip(range(first, state.step + 1), losses, skipped, strict=True):
        if skip:
            skipped_steps.append(step)
            state.skipped_steps += 1
            state.bad_steps_in_a_row += 1
            if state.bad_steps_in_a_row >= max_bad_steps:
                return Divergence(step, loss, f"{state.bad_steps_in_a_row} steps in a row with a non-finite loss or "
                                              "gradient norm"), skipped_steps
            continue
        state.bad_steps_in_a_row = 0
        history = state.recent_losses
        if spike_factor is not None and len(history) >= SPIKE_MIN_HISTORY:
            mean = sum(history) / len(history)
            if loss > spike_factor * mean and loss > mean + SPIKE_MIN_RISE:
                return Divergence(step, loss, f"a loss spike: {loss:.4g} > {spike_factor:g} × {mean:.4g}, the mean "
                                              f"of the last {len(history)} steps"), skipped_steps
        if step > warmup_steps:
            state.recent_losses = (history + [loss])[-SPIKE_HISTORY:]
    return None, skipped_steps


def rollback_event(divergence: Divergence, to_step: int, skipped_batches: int) -> dict[str, Any]:
    """What the state, the manifest and the card keep of a rollback (a non-finite loss as None:
    JSON has no NaN)."""
    return {"step": divergence.step, "loss": divergence.loss if math.isfinite(divergence.loss) else None,
            "why": divergence.why, "to_step": to_step, "skipped_batches": skipped_batches}


def rollback_text(event: dict[str, Any]) -> str:
    """One line: metrics.csv's `event` cell and the model card."""
    loss = "nan" if event.get("loss") is None else f"{event['loss']:.4g}"
    return (f"rolled back at step {event['step']} (loss {loss}) to step {event['to_step']}, "
            f"skipped {event['skipped_batches']} batches")


def divergence_error(divergence: Divergence, rollbacks: int, max_rollbacks: int, ckpt: Optional[Path],
                     lr: float, precision: str) -> TrainingError:
    """The error that ends a run that kept diverging, or diverged with nothing to roll back to."""
    if max_rollbacks == 0:
        why = "rollbacks are off (train.max_rollbacks: 0)"
    elif ckpt is None:
        why = "there is no checkpoint to roll back to yet (train.checkpoint_every)"
    else:
        why = f"it rolled back {rollbacks} times already (train.max_rollbacks: {max_rollbacks})"
    shard = "the batches read so far" if ckpt is None else f"the batches read after {ckpt.name}"
    fp16 = "this run is fp16: try bf16, or fp32" if precision == "fp16" else f"this run is {precision}"
    return TrainingError(
        f"training diverged at step {divergence.step} (loss {divergence.loss:.4g}: {divergence.why}) and {why}. "
        f"No final model was written; every checkpoint left holds finite weights. Likely causes: a learning rate "
        f"too high (train.lr: {lr:g}; try several times lower, or a longer warmup), fp16 without enough loss-scale "
        f"headroom ({fp16}), or a bad data shard ({shard}). Fix the recipe and rerun with --force.")


def weights_are_finite(model: torch.nn.Module) -> bool:
    """Every parameter finite (this rank's shard under FSDP2: the caller agrees over ranks). One host read."""
    params = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    return bool(torch.stack([torch.isfinite(p).all() for p in params]).all())


# ----------------------------------------------------------------------------------------
# Skipping a step on the device
# ----------------------------------------------------------------------------------------

def nonfinite_step(step_loss: torch.Tensor, grad_norm: torch.Tensor,
                   ctx: DistContext) -> tuple[torch.Tensor, torch.Tensor]:
    """(the step's loss is not finite, skip the step: 0. or 1.), as 0-dim tensors on the device,
    the same on every rank (one rank's NaN batch skips the step everywhere). No host sync."""
    norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP2's DTensor
    flags = torch.stack([~torch.isfinite(step_loss), ~torch.isfinite(norm.to(step_loss.device))]).float()
    mean_over_ranks(flags, ctx)  # > 0 where any rank had one
    return flags[0] > 0, (flags.max() > 0).float()


def skip_as_overflow(scaler: GradScaler, optimizer: Any, skip: torch.Tensor) -> torch.Tensor:
    """fp16: a step to skip is skipped as GradScaler skips an overflow (its found_inf, set to
    exactly 0 or 1, also after agree_on_overflow's mean), which halves the scale too. Returns
    whether the step is skipped, overflow included."""
    found = scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
    for t in found.values():
        t.copy_(torch.maximum((t > 0).float(), skip.to(t.device)))
    return torch.stack([t.to(skip.device) for t in found.values()]).max()


def step_unless(optimizer: Any, skip: torch.Tensor) -> None:
    """optimizer.step() unless `skip` (0. or 1.): no weight, moment or step count changes then.
    A fused optimizer (AdamW on CUDA) takes the flag on the device as GradScaler hands it over,
    `found_inf`, so the host never waits; any other (CPU AdamW, Muon) reads it: a host sync."""
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        optimizer.found_inf = skip
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif not skip.item():
        optimizer.step()
