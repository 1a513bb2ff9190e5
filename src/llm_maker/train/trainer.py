"""The training loop shared by pretraining and SFT: AdamW (or Muon), warmup+cosine, clipping,
bf16, accumulation, periodic validation, atomic checkpoints, exact resume and graceful stop;
one process or many through torchrun (DDP / FSDP2, see train/distributed.py).

`run_training` takes a model and a batch source with this protocol:
    tokens_per_micro_batch: int
    micro_batch(index) -> (x, y)     a pure function of the micro-batch index (resume = step count)
    val_batches() -> iterable of (x, y)
"""
from __future__ import annotations

import csv
import io
import itertools
import math
import signal
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator, Optional, Protocol

import torch

from llm_maker.artifacts import atomic_write_text
from llm_maker.errors import CheckpointError
from llm_maker.model.llama import LlamaModel
from llm_maker.recipe import TrainConfig
from llm_maker.tokenizer.tokenizer import Tokenizer
from llm_maker.train.checkpoint import latest_checkpoint, load_trainer_state, read_model_config, set_rng_state
from llm_maker.train.distributed import (agree_on_stop, barrier, gradient_sync, init_distributed,
                                         load_training_state, local_device, mean_over_ranks, rank_micro_batches,
                                         save_final_model, save_training_checkpoint, to_float, wrap_model)
from llm_maker.train.mfu import device_peak_tflops, mfu
from llm_maker.train.schedule import cosine_lr

METRICS_FIELDS = ["step", "tokens", "epoch", "loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "mfu",
                  "peak_mem_mb", "elapsed_s", "val_token_acc", "mc_acc", "mc_acc_norm"]


class BatchSource(Protocol):
    tokens_per_micro_batch: int

    def micro_batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    def val_batches(self) -> Any: ...


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype, or None for fp32. `auto`: bf16 on GPUs that support it, fp32 on CPU
    (CPU bf16 autocast is slower than fp32 on most laptops)."""
    if name == "fp32":
        return None
    if name == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def make_optimizer(model: LlamaModel, tc: TrainConfig, device: torch.device) -> Any:
    """AdamW (β 0.9/0.95), weight decay on matrices only, fused kernel on CUDA; or, with
    `train.optimizer: muon`, Muon for the blocks' matrices and AdamW for the rest (train/muon.py)."""
    fused = device.type == "cuda"
    if tc.optimizer == "muon":
        from llm_maker.train.muon import make_muon_optimizer

        return make_muon_optimizer(model, tc.lr, tc.weight_decay, (tc.beta1, tc.beta2), fused=fused)
    return torch.optim.AdamW(model.weight_decay_groups(tc.weight_decay), lr=tc.lr, betas=(tc.beta1, tc.beta2),
                             fused=fused)


class StopRequest:
    """Set by SIGINT/SIGTERM or by a STOP file; the loop checkpoints and exits cleanly."""

    def __init__(self, stop_files: list[Path]):
        self.stop_files = stop_files
        self.signal_name: Optional[str] = None

    def __call__(self) -> Optional[str]:
        if self.signal_name:
            return self.signal_name
        for f in self.stop_files:
            if f.exists():
                return f"STOP file {f}"
        return None

    @contextmanager
    def installed(self) -> Iterator[None]:
        def handler(signum, frame):
            self.signal_name = signal.Signals(signum).name

        previous = {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: rely on the STOP file
            pass
        try:
            yield
        finally:
            for sig, h in previous.items():
                signal.signal(sig, h)


class MetricsLog:
    """metrics.csv: one row per logged step; on resume, rows after the checkpoint are dropped.
    Only rank 0 writes the file (`write=False` on the others, which keep the rows in memory)."""

    def __init__(self, path: Path, resume_step: Optional[int], write: bool = True):
        self.path, self.enabled = path, write
        self.sinks: list = []  # experiment trackers fed every row (registry/trackers.py)
        if not write:  # every checkpoint has its row, so the last row is the resumed step
            self.rows = [{"step": resume_step}] if resume_step else []
            return
        rows = []
        if resume_step is not None and path.is_file():
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=METRICS_FIELDS)
        w.writeheader()
        w.writerows(rows)
        atomic_write_text(path, buf.getvalue())
        self.rows = rows

    def write(self, row: dict[str, Any]) -> None:
        row = {k: ("" if row.get(k) is None else row.get(k)) for k in METRICS_FIELDS}
        for sink in self.sinks:
            sink.log(row)
        if not self.enabled:
            self.rows.append(row)
            return
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=METRICS_FIELDS).writerow(row)
        self.rows.append(row)


@torch.no_grad()
def evaluate_loss(model: LlamaModel, batches: BatchSource, max_batches: int, device: torch.device,
                  amp_dtype: Optional[torch.dtype]) -> Optional[float]:
    model.eval()
    losses = []
    for x, y in itertools.islice(batches.val_batches(), max_batches):
        with _autocast(device, amp_dtype):
            losses.append(model(x.to(device), y.to(device)).item())
    model.train()
    return sum(losses) / len(losses) if losses else None


@torch.no_grad()
def evaluate_token_accuracy(model: LlamaModel, batches: BatchSource, max_batches: int, device: torch.device,
                            amp_dtype: Optional[torch.dtype]) -> Optional[float]:
    """Share of supervised validation targets (label != -100) that greedy decoding predicts: SFT's
    token accuracy, plotted on the model card. Needs the full logits, so SFT only (short batches)."""
    model.eval()
    correct = total = 0
    for x, y in itertools.islice(batches.val_batches(), max_batches):
        with _autocast(device, amp_dtype):
            logits = model(x.to(device))  # (B, T, V)
        y = y.to(device)
        mask = y != -100
        correct += int(((logits.argmax(-1) == y) & mask).sum())
        total += int(mask.sum())
    model.train()
    return correct / total if total else None


def _autocast(device: torch.device, dtype: Optional[torch.dtype]):
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else nullcontext()


def _resume(model, optimizer, ckpt_root: Path, tokenizer: Tokenizer) -> Optional[dict[str, Any]]:
    ckpt = latest_checkpoint(ckpt_root)
    if ckpt is None:
        return None
    meta = read_model_config(ckpt)
    if meta.get("tokenizer_hash") != tokenizer.hash:
        raise CheckpointError(f"{ckpt}: trained with tokenizer {meta.get('tokenizer_hash')}, but this run's "
                              f"tokenizer is {tokenizer.hash}; use --force to start over")
    if meta["model"] != model.config.to_dict():
        raise CheckpointError(f"{ckpt}: model shape {meta['model']} differs from the recipe's "
                              f"{model.config.to_dict()}; use --force to start over")
    load_training_state(ckpt, model, optimizer)  # from any number of ranks (train/distributed.py)
    state = load_trainer_state(ckpt)
    set_rng_state(state["rng"])
    return state


def train_step(train_module: torch.nn.Module, model: LlamaModel, optimizer: Any, batches: BatchSource,
               micro_batch_indices: list[int], tc: TrainConfig, device: torch.device,
               amp_dtype: Optional[torch.dtype], loss_acc: torch.Tensor) -> torch.Tensor:
    """One optimizer step over this rank's micro-batches: forward, backward (the gradient of their
    mean loss), clip, step; returns the grad norm. Adds the mean loss to `loss_acc` on the device:
    nothing here waits for the GPU, so the host queues the next step while this one runs."""
    n = len(micro_batch_indices)
    for i, index in enumerate(micro_batch_indices):
        x, y = batches.micro_batch(index)
        with gradient_sync(train_module, last_micro_batch=i == n - 1):
            with _autocast(device, amp_dtype):
                loss = train_module(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
            (loss / n).backward()
        loss_acc += loss.detach() / n
    grad_norm = torch.zeros(())
    if tc.grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def run_training(model: LlamaModel, batches: BatchSource, tc: TrainConfig, out_dir: Path, tokenizer: Tokenizer,
                 meta: dict[str, Any], resume: bool = False) -> dict[str, Any]:
    """Train to tc.max_steps (or until asked to stop); returns a summary dict.

    Writes out_dir/checkpoints/step_*/, out_dir/metrics.csv and, when finished, out_dir/final/."""
    out_dir = Path(out_dir)
    ckpt_root = out_dir / "checkpoints"
    ctx = init_distributed(resolve_device(tc.device))  # torchrun's ranks; one process: nothing to do
    device = local_device(resolve_device(tc.device), ctx)
    rank_micro_batches(0, tc.grad_accum_steps, ctx)  # grad_accum_steps must split over the ranks: check first
    amp_dtype = resolve_precision(tc.precision, device)
    torch.manual_seed(tc.seed)
    model.to(device)
    model.train()
    model.activation_checkpointing = tc.activation_checkpointing
    model.loss_chunk_size = tc.loss_chunk_size
    train_module = wrap_model(model, tc.distributed, ctx, device)  # DDP, or FSDP2 shards `model` in place
    optimizer = make_optimizer(model, tc, device)

    state = _resume(model, optimizer, ckpt_root, tokenizer) if resume else None
    if state is None and latest_checkpoint(ckpt_root) is not None:
        raise CheckpointError(f"{ckpt_root} already holds checkpoints; pass --resume to continue or --force to start over")
    barrier(ctx)  # every rank has looked for checkpoints before any rank writes one
    step = state["step"] if state else 0
    tokens_seen = state["tokens_seen"] if state else 0
    metrics = MetricsLog(out_dir / "metrics.csv", resume_step=step if state else None, write=ctx.is_main)
    last_val = state.get("val_loss") if state else None
    last_acc: Optional[float] = None  # SFT's held-out token accuracy, at eval steps
    from llm_maker.eval.multiple_choice import training_hook

    mc_eval = training_hook(tc.mc_eval, tokenizer, tc.mc_eval_items)  # multiple-choice acc at eval steps, or None
    last_mc: dict[str, float] = {}
    if ctx.is_main:
        from llm_maker.registry.trackers import open_trackers

        metrics.sinks = open_trackers(tc, out_dir, meta)  # TensorBoard / W&B when the recipe asks

    if tc.compile:
        train_module = torch.compile(train_module)
    flops_per_token = model.flops_per_token()
    peak = device_peak_tflops(device, tc.peak_tflops)
    tokens_per_step = batches.tokens_per_micro_batch * tc.grad_accum_steps
    stop = StopRequest([out_dir / "STOP", out_dir.parent / "STOP"])
    progress = _progress_bar(tc, initial=step, show=ctx.is_main)
    stopped_by: Optional[str] = None
    loss_acc = torch.zeros((), device=device)
    window_start, window_tokens, t0 = time.perf_counter(), 0, time.perf_counter()
    last_loss = state.get("loss") if state else None

    def trainer_state() -> dict[str, Any]:
        return {"tokens_seen": tokens_seen, "micro_batch_index": step * tc.grad_accum_steps,
                "loss": last_loss, "val_loss": last_val}

    with stop.installed():
        while step < tc.max_steps:
            lr = cosine_lr(step, tc.lr, tc.warmup_steps, tc.max_steps, tc.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            grad_norm = train_step(train_module, model, optimizer, batches,
                                   rank_micro_batches(step, tc.grad_accum_steps, ctx), tc, device, amp_dtype, loss_acc)
            step += 1
            tokens_seen += tokens_per_step
            window_tokens += tokens_per_step
            progress.update(1)

            final = step == tc.max_steps
            stop_reason = agree_on_stop(stop(), ctx)  # all ranks stop at the same step
            if step % tc.eval_every == 0 or final:
                last_val = evaluate_loss(model, batches, tc.eval_batches, device, amp_dtype)
                if meta.get("stage") == "sft":
                    last_acc = evaluate_token_accuracy(model, batches, tc.eval_batches, device, amp_dtype)
                if mc_eval is not None:  # every rank runs it: under FSDP2 a forward needs them all
                    last_mc = mc_eval(model)
            if (step % tc.log_every == 0 or step % tc.eval_every == 0 or step % tc.checkpoint_every == 0
                    or final or stop_reason):  # every checkpoint has its row, so resume logs identically
                # The only host-device sync: once per logged step, not per step.
                window_steps = max(1, _steps_in_window(step, tc.log_every, metrics))
                last_loss = mean_over_ranks(loss_acc, ctx).item() / window_steps
                loss_acc.zero_()
                now = time.perf_counter()
                tps = window_tokens / max(now - window_start, 1e-9)
                window_start, window_tokens = now, 0
                row = {"step": step, "tokens": tokens_seen, "epoch": round(_epoch(batches, step, tc), 4),
                       "loss": round(last_loss, 6), "val_loss": None if last_val is None else round(last_val, 6),
                       "lr": f"{lr:.3e}", "grad_norm": round(to_float(grad_norm), 4), "tokens_per_s": round(tps, 1),
                       "mfu": _fmt(mfu(flops_per_token, tps, peak, ctx.world_size)),
                       "peak_mem_mb": _peak_mem_mb(device), "elapsed_s": round(now - t0, 2),
                       "val_token_acc": _fmt(last_acc), **last_mc}
                metrics.write(row)
                progress.set_postfix(loss=f"{last_loss:.3f}",
                                     val="-" if last_val is None else f"{last_val:.3f}",
                                     lr=f"{lr:.1e}", tok_s=f"{tps:,.0f}", mfu=row["mfu"] or "-", refresh=False)
            if step % tc.checkpoint_every == 0 or final or stop_reason:
                save_training_checkpoint(ctx, tc.distributed == "fsdp2", ckpt_root, step, model, optimizer,
                                         tokenizer, meta, trainer_state(), keep=tc.keep_checkpoints)
            if stop_reason and not final:
                stopped_by = stop_reason
                break
    progress.close()
    for sink in metrics.sinks:
        sink.close()

    summary = {"steps": step, "max_steps": tc.max_steps, "tokens_seen": tokens_seen, "final_loss": last_loss,
               "val_loss": last_val, "stopped": stopped_by is not None, "stopped_by": stopped_by,
               "parameters": model.num_parameters(), "device": str(device), "world_size": ctx.world_size,
               "precision": "bf16" if amp_dtype == torch.bfloat16 else "fp32",
               "final_dir": None}
    if stopped_by is None:
        final_meta = {**meta, "steps": step, "tokens_seen": tokens_seen, "final_loss": last_loss, "val_loss": last_val}
        summary["final_dir"] = str(save_final_model(ctx, out_dir / "final", model, tokenizer, final_meta))
    return summary


def _steps_in_window(step: int, log_every: int, metrics: MetricsLog) -> int:
    """How many optimizer steps the accumulated loss covers (since the previous logged row)."""
    prev = int(metrics.rows[-1]["step"]) if metrics.rows else 0
    return step - prev


def _epoch(batches: BatchSource, step: int, tc: TrainConfig) -> float:
    epoch_of = getattr(batches, "epoch_of", None)
    return epoch_of(step * tc.grad_accum_steps - 1) if epoch_of else math.nan


def _fmt(x: Optional[float]) -> Optional[str]:
    return None if x is None else f"{x:.4f}"


def _peak_mem_mb(device: torch.device) -> Optional[float]:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    try:
        import resource

        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB
    except (ImportError, OSError):
        return None


def _progress_bar(tc: TrainConfig, initial: int, show: bool = True):
    from tqdm.auto import tqdm

    return tqdm(total=tc.max_steps, initial=initial, disable=not (tc.progress and show), unit="step", dynamic_ncols=True,
                mininterval=0.5)
