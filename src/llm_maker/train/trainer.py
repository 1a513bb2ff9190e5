"""The training loop shared by pretraining and SFT: AdamW (or Muon), warmup+cosine, clipping,
bf16, accumulation, periodic validation, atomic checkpoints, exact resume and graceful stop;
one process or many through torchrun (DDP / FSDP2, see train/distributed.py).

`run_training` takes a model and a batch source with this protocol:
    tokens_per_micro_batch: int
    micro_batch(index) -> (x, y)     a pure function of the micro-batch index (resume = step count)
    val_batches() -> iterable of (x, y)
and runs in four parts: `_setup` (device, ranks, wrapping, optimizer, resume), `_loop` (the
steps), `_log_row` (one metrics.csv row) and `_finish` (final/ and the summary). The loop's
state is a `TrainState` (train/checkpoint.py) with the divergence rules' part (`RollbackState`,
train/divergence.py), saved in every checkpoint. Which held-out metrics to compute besides the
validation loss is the caller's choice (`evaluations`).

The best model: after every evaluation `_track_best` compares train.best_metric (val_loss by
default, lower is better) with the best so far; a strictly better one becomes the best, and with
train.keep_best its model is written as best/ beside final/ (same save path, atomic). The best so
far and the evaluations since are in the TrainState, so a resumed run keeps the same best/; with
train.early_stop_patience the run finishes after that many evaluations without a better one.

Divergence: a step whose loss or gradient norm is not finite is skipped (`train_step`); too many
in a row, a loss spike, or weights / a validation loss not finite at a checkpoint roll the run
back to its last checkpoint, past the batches read since (`_roll_back`); no checkpoint and no
final/ ever holds a non-finite weight, and a run that keeps diverging ends in a TrainingError.
Nor does best/: a model that is to become the best is checked as a checkpoint is, and rolled
back instead; a best found after the checkpoint a rollback goes back to stays the best (best/
holds it, measured before the divergence).
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import io
import itertools
import math
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Optional, Protocol, Sequence

import torch
from torch.amp import GradScaler
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from llm_maker.artifacts import atomic_write_text
from llm_maker.devices import autocast, device_caps, precision_name, resolve_device, resolve_precision
from llm_maker.errors import CheckpointError, TrainingError
from llm_maker.layout import BEST, FINAL
from llm_maker.model.llama import LlamaModel
from llm_maker.recipe import DEFAULT_SEED, HIGHER_IS_BETTER, TrainConfig
from llm_maker.stopping import StopRequest
from llm_maker.tokenizer.tokenizer import Tokenizer
from llm_maker.train.checkpoint import (
    ModelMeta,
    TrainState,
    drop_stale_best,
    latest_checkpoint,
    remove_leftovers,
    resume_checkpoint,
    save_checkpoint,
    save_final_model,
)
from llm_maker.train.distributed import (
    DistContext,
    agree_on_stop,
    barrier,
    gradient_sync,
    init_distributed,
    local_device,
    mean_over_ranks,
    rank_micro_batches,
    to_float,
    wrap_model,
)
from llm_maker.train.divergence import (
    Divergence,
    RollbackState,
    check_window,
    divergence_error,
    nonfinite_step,
    rollback_event,
    rollback_text,
    skip_as_overflow,
    step_unless,
    weights_are_finite,
)
from llm_maker.train.evaluation import mean_loss
from llm_maker.train.loss import CausalLMLoss
from llm_maker.train.mfu import device_peak_tflops, mfu
from llm_maker.train.muon import make_muon_optimizer
from llm_maker.train.schedule import cosine_lr
from llm_maker.train.trackers import open_trackers

# Named parts an objective's loss module may return beside its loss (`run_training(loss_module=)`):
# distillation's cross-entropy and KL; DPO's reward margin and preference accuracy on the batch.
LOSS_PARTS = ("ce", "kl", "reward_margin", "pref_acc")
PROGRESS_PARTS = ("kl", "reward_margin")  # also shown in the progress bar


METRICS_FIELDS = ["step", "tokens", "epoch", "loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "mfu",
                  "peak_mem_mb", "elapsed_s", "val_token_acc", "mc_acc", "mc_acc_norm", "skipped_steps", "event",
                  *LOSS_PARTS, "teacher_tokens_per_s", "val_reward_margin", "val_pref_acc"]


class BatchSource(Protocol):
    """Micro-batches by index. A micro-batch is (x, y) for the plain loss, or (x, y, *more) for an
    objective whose loss module takes more (a teacher's log-probs, a rejected completion); the
    trainer moves every tensor to the device and calls the train module with all of them. A
    source may also have `log_metrics() -> dict` (host-side columns, e.g. teacher_tokens_per_s),
    read at every logged step."""

    tokens_per_micro_batch: int

    def micro_batch(self, index: int) -> tuple[torch.Tensor, ...]: ...

    def val_batches(self) -> Any: ...


class Evaluation(Protocol):
    """A held-out metric the caller asks for at every eval step: it gets the module that maps
    x to logits and (x, y) to the loss (under DDP, FSDP2 or neither) and returns metrics.csv
    columns (e.g. {"val_token_acc": ...}). Under torchrun every rank runs it."""

    def __call__(self, module: torch.nn.Module, device: torch.device,
                 amp_dtype: Optional[torch.dtype]) -> dict[str, Any]: ...


def make_optimizer(model: LlamaModel, tc: TrainConfig, device: torch.device) -> Any:
    """AdamW (β 0.9/0.95), weight decay on matrices only, fused kernel on CUDA; or, with
    `train.optimizer: muon`, Muon for the blocks' matrices and AdamW for the rest (train/muon.py)."""
    fused = device.type == "cuda"
    if tc.optimizer == "muon":
        return make_muon_optimizer(model, tc.lr, tc.weight_decay, (tc.beta1, tc.beta2), fused=fused)
    return torch.optim.AdamW(model.weight_decay_groups(tc.weight_decay), lr=tc.lr, betas=(tc.beta1, tc.beta2),
                             fused=fused)


def apply_activation_checkpointing(model: LlamaModel) -> None:
    """Recompute each block's activations in backward instead of keeping them: less memory for
    ~1/3 more compute. Wraps each block's forward in place, so parameter names do not change."""
    for block in model.layers:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


class MetricsLog:
    """metrics.csv: one row per logged step; on resume or a rollback, rows after the checkpoint
    are dropped. A rollback adds an `event` row at the step it went back to. Only rank 0 writes
    the file (`write=False` on the others, which keep the rows in memory)."""

    def __init__(self, path: Path, resume_step: Optional[int], write: bool = True):
        self.path, self.enabled = path, write
        self.sinks: list = []  # experiment trackers fed every row (train/trackers.py)
        if not write:  # every checkpoint has its row, so the last row is the resumed step
            self.rows = [{"step": resume_step}] if resume_step else []
            return
        self.rows = []
        if resume_step is not None and path.is_file():
            with open(path, newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        self._rewrite()

    def write(self, row: dict[str, Any]) -> None:
        row = {k: ("" if row.get(k) is None else row.get(k)) for k in METRICS_FIELDS}
        for sink in self.sinks:
            sink.log(row)
        self._append(row)

    def write_event(self, step: int, tokens: int, event: str, loss: Optional[float] = None) -> None:
        """A row that records an event (a rollback, the divergence that ends a run), not a
        measurement: trackers do not get it."""
        self._append({k: "" for k in METRICS_FIELDS} | {"step": step, "tokens": tokens, "event": event,
                                                       "loss": "" if loss is None else loss})

    def rewind(self, step: int) -> None:
        """Drop the rows after `step`: a rollback to its checkpoint, as resume does."""
        self.rows = [r for r in self.rows if int(r["step"]) <= step]
        self._rewrite()

    def _append(self, row: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=METRICS_FIELDS).writerow(row)
        self.rows.append(row)

    def _rewrite(self) -> None:
        if not self.enabled:
            return
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=METRICS_FIELDS)
        w.writeheader()
        w.writerows(self.rows)
        atomic_write_text(self.path, buf.getvalue())


class StepResult(NamedTuple):
    """What one step leaves on the device (0-dim tensors), read only at logged steps."""

    grad_norm: torch.Tensor
    loss: torch.Tensor  # this rank's mean loss over its micro-batches
    skipped: torch.Tensor  # 1. when the step changed nothing (non-finite loss or gradient norm), else 0.
    parts: dict[str, torch.Tensor] = {}  # the loss module's named parts (LOSS_PARTS), means over the micro-batches


def train_step(train_module: torch.nn.Module, model: LlamaModel, optimizer: Any, batches: BatchSource,
               micro_batch_indices: list[int], tc: TrainConfig, device: torch.device,
               amp_dtype: Optional[torch.dtype], loss_acc: torch.Tensor, scaler: Optional[GradScaler] = None,
               ctx: DistContext = DistContext()) -> StepResult:
    """One optimizer step over this rank's micro-batches: forward, backward (the gradient of their
    mean loss), clip, step. `train_module(x, y)` is the loss (a `CausalLMLoss`, maybe wrapped).
    Adds the mean loss to `loss_acc` on the device: nothing here waits for the GPU (AdamW on
    CUDA), so the host queues the next step while this one runs.

    A step whose loss or gradient norm is not finite on any rank is skipped on every rank: no
    weight and no optimizer state changes, and its loss stays out of `loss_acc`
    (train/divergence.py's `step_unless` decides on the device where the optimizer allows).

    fp16 (`scaler`): the loss is scaled before backward so small gradients survive float16; the
    gradients are unscaled before clipping; a step whose gradients overflowed is skipped (on every
    rank alike) and the scale halved, as torch.amp.GradScaler does."""
    n = len(micro_batch_indices)
    loss_before = loss_acc.clone()  # what `loss_acc` goes back to if this step's loss is not finite
    step_loss = torch.zeros((), device=device)
    parts: dict[str, torch.Tensor] = {}
    for i, index in enumerate(micro_batch_indices):
        batch = batches.micro_batch(index)
        with gradient_sync(train_module, last_micro_batch=i == n - 1):
            with autocast(device, amp_dtype):
                out = train_module(*(t.to(device, non_blocking=True) for t in batch))
            loss, named = out if isinstance(out, tuple) else (out, {})
            (loss / n if scaler is None else scaler.scale(loss / n)).backward()
        share = loss.detach() / n
        loss_acc += share
        step_loss += share
        for name, value in named.items():
            parts[name] = parts.get(name, 0.0) + value.detach().float() / n
    if scaler is not None:
        scaler.unscale_(optimizer)  # true gradients before clipping
        agree_on_overflow(scaler, optimizer, ctx)
    if tc.grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
    else:  # not clipped, but its finiteness decides the step all the same
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    loss_bad, skip = nonfinite_step(step_loss, grad_norm, ctx)
    loss_acc.copy_(torch.where(loss_bad, loss_before, loss_acc))
    if scaler is None:
        step_unless(optimizer, skip)
    else:
        skip = skip_as_overflow(scaler, optimizer, skip)
        scaler.step(optimizer)  # skipped when an inf/nan gradient was found (or the loss was not finite)
        scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(grad_norm, step_loss, skip, parts)


def agree_on_overflow(scaler: GradScaler, optimizer: Any, ctx: DistContext) -> None:
    """Under FSDP2 each rank unscales only its shard, so an overflow may show on one rank alone:
    share it (max over ranks), so every rank skips the same steps and keeps the same scale."""
    if not ctx.enabled:
        return
    for found_inf in scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"].values():
        mean_over_ranks(found_inf, ctx)  # > 0 on every rank when any rank found one


@dataclass
class _Run:
    """What `_setup` builds and the loop uses: one training run's parts."""

    tc: TrainConfig
    out_dir: Path
    tokenizer: Tokenizer
    meta: ModelMeta
    batches: BatchSource
    evaluations: Sequence[Evaluation]
    ctx: DistContext
    device: torch.device
    amp_dtype: Optional[torch.dtype]
    scaler: Optional[GradScaler]  # fp16 only: dynamic loss scaling
    model: LlamaModel
    loss_module: CausalLMLoss  # the model with its loss, for evaluation (FSDP2's root under fsdp2)
    train_module: torch.nn.Module  # what forward/backward runs through: DDP / compiled / loss_module
    optimizer: Any
    state: RollbackState
    metrics: "MetricsLog"
    stop: "StopRequest"
    progress: Any
    flops_per_token: float
    peak_tflops: Optional[float]
    tokens_per_step: int
    t0: float = field(default_factory=time.perf_counter)
    window_start: float = field(default_factory=time.perf_counter)  # wall clock of the previous logged row
    window_tokens: int = 0
    window: list[torch.Tensor] = field(default_factory=list)  # each step's (loss, skipped) since the last row
    parts_acc: dict[str, torch.Tensor] = field(default_factory=dict)  # LOSS_PARTS summed over the window's kept steps


def run_training(model: LlamaModel, batches: BatchSource, tc: TrainConfig, out_dir: Path, tokenizer: Tokenizer,
                 meta: ModelMeta | dict[str, Any], resume: bool = False,
                 evaluations: Sequence[Evaluation] = (), loss_module: Optional[CausalLMLoss] = None
                 ) -> dict[str, Any]:
    """Train to tc.max_steps (or until asked to stop); returns a summary dict.

    Writes out_dir/checkpoints/step_*/, out_dir/metrics.csv and, when finished, out_dir/final/
    (whose config.json carries `meta`). At every eval step the validation loss and each of
    `evaluations` are computed and logged.

    `loss_module`: the objective, when it is not the plain next-token loss (distillation, DPO): a
    `CausalLMLoss` over `model` whose forward takes a whole micro-batch of `batches` and returns the
    loss, or (loss, {part: 0-dim tensor}) with parts named in LOSS_PARTS (logged as their mean over
    the steps of each row); called with (x, y) alone it must still be the plain loss (validation)."""
    if loss_module is not None and loss_module.model is not model:
        raise ValueError("loss_module must wrap the model being trained")
    run = _setup(model, batches, tc, Path(out_dir), tokenizer, ModelMeta.of(meta), resume, evaluations, loss_module)
    for f in run.stop.present() if run.ctx.is_main else []:
        print(f"note: {f} is present: this run stops after its first step (delete it to train on)",
              file=sys.stderr, flush=True)
    with run.stop.installed():
        stopped_by = _loop(run)
    if stopped_by is not None:  # obeyed: the next --resume goes on
        for done in run.stop.consume(run.state.step, rename=run.ctx.is_main):
            print(f"{done.with_name('STOP')} obeyed at step {run.state.step}: renamed {done.name}", flush=True)
    return _finish(run, stopped_by)


def _setup(model: LlamaModel, batches: BatchSource, tc: TrainConfig, out_dir: Path, tokenizer: Tokenizer,
           meta: ModelMeta, resume: bool, evaluations: Sequence[Evaluation],
           loss_module: Optional[CausalLMLoss] = None) -> _Run:
    ckpt_root = out_dir / "checkpoints"
    ctx = init_distributed(resolve_device(tc.device))  # torchrun's ranks; one process: nothing to do
    device = local_device(resolve_device(tc.device), ctx)
    rank_micro_batches(0, tc.grad_accum_steps, ctx)  # grad_accum_steps must split over the ranks: check first
    amp_dtype = resolve_precision(tc.precision, device)  # a clear error before any compute if the device cannot
    scaler = GradScaler(device.type) if amp_dtype == torch.float16 else None
    if ctx.is_main and tc.progress:
        print(f"precision: {precision_name(amp_dtype)} on {device_caps(device).name} (train.precision: {tc.precision})",
              flush=True)
    torch.manual_seed(tc.seed if tc.seed is not None else DEFAULT_SEED)  # a recipe's is resolved already
    model.to(device)
    model.train()
    if tc.activation_checkpointing:
        apply_activation_checkpointing(model)
    loss_module = loss_module if loss_module is not None else CausalLMLoss(model, tc.loss_chunk_size)
    train_module = wrap_model(loss_module, model.layers, tc.distributed, ctx, device)  # FSDP2 shards in place
    optimizer = make_optimizer(model, tc, device)

    ckpt = latest_checkpoint(ckpt_root)
    if ckpt is not None and not resume:
        raise CheckpointError(f"{ckpt_root} already holds checkpoints; pass --resume to continue or --force to "
                              "start over")
    remove_leftovers(out_dir, ctx)  # the temp dirs of killed checkpoint / final/ writes (rank 0)
    ckpt, state = resume_checkpoint(ckpt_root, model, optimizer, tokenizer, tc.keep_checkpoints, ctx)
    if scaler is not None and state.scaler is not None:
        scaler.load_state_dict(state.scaler)  # exact resume: the same scale and growth tracker
    state = RollbackState.restore(state, ckpt)  # and the data a rollback skipped, the rules' counters
    drop_stale_best(out_dir, state.best_step, ctx)  # a best/ the resume has gone back past (rank 0)
    barrier(ctx)  # every rank has looked for checkpoints before any rank writes one
    metrics = MetricsLog(out_dir / "metrics.csv", resume_step=state.step if ckpt is not None else None,
                         write=ctx.is_main)
    if ctx.is_main:
        metrics.sinks = open_trackers(tc, out_dir, meta.stage, meta.recipe)  # TensorBoard / W&B when the recipe asks
    if tc.compile:
        train_module = torch.compile(train_module)
    return _Run(tc=tc, out_dir=out_dir, tokenizer=tokenizer, meta=meta, batches=batches, evaluations=evaluations,
                ctx=ctx, device=device, amp_dtype=amp_dtype, scaler=scaler, model=model, loss_module=loss_module,
                train_module=train_module, optimizer=optimizer, state=state, metrics=metrics,
                stop=StopRequest([out_dir / "STOP", out_dir.parent / "STOP"]),
                progress=_progress_bar(tc, initial=state.step, show=ctx.is_main),
                flops_per_token=model.flops_per_token(), peak_tflops=device_peak_tflops(device, tc.peak_tflops),
                tokens_per_step=batches.tokens_per_micro_batch * tc.grad_accum_steps)


def _loop(run: _Run) -> Optional[str]:
    """Optimizer steps until max_steps or the early-stopping patience is spent (None: finished),
    or until a signal / STOP file: then the reason. A divergence, seen at a logged step, rolls the
    run back (`_roll_back`) and the loop goes on."""
    tc = run.tc
    loss_acc = torch.zeros((), device=run.device)  # summed on the device, read only at logged steps
    while run.state.step < tc.max_steps and not _patience_spent(run):
        state = run.state  # a rollback replaces it
        lr = cosine_lr(state.step, tc.lr, tc.warmup_steps, tc.max_steps, tc.min_lr_ratio)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        data_step = state.step + state.data_skip_steps  # past the batches that rollbacks skipped
        result = train_step(run.train_module, run.model, run.optimizer, run.batches,
                            rank_micro_batches(data_step, tc.grad_accum_steps, run.ctx), tc, run.device,
                            run.amp_dtype, loss_acc, run.scaler, run.ctx)
        run.window.append(torch.stack([result.loss, result.skipped]))
        for name, value in result.parts.items():  # a skipped step's parts stay out, as its loss does
            run.parts_acc[name] = run.parts_acc.get(name, 0.0) + torch.where(result.skipped > 0, 0.0, value)
        state.step += 1
        state.tokens_seen += run.tokens_per_step
        run.window_tokens += run.tokens_per_step
        run.progress.update(1)

        final = state.step == tc.max_steps
        stop_reason = agree_on_stop(run.stop(), run.ctx)  # all ranks stop at the same step
        checkpointed = state.step % tc.checkpoint_every == 0 or final or stop_reason
        logged = state.step % tc.log_every == 0 or state.step % tc.eval_every == 0 or checkpointed
        # every checkpoint has its row, so resume logs identically; and its window is checked first
        if logged:
            divergence, finite_steps = _read_window(run)
            if divergence is not None:
                _roll_back(run, divergence, loss_acc)
                continue
        evaluated = state.step % tc.eval_every == 0 or final  # an eval step is a logged step
        if evaluated:
            _evaluate(run)
        if logged:
            _log_row(run, loss_acc, lr, result.grad_norm, finite_steps)
        if evaluated:
            unfit = _track_best(run)
            if unfit is not None:  # never a non-finite best/: go back instead
                _roll_back(run, Divergence(state.step, math.nan if state.loss is None else state.loss, unfit),
                           loss_acc)
                continue
        early_stop = _patience_spent(run)  # finished: its checkpoint, then final/ at this step
        if checkpointed or early_stop:
            unfit = _unfit_to_save(run)
            if unfit is not None:  # never a non-finite weight on disk: go back instead
                _roll_back(run, Divergence(state.step, math.nan if state.loss is None else state.loss, unfit),
                           loss_acc)
                continue
            if run.scaler is not None:
                state.scaler = run.scaler.state_dict()  # what resume needs for the same scale and growth tracker
            save_checkpoint(run.out_dir / "checkpoints", run.model, run.optimizer, run.tokenizer, run.meta, state,
                            tc.grad_accum_steps, keep=tc.keep_checkpoints, ctx=run.ctx,
                            sharded=tc.distributed == "fsdp2")
        if stop_reason and not (final or early_stop):
            return stop_reason
    return None


def _read_window(run: _Run) -> tuple[Optional[Divergence], int]:
    """The steps since the last row, read in one host sync (their losses averaged over ranks):
    skipped steps counted (and said), the divergence rules applied. Returns (the divergence or
    None, how many of the steps had a finite loss); every rank decides alike."""
    tc, state = run.tc, run.state
    records = mean_over_ranks(torch.stack(run.window), run.ctx).tolist()  # (steps, 2): loss, skipped
    run.window.clear()
    losses, skipped = [loss for loss, _ in records], [skip > 0 for _, skip in records]
    divergence, skipped_steps = check_window(state, losses, skipped, tc.warmup_steps, tc.max_bad_steps,
                                             tc.spike_factor)
    if skipped_steps and run.ctx.is_main:
        _say(f"skipped step(s) {', '.join(map(str, skipped_steps))}: the loss or gradient norm was not finite, "
             f"so no weight changed ({state.skipped_steps} skipped in all)")
    if agree_on_stop("diverged" if divergence else None, run.ctx) and divergence is None:  # a safety net
        divergence = Divergence(state.step, math.nan, "diverged on another rank")
    return divergence, sum(math.isfinite(loss) for loss in losses)


def _unfit_to_save(run: _Run) -> Optional[str]:
    """Why the model must not be saved now (a weight or the validation loss is not finite), or None."""
    why = None
    if not weights_are_finite(run.model):
        why = "a weight is not finite"
    elif run.state.val_loss is not None and not math.isfinite(run.state.val_loss):
        why = f"the validation loss is {run.state.val_loss}"
    if agree_on_stop(why, run.ctx) and why is None:  # FSDP2: another rank's shard
        why = "a weight is not finite on another rank"
    return why


def _roll_back(run: _Run, divergence: Divergence, loss_acc: torch.Tensor) -> None:
    """Reload the newest checkpoint (weights, optimizer, scaler, RNG: what resume restores), skip
    the batches read since, as PaLM did, and say so (stderr, an `event` row in metrics.csv, the
    summary). Raises TrainingError when train.max_rollbacks are used up or there is no checkpoint."""
    tc, old = run.tc, run.state
    root = run.out_dir / "checkpoints"
    ckpt, loaded = (None, None) if len(old.rollbacks) >= tc.max_rollbacks else \
        resume_checkpoint(root, run.model, run.optimizer, run.tokenizer, tc.keep_checkpoints, run.ctx)
    if ckpt is None:
        run.metrics.write_event(divergence.step, old.tokens_seen, f"diverged at step {divergence.step}: "
                                f"{divergence.why}; stopped", loss=divergence.loss)
        run.progress.close()
        for sink in run.metrics.sinks:
            sink.close()
        raise divergence_error(divergence, len(old.rollbacks), tc.max_rollbacks, latest_checkpoint(root), tc.lr,
                               precision_name(run.amp_dtype))
    state = RollbackState.restore(loaded, ckpt)
    if old.best_step is not None and old.best_step > state.step:  # a best found since the checkpoint: best/ holds it
        state.best_value, state.best_step, state.evals_since_best = old.best_value, old.best_step, 0
    event = rollback_event(divergence, to_step=state.step, skipped_batches=old.step - state.step)
    state.data_skip_steps = old.data_skip_steps + event["skipped_batches"]
    state.rollbacks = old.rollbacks + [event]
    state.bad_steps_in_a_row = 0  # other batches from here on
    if run.scaler is not None and state.scaler is not None:
        run.scaler.load_state_dict(state.scaler)
    run.state = state
    loss_acc.zero_()
    run.window.clear()
    run.parts_acc.clear()
    run.window_start, run.window_tokens = time.perf_counter(), 0
    run.progress.n = state.step
    run.progress.refresh()
    run.metrics.rewind(state.step)
    run.metrics.write_event(state.step, state.tokens_seen, rollback_text(event))
    if run.ctx.is_main:
        _say(f"step {divergence.step}: {divergence.why}: rolled back to {ckpt.name} and skipped the "
             f"{event['skipped_batches']} batches read since (rollback {len(state.rollbacks)} of at most "
             f"{tc.max_rollbacks})")


def _say(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


def _patience_spent(run: _Run) -> bool:
    patience = run.tc.early_stop_patience
    return patience is not None and run.state.evals_since_best >= patience


def metric_value(state: TrainState, name: str) -> Optional[float]:
    """The last evaluation's `name` (a metrics.csv column: val_loss or one of the caller's
    evaluations) as a float; None when it was not measured or is not finite."""
    raw = state.val_loss if name == "val_loss" else state.evals.get(name)
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def improves(value: Optional[float], best: Optional[float], higher_is_better: bool) -> bool:
    """Strictly better than the best so far (a tie keeps the earlier, cheaper model)."""
    if value is None:
        return False
    return best is None or (value > best if higher_is_better else value < best)


def _track_best(run: _Run) -> Optional[str]:
    """After an evaluation: a strictly better train.best_metric becomes the best so far (its step
    in the state, its model in best/ with train.keep_best); otherwise one more evaluation without
    improvement. Returns why the model must not become the best (a weight or the validation loss
    not finite: the caller rolls back), else None. Every rank decides alike."""
    tc, state = run.tc, run.state
    value = metric_value(state, tc.best_metric)
    better = improves(value, state.best_value, HIGHER_IS_BETTER[tc.best_metric])
    if agree_on_stop("better" if better else None, run.ctx) is None:  # a safety net, as for stops
        state.evals_since_best += 1
        return None
    unfit = _unfit_to_save(run)
    if unfit is not None:
        return unfit
    state.best_value, state.best_step, state.evals_since_best = value, state.step, 0
    if tc.keep_best:
        save_final_model(run.out_dir / BEST, run.model, run.tokenizer, _model_meta(run, BEST), run.ctx)
    return None


def _model_meta(run: _Run, kept: str) -> ModelMeta:
    """config.json's metadata of final/ or best/: the stage's, the training so far, which one it is."""
    state = run.state
    return dataclasses.replace(run.meta, steps=state.step, tokens_seen=state.tokens_seen, final_loss=state.loss,
                               val_loss=state.val_loss, kept=kept, best=_best_record(run))


def _best_record(run: _Run) -> Optional[dict[str, Any]]:
    state = run.state
    if state.best_step is None:
        return None
    return {"metric": run.tc.best_metric, "value": state.best_value, "step": state.best_step}


def _evaluate(run: _Run) -> None:
    """The validation loss and the caller's evaluations, into the state (every rank: under
    FSDP2 a forward needs them all)."""
    val = itertools.islice(run.batches.val_batches(), run.tc.eval_batches)
    run.state.val_loss = mean_loss(run.loss_module, val, run.device, run.amp_dtype)
    for evaluation in run.evaluations:
        run.state.evals.update(evaluation(run.loss_module, run.device, run.amp_dtype))


def _log_row(run: _Run, loss_acc: torch.Tensor, lr: float, grad_norm: torch.Tensor, finite_steps: int) -> None:
    """One metrics.csv row and the progress bar. With `_read_window`, the only host-device syncs:
    at logged steps. The loss is the mean over the window's `finite_steps` (the steps `loss_acc`
    has summed); when none was finite the cell stays empty and the last finite loss stands."""
    state = run.state
    loss_sum = mean_over_ranks(loss_acc, run.ctx).item()
    if finite_steps:
        state.loss = loss_sum / finite_steps
    state.window_start_step = state.step
    loss_acc.zero_()
    now = time.perf_counter()
    tps = run.window_tokens / max(now - run.window_start, 1e-9)
    run.window_start, run.window_tokens = now, 0
    epoch = _epoch(run.batches, state.step + state.data_skip_steps, run.tc)
    row = {"step": state.step, "tokens": state.tokens_seen, "epoch": round(epoch, 4),
           "loss": round(state.loss, 6) if finite_steps else None,
           "val_loss": None if state.val_loss is None else round(state.val_loss, 6),
           "lr": f"{lr:.3e}", "grad_norm": round(to_float(grad_norm), 4), "tokens_per_s": round(tps, 1),
           "mfu": _fmt(mfu(run.flops_per_token, tps, run.peak_tflops, run.ctx.world_size)),
           "peak_mem_mb": _peak_mem_mb(run.device), "elapsed_s": round(now - run.t0, 2), **state.evals,
           "skipped_steps": state.skipped_steps, **_parts_row(run, finite_steps)}
    log_metrics = getattr(run.batches, "log_metrics", None)
    if log_metrics is not None:
        row.update(log_metrics())
    run.metrics.write(row)
    run.progress.set_postfix(loss="-" if state.loss is None else f"{state.loss:.3f}",
                             val="-" if state.val_loss is None else f"{state.val_loss:.3f}",
                             lr=f"{lr:.1e}", tok_s=f"{tps:,.0f}", mfu=row["mfu"] or "-",
                             **{name: f"{float(row[name]):.3f}" for name in PROGRESS_PARTS if row.get(name)},
                             **({"skipped": state.skipped_steps} if state.skipped_steps else {}), refresh=False)


def _parts_row(run: _Run, finite_steps: int) -> dict[str, Any]:
    """The loss parts' columns: each part's mean over the row's kept steps (over the ranks too)."""
    parts = {name: mean_over_ranks(total, run.ctx).item() for name, total in sorted(run.parts_acc.items())}
    run.parts_acc.clear()
    unknown = set(parts) - set(LOSS_PARTS)
    if unknown:
        raise ValueError(f"loss parts {sorted(unknown)} are not metrics.csv columns; known: {', '.join(LOSS_PARTS)}")
    return {name: round(total / finite_steps, 6) for name, total in parts.items()} if finite_steps else {}


def _finish(run: _Run, stopped_by: Optional[str]) -> dict[str, Any]:
    """Close the progress bar and sinks; when finished (not stopped), write final/ -- never with a
    non-finite training loss as its result (the loop has checked the weights at the last step)."""
    run.progress.close()
    for sink in run.metrics.sinks:
        sink.close()
    state = run.state
    if stopped_by is None and not (state.loss is not None and math.isfinite(state.loss)):
        raise TrainingError(f"training ended at step {state.step} without a finite training loss ({state.loss}): "
                            f"no final model was written; see {run.out_dir / 'metrics.csv'}")
    summary = {"steps": state.step, "max_steps": run.tc.max_steps, "tokens_seen": state.tokens_seen,
               "final_loss": state.loss, "val_loss": state.val_loss, "stopped": stopped_by is not None,
               "stopped_by": stopped_by, "parameters": run.model.num_parameters(), "device": str(run.device),
               "world_size": run.ctx.world_size, "precision": precision_name(run.amp_dtype),
               "skipped_steps": state.skipped_steps, "rollbacks": state.rollbacks, "final_dir": None,
               "best": _best_summary(run), "early_stopped": stopped_by is None and state.step < run.tc.max_steps}
    if summary["early_stopped"] and run.ctx.is_main:
        best = summary["best"]
        said = f"best at step {best['step']} ({best['value']:.4g})" if best else "none measured it"
        print(f"early-stopped at step {state.step}: no better {run.tc.best_metric} in {run.tc.early_stop_patience} "
              f"evaluations; {said}", flush=True)
    if stopped_by is None:
        summary["final_dir"] = str(save_final_model(run.out_dir / FINAL, run.model, run.tokenizer,
                                                    _model_meta(run, FINAL), run.ctx))
    return summary


def _best_summary(run: _Run) -> Optional[dict[str, Any]]:
    """The summary's record of the best evaluation: its metric, value and step, the metric's value
    at the last evaluation (the final model's, once finished) and best/ when it was kept."""
    best = _best_record(run)
    if best is None:
        return None
    best_dir = run.out_dir / BEST
    kept = run.tc.keep_best and best_dir.is_dir()  # drop_stale_best and _track_best: best/ is best_step's
    return {**best, "last_value": metric_value(run.state, run.tc.best_metric),
            "dir": str(best_dir) if kept else None}


def _epoch(batches: BatchSource, step: int, tc: TrainConfig) -> float:
    epoch_of = getattr(batches, "epoch_of", None)
    return epoch_of(step * tc.grad_accum_steps - 1) if epoch_of else math.nan


def _fmt(x: Optional[float]) -> Optional[str]:
    return None if x is None else f"{x:.4f}"


def _peak_mem_mb(device: torch.device) -> Optional[float]:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    try:
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB
    except OSError:
        return None


def _progress_bar(tc: TrainConfig, initial: int, show: bool = True):
    return tqdm(total=tc.max_steps, initial=initial, disable=not (tc.progress and show), unit="step",
                dynamic_ncols=True,
                mininterval=0.5)
