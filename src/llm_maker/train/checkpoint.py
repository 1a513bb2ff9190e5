"""Model directories and training checkpoints: one module, one save path, weights in safetensors.

A model directory (`final/`, `best/`, or the model inside a checkpoint) holds:
  model.safetensors   the weights (a tied head is stored once, as embed_tokens)
  config.json         {"model": LlamaConfig fields, "tokenizer_hash": ..., plus stage metadata}
  tokenizer.json      the tokenizer the weights were trained with

A training checkpoint `checkpoints/step_XXXXXXXX/` is a model directory plus:
  optimizer.pt        optimizer state, one process or DDP (loaded with weights_only=True)
  dcp/                with FSDP2 instead: every rank's shard of weights and optimizer state,
                      written by torch.distributed.checkpoint; it loads into any number of
                      ranks, one process included (DCP reshards on load)
  trainer_state.json  the loop's `TrainState` (step, tokens seen, last losses and metrics, the
                      best evaluation so far), the data cursor and the RNG state

Every checkpoint is assembled in `.tmp-step_XXXXXXXX/` and renamed into place by rank 0, so a
directory named `step_*` is always complete; a crash leaves only a `.tmp-*` directory, which
resume never picks and the next run of the stage removes (`remove_leftovers`).

What goes wrong on disk is said in terms of the file. Resume loads the newest checkpoint, and the
load is the check: a file that cannot be read (truncated, empty, corrupt) is named, its checkpoint
moved aside to `step_XXXXXXXX.damaged` (never deleted) and the next older one loaded instead
(`resume_checkpoint`). A write that fails (full disk, I/O error) is a CheckpointError naming the
file and the free space, with the way out; the temporary directory goes, the last good checkpoint
stays, and a checkpoint that clearly cannot fit is refused before anything is written.
"""
from __future__ import annotations

import base64
import dataclasses
import json
import os
import re
import shutil
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from llm_maker.artifacts import atomic_dir, atomic_write_json, changed_keys, is_up_to_date
from llm_maker.errors import CheckpointError, DamagedCheckpointError, LLMMakerError
from llm_maker.layout import BEST, FINAL, WEIGHTS
from llm_maker.model.llama import LlamaConfig, LlamaModel
from llm_maker.tokenizer.tokenizer import TOKENIZER_FILE, Tokenizer
from llm_maker.train.distributed import DistContext, barrier

CONFIG = "config.json"
OPTIMIZER = "optimizer.pt"
TRAINER_STATE = "trainer_state.json"
DCP_DIR = "dcp"
STEP_DIR = re.compile(r"^step_(\d{8})$")
CHECKPOINTS = "checkpoints"  # a training stage's checkpoint root
DAMAGED = ".damaged"  # the suffix of a checkpoint moved aside because a file of it could not be read


# ----------------------------------------------------------------------------------------
# Model directories
# ----------------------------------------------------------------------------------------

DEFAULT_TEMPLATE = "chatml"  # the chat format of a model whose config.json names none


@dataclass
class ModelMeta:
    """What a model directory's config.json says about the model besides its shape and
    tokenizer hash: written by `write_model_files`, read by `load_model_dir`, nowhere else."""

    stage: Optional[str] = None  # the stage that made it: pretrain, distill, sft, dpo (None: a hand-made directory)
    recipe: Optional[str] = None  # the recipe's name
    fingerprint: Optional[str] = None  # the stage fingerprint it was trained under
    # What that fingerprint hashes (artifacts.fingerprint_inputs) and, under "settings", the stage's
    # whole train config: a refused resume says which key changed, an accepted one which settings did.
    trained_with: Optional[dict[str, Any]] = None
    chat_template: Optional[str] = None  # the template SFT taught it (sft/templates.py); None: a base model
    stop_token_ids: list[int] = field(default_factory=list)  # ids that end an answer (SFT)
    base_model: Optional[str] = None  # the model directory SFT started from
    imported_from: Optional[str] = None  # the Hugging Face directory `import-hf` read
    steps: Optional[int] = None  # training summary, once finished
    tokens_seen: Optional[int] = None
    final_loss: Optional[float] = None
    val_loss: Optional[float] = None
    kept: Optional[str] = None  # which of its stage's models this is: "final" (the last step) or "best"
    best: Optional[dict[str, Any]] = None  # the stage's best evaluation: {"metric", "value", "step"}
    extra: dict[str, Any] = field(default_factory=dict)  # keys of other writers, kept as they are

    @property
    def template(self) -> str:
        """The chat format to talk to it in."""
        return self.chat_template or DEFAULT_TEMPLATE

    @property
    def is_chat_model(self) -> bool:
        return self.stage in ("sft", "dpo")

    @classmethod
    def of(cls, meta: "ModelMeta | dict[str, Any] | None") -> "ModelMeta":
        """A ModelMeta from itself, a config.json-style dict (unknown keys go to `extra`), or None."""
        if isinstance(meta, ModelMeta):
            return meta
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        raw = dict(meta or {})
        extra = {k: raw.pop(k) for k in list(raw) if k not in names}
        return cls(**raw, extra=extra)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {**d.pop("extra"), **{k: v for k, v in d.items() if v is not None and v != []}}


def model_state_dict(model: LlamaModel) -> dict[str, torch.Tensor]:
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def write_model_files(directory: Path, model: LlamaModel, tokenizer: Tokenizer,
                      meta: ModelMeta | dict[str, Any], needed: Optional[int] = None) -> None:
    """Write weights, config and tokenizer into an existing (temporary) directory. A failed write
    (full disk, I/O error) is a CheckpointError naming the file and the free space; `needed` is
    what the whole save needs in bytes, when the caller knows (else the weights' size)."""
    sd = model_state_dict(model)
    needed = needed or sum(t.nbytes for t in sd.values())
    with _writing(directory / WEIGHTS, needed):
        save_file(sd, str(directory / WEIGHTS), metadata={"format": "pt"})
    config = {"model": model.config.to_dict(), "tokenizer_hash": tokenizer.hash, **ModelMeta.of(meta).to_json()}
    with _writing(directory / CONFIG, needed):
        atomic_write_json(directory / CONFIG, config)
    with _writing(directory / TOKENIZER_FILE, needed):
        tokenizer.save(directory)


def save_model_dir(out_dir: str | Path, model: LlamaModel, tokenizer: Tokenizer,
                   meta: ModelMeta | dict[str, Any], way_out: str = "free space on that disk and retry") -> Path:
    """Write a complete model directory atomically (temp dir, then rename). A failed write is a
    CheckpointError naming the file and the free space left once the temp dir is gone, then `way_out`."""
    out_dir = Path(out_dir)
    try:
        with _writing(out_dir, catch=(OSError,)), atomic_dir(out_dir) as tmp:  # outside: mkdtemp, the rename
            write_model_files(tmp, model, tokenizer, meta)
    except _WriteFailed as e:  # atomic_dir has removed its temp dir by now
        raise e.with_way_out(way_out) from e.cause
    return out_dir


def read_model_config(model_dir: str | Path) -> dict[str, Any]:
    """config.json as stored: {"model": ..., "tokenizer_hash": ..., ModelMeta's fields}."""
    p = Path(model_dir) / CONFIG
    if not p.is_file():
        raise CheckpointError(f"{model_dir}: no {CONFIG}; not a model directory")
    return _read_json(p)


def load_model_dir(model_dir: str | Path, device: str | torch.device = "cpu",
                   expected_tokenizer_hash: Optional[str] = None,
                   dtype: torch.dtype = torch.float32) -> tuple[LlamaModel, Tokenizer, ModelMeta]:
    """Load (model, tokenizer, metadata) from a model directory or a training checkpoint, its
    weights on `device` in `dtype` (`devices.inference_dtype` chooses it for inference)."""
    model_dir = Path(model_dir)
    config = read_model_config(model_dir)
    if expected_tokenizer_hash is not None and config.get("tokenizer_hash") != expected_tokenizer_hash:
        raise CheckpointError(
            f"{model_dir}: the checkpoint was trained with tokenizer {config.get('tokenizer_hash')}, "
            f"but this run's tokenizer is {expected_tokenizer_hash}; retrain or point at the matching tokenizer"
        )
    with _reading(model_dir / CONFIG):
        cfg = LlamaConfig(**config.pop("model"))
    config.pop("tokenizer_hash", None)
    meta = ModelMeta.of(config)
    model = LlamaModel(cfg)
    load_weights(model, model_dir / WEIGHTS)
    with _reading(model_dir / TOKENIZER_FILE):
        tokenizer = Tokenizer.load(model_dir)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise CheckpointError(f"{model_dir}: tokenizer has {tokenizer.vocab_size} tokens but the model only "
                              f"{cfg.vocab_size}")
    return model.to(device=device, dtype=dtype), tokenizer, meta


def load_weights(model: LlamaModel, path: Path) -> None:
    """A safetensors file into `model`; one that cannot be read is a DamagedCheckpointError naming it."""
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    with _reading(path):
        sd = load_file(str(path))
    if model.config.tie_embeddings:
        sd["lm_head.weight"] = sd["embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match the model (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")


def full_model(model: LlamaModel, ctx: DistContext) -> Optional[LlamaModel]:
    """The whole model on rank 0 (gathered from FSDP2 shards: a collective), None elsewhere."""
    if not (ctx.enabled and _is_sharded(model)):
        return model if ctx.is_main else None
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not ctx.is_main:
        return None
    with torch.device("meta"):  # a shell that takes the gathered CPU tensors without copying them
        gathered = LlamaModel(model.config)
    gathered.load_state_dict(sd, assign=True)
    if model.config.tie_embeddings:
        gathered.lm_head.weight = gathered.embed_tokens.weight
    return gathered


def save_final_model(out_dir: Path, model: LlamaModel, tokenizer: Tokenizer, meta: ModelMeta,
                     ctx: DistContext = DistContext()) -> Path:
    """final/ (or best/): the whole model (gathered from every rank's shard under FSDP2), written
    atomically by rank 0. Every rank must call this (with FSDP2 the gather is a collective).

    A full disk is a CheckpointError, before writing when the weights clearly do not fit; the
    checkpoints are untouched, so --resume (from the last one) writes the directory again."""
    whole = full_model(model, ctx)
    if ctx.is_main:
        last = latest_checkpoint(out_dir.parent / CHECKPOINTS)
        way_out = "free space on that disk, then rerun with --resume" + (
            f": it resumes from {last.name} and writes {out_dir.name}/" if last else "")
        _refuse_if_no_room(out_dir.parent, _weights_bytes(whole), str(out_dir), way_out)
        save_model_dir(out_dir, whole, tokenizer, meta, way_out)
    barrier(ctx)
    return out_dir


def drop_stale_best(stage_dir: Path, best_step: Optional[int], ctx: DistContext = DistContext()) -> None:
    """best/ holds the model of the run's best evaluation (`best_step`) or nothing: one left by a
    start the run has gone back past (resumed from an older checkpoint, begun again without one)
    is deleted, saying so, so the evaluations replayed from here write it again. Rank 0 only."""
    best = Path(stage_dir) / BEST
    if not (ctx.is_main and best.is_dir()):
        return
    try:
        step = read_model_config(best).get("steps")
    except CheckpointError:  # no config.json (or an unreadable one): not a model directory
        step = None
    if step is None or step != best_step:
        shutil.rmtree(best, ignore_errors=True)
        print(f"removed {best}: its step {step} is not this run's best so far ({best_step}); the evaluations "
              "from here write it again", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------
# Training checkpoints
# ----------------------------------------------------------------------------------------

@dataclass
class TrainState:
    """What the training loop knows between steps; saved in every checkpoint, restored on resume."""

    step: int = 0  # optimizer steps done
    tokens_seen: int = 0
    loss: Optional[float] = None  # mean training loss over the last logged window
    val_loss: Optional[float] = None  # at the last eval step
    evals: dict[str, Any] = field(default_factory=dict)  # the caller's evaluations at the last eval step
    window_start_step: int = 0  # the previous logged row's step: the loss accumulated since covers the steps after it
    skipped_steps: int = 0  # fp16: steps skipped because their gradients overflowed
    scaler: Optional[dict[str, Any]] = None  # fp16: torch.amp.GradScaler's state (scale, growth tracker)
    # The best evaluation so far (train.best_metric) and how many evaluations since have not beaten
    # it (train.early_stop_patience): what lets a resumed run keep the same best/ and stop alike.
    best_value: Optional[float] = None
    best_step: Optional[int] = None
    evals_since_best: int = 0

    def to_json(self, grad_accum_steps: int) -> dict[str, Any]:
        # micro_batch_index: the data cursor, for a reader of the checkpoint (batches are a pure
        # function of it, so resume needs only the step).
        return {**dataclasses.asdict(self), "micro_batch_index": self.step * grad_accum_steps}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "TrainState":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})


def rng_state() -> dict[str, Any]:
    """CPU (and CUDA) torch RNG state, base64 so it fits in JSON."""
    state: dict[str, Any] = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available():
        state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    _restore_rng(_decode_rng(state))


def _decode_rng(state: dict[str, Any]) -> dict[str, Any]:
    """`rng_state()`'s JSON as tensors, checked: a state cut short fails here, before any is restored."""
    def tensor(b64: str) -> torch.Tensor:
        return torch.from_numpy(np.frombuffer(base64.b64decode(b64, validate=True), dtype=np.uint8).copy())

    cpu, expected = tensor(state["torch"]), torch.get_rng_state().numel()
    if cpu.numel() != expected:
        raise ValueError(f"the CPU RNG state has {cpu.numel()} bytes, not {expected}")
    return {"torch": cpu, "cuda": [tensor(s) for s in state.get("cuda", [])]}


def _restore_rng(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def save_checkpoint(ckpt_root: str | Path, model: LlamaModel, optimizer: Any, tokenizer: Tokenizer,
                    meta: ModelMeta, state: TrainState, grad_accum_steps: int, keep: int,
                    ctx: DistContext = DistContext(), sharded: bool = False) -> Path:
    """Write checkpoints/step_N (N = state.step) atomically, then prune all but the newest `keep`.

    One process or DDP: rank 0 writes the weights and optimizer.pt. FSDP2 (`sharded`): every
    rank writes its shard into dcp/ and rank 0 adds the gathered weights, so the checkpoint is
    still a model directory. Every rank must call this (barriers and, with FSDP2, collectives).

    Disk space (rank 0): a checkpoint is as big as the last one, so one that clearly cannot fit is
    refused before writing, and a warning says when the next one will not; a write that fails
    anyway removes the temp dir. Both are a CheckpointError naming the file and the free space,
    the last good checkpoint intact."""
    root = Path(ckpt_root)
    out = root / f"step_{state.step:08d}"
    tmp = out.with_name(f".tmp-{out.name}")  # one name for every rank: with FSDP2 they all write into it
    last, needed = None, None
    if ctx.is_main:  # with FSDP2 the first checkpoint's size is not known here: only this rank's shards are
        def first() -> Optional[int]:
            return None if sharded else _weights_bytes(model) + _tensor_bytes(optimizer.state_dict())

        last, needed = _room_for_checkpoint(root, out.name, keep, first)
    try:
        if ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            with _writing(tmp, needed):
                tmp.mkdir(parents=True)
        barrier(ctx)
        if sharded:
            with _one_process_is_intended(), _writing(tmp / DCP_DIR, needed):
                dcp.save(_dcp_state(model, optimizer), checkpoint_id=tmp / DCP_DIR, no_dist=not ctx.enabled)
        whole = full_model(model, ctx)
        if ctx.is_main:
            write_model_files(tmp, whole, tokenizer, meta, needed)
            if not sharded:
                optimizer_state = optimizer.state_dict()
                # Our own file object: a failed write closes it here (torch's writer, kept alive by
                # the traceback, would hold the deleted file's space), and ENOSPC comes as OSError.
                with _writing(tmp / OPTIMIZER, needed), open(tmp / OPTIMIZER, "wb") as f:
                    torch.save(optimizer_state, f)
            trainer_state = {**state.to_json(grad_accum_steps), "rng": rng_state()}
            with _writing(tmp / TRAINER_STATE, needed):
                atomic_write_json(tmp / TRAINER_STATE, trainer_state)
            with _writing(out, needed):
                if out.exists():
                    shutil.rmtree(out)
                os.replace(tmp, out)
    except BaseException as e:
        if ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # the last good checkpoint stays the newest
        if isinstance(e, _WriteFailed):
            raise e.with_way_out(_checkpoint_way_out(last)) from e.cause
        raise
    if ctx.is_main:
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(ctx)
    return out


def load_checkpoint(ckpt: Path, model: LlamaModel, optimizer: Any, tokenizer: Tokenizer) -> TrainState:
    """Restore weights, optimizer state (from a checkpoint of any world size) and RNG into this
    run; refuse a checkpoint of another tokenizer or model shape.

    Loading is the check: a file that cannot be read is a DamagedCheckpointError naming it. The
    small files are read first and the RNG is restored last, so a damaged checkpoint leaves the
    RNG as it was; weights already loaded are overwritten whole by the next checkpoint's load."""
    config = _read_json(ckpt / CONFIG)
    if config.get("tokenizer_hash") != tokenizer.hash:
        raise CheckpointError(f"{ckpt}: trained with tokenizer {config.get('tokenizer_hash')}, but this run's "
                              f"tokenizer is {tokenizer.hash}; use --force to start over")
    if config.get("model") != model.config.to_dict():
        raise CheckpointError(f"{ckpt}: model shape {config.get('model')} differs from the recipe's "
                              f"{model.config.to_dict()}; use --force to start over")
    state, rng = read_trainer_state(ckpt / TRAINER_STATE)
    if (ckpt / DCP_DIR).is_dir():
        sd = _dcp_state(model, optimizer)
        no_dist = not (dist.is_available() and dist.is_initialized())
        with _one_process_is_intended(), _reading(ckpt / DCP_DIR):
            dcp.load(sd, checkpoint_id=ckpt / DCP_DIR, no_dist=no_dist)  # reshards to this run's ranks
        set_model_state_dict(model, sd["model"])
        set_optimizer_state_dict(model, _optimizers(optimizer), sd["optim"])
    elif _is_sharded(model):
        raise CheckpointError(f"{ckpt}: written by one process or DDP (no {DCP_DIR}/), but this run shards the "
                              f"model (train.distributed: fsdp2); resume it with train.distributed: ddp")
    else:
        load_weights(model, ckpt / WEIGHTS)
        with _reading(ckpt / OPTIMIZER):
            optimizer_state = torch.load(ckpt / OPTIMIZER, map_location="cpu", weights_only=True)
            if not isinstance(optimizer_state, dict) or not optimizer_state:
                raise ValueError(f"holds {type(optimizer_state).__name__}, not an optimizer state")
        optimizer.load_state_dict(optimizer_state)
    _restore_rng(rng)
    return state


def read_trainer_state(path: Path) -> tuple[TrainState, dict[str, Any]]:
    """A checkpoint's trainer_state.json: its TrainState and RNG state (decoded, not yet restored)."""
    raw = _read_json(path)
    with _reading(path):
        if not isinstance(raw.get("step"), int) or not isinstance(raw.get("rng"), dict):
            raise ValueError("no step count or no RNG state")
        return TrainState.from_json(raw), _decode_rng(raw["rng"])


def resume_checkpoint(ckpt_root: str | Path, model: LlamaModel, optimizer: Any, tokenizer: Tokenizer, keep: int,
                      ctx: DistContext = DistContext()) -> tuple[Optional[Path], TrainState]:
    """Load the newest intact checkpoint into this run: (it, its state), or (None, a fresh state)
    when there is none. Every rank calls this.

    A checkpoint with a file that cannot be read is skipped for the next older one; once one
    loads, rank 0 moves the damaged ones aside to `step_N.damaged` (never deleting them), one line
    each saying which file and why. When none loads, a CheckpointError names every damaged file
    and nothing is moved. Checkpoints beyond `keep` (lowered since they were written) are deleted,
    as the next save would: what lets a lower train.keep_checkpoints make room on a full disk."""
    root = Path(ckpt_root)
    damaged: list[tuple[Path, DamagedCheckpointError]] = []
    for ckpt in reversed(list_checkpoints(root)):
        try:
            state = load_checkpoint(ckpt, model, optimizer, tokenizer)
            break
        except DamagedCheckpointError as e:
            damaged.append((ckpt, e))
    else:
        if damaged:
            raise CheckpointError(f"no intact checkpoint in {root}: " + "; ".join(str(e) for _, e in damaged)
                                  + "; restore those files, or pass --force to start over")
        return None, TrainState()
    barrier(ctx)  # every rank has read its checkpoint before rank 0 moves or deletes any
    if ctx.is_main:
        for bad, e in damaged:
            aside = _move_aside(bad)
            print(f"checkpoint {bad.name} is damaged ({e}): moved it to {aside.name} and resuming from "
                  f"{ckpt.name}", file=sys.stderr, flush=True)
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
            print(f"removed {old.name}: train.keep_checkpoints is {keep}", file=sys.stderr, flush=True)
    return ckpt, state


def list_checkpoints(ckpt_root: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first. `.tmp-*` (partial) and `step_N.damaged` (moved aside)
    directories never match."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)
             and (p / TRAINER_STATE).is_file() and (p / WEIGHTS).is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(ckpt_root: str | Path) -> Optional[Path]:
    ckpts = list_checkpoints(ckpt_root)
    return ckpts[-1] if ckpts else None


def check_resumable(stage_dir: Path, fingerprint: str, what: str, retrain: str,
                    trained_with: Optional[dict[str, Any]] = None, log: bool = True) -> None:
    """Resuming is for an interrupted run of the same config: refuse the newest checkpoint if it
    was written with another `what` (config, data, base model), rather than silently continue
    -- or "finish" at zero steps -- from another run's state. `retrain` says how to start over.

    With `trained_with` (ModelMeta.trained_with of this run) the refusal names the keys that
    changed; settings that change no result (train.keep_checkpoints, log_every, ...) may change,
    and are listed when they did (`log`: rank 0)."""
    for ckpt in reversed(list_checkpoints(Path(stage_dir) / "checkpoints")):
        try:  # the newest whose config.json reads: the trainer moves damaged ones aside and says so
            saved = read_model_config(ckpt)
            break
        except DamagedCheckpointError:
            continue
    else:
        return
    before = saved.get("trained_with") or {}
    if saved.get("fingerprint") != fingerprint:
        changes = changed_keys({k: before.get(k) for k in ("config", "upstream", "extra")},
                               {k: (trained_with or {}).get(k) for k in ("config", "upstream", "extra")})
        said = f" (changed: {'; '.join(changes[:8])})" if before and trained_with and changes else ""
        raise CheckpointError(f"{ckpt} was written with another {what}{said}; {retrain}")
    settings = changed_keys(before.get("settings"), (trained_with or {}).get("settings"))
    if log and before and trained_with and settings:
        print(f"resuming from {ckpt.name} with changed settings that change no result: {'; '.join(settings)}",
              flush=True)


def _is_sharded(model: LlamaModel) -> bool:
    return any(hasattr(p, "full_tensor") for p in model.parameters())  # FSDP2's DTensor parameters


@contextmanager
def _one_process_is_intended():
    """DCP warns whenever it runs without a process group; one process is a supported case here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _optimizers(optimizer: Any) -> list[torch.optim.Optimizer]:
    return list(optimizer.optimizers.values()) if hasattr(optimizer, "optimizers") else [optimizer]


def _dcp_state(model: LlamaModel, optimizer: Any) -> dict[str, Any]:
    # Keys are parameter names, whatever the sharding: what lets N ranks load M ranks' shards.
    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, _optimizers(optimizer))}


def prepare_stage_dir(out: Path, fingerprint: str, force: bool, resume: bool, ctx: DistContext, stage: str,
                      what: str, retrain: str, trained_with: Optional[dict[str, Any]] = None) -> bool:
    """The prologue of a training stage (pretrain, SFT): True when `out` already holds this
    config's finished run (nothing to do). --force deletes `out` (rank 0, behind a barrier);
    a finished run of another config is refused without --force; --resume is refused from a
    checkpoint of another `what` (check_resumable). Every rank calls this."""
    if force:
        if ctx.is_main:
            shutil.rmtree(out, ignore_errors=True)
        barrier(ctx)  # no rank starts writing into `out` while rank 0 deletes it
    elif is_up_to_date(out, fingerprint) and (out / "final").is_dir():
        return True
    elif (out / "manifest.json").is_file() and not resume:
        raise CheckpointError(f"{out} holds a finished {stage} run with another config; pass --force to retrain")
    if resume:
        check_resumable(out, fingerprint, what, retrain, trained_with, log=ctx.is_main)
    return False


# ----------------------------------------------------------------------------------------
# Damaged files, full disks and leftovers: errors that name the file
# ----------------------------------------------------------------------------------------

def remove_leftovers(stage_dir: str | Path, ctx: DistContext = DistContext()) -> list[Path]:
    """Delete what killed writes left in a training stage's directory (`checkpoints/.tmp-step_*`,
    `.tmp-final-*`, `.tmp-best-*`: as big as a checkpoint each), saying so in one line. Rank 0
    only, before any rank writes."""
    if not ctx.is_main:
        return []
    stage_dir = Path(stage_dir)
    patterns = (f"{CHECKPOINTS}/.tmp-step_*", f".tmp-{FINAL}-*", f".tmp-{BEST}-*")
    found = [p for pattern in patterns for p in sorted(stage_dir.glob(pattern)) if p.is_dir()]
    if found:
        size = sum(_tree_bytes(p) for p in found)
        for p in found:
            shutil.rmtree(p, ignore_errors=True)
        print(f"removed what killed writes left in {stage_dir} ({_size(size)}): "
              f"{', '.join(str(p.relative_to(stage_dir)) for p in found)}", file=sys.stderr, flush=True)
    return found


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Any failure to read `path` in the block is a DamagedCheckpointError naming it and why."""
    if not path.exists():
        raise DamagedCheckpointError(path, "missing")
    try:
        yield
    except DamagedCheckpointError:
        raise
    except (Exception, CheckpointException) as e:  # safetensors, torch.load, json, DCP: each its own error
        raise DamagedCheckpointError(path, _unreadable(path, e)) from e


def _read_json(path: Path) -> dict[str, Any]:
    with _reading(path):
        raw = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(raw, dict):
            raise ValueError(f"holds a JSON {type(raw).__name__}, not an object")
    return raw


def _unreadable(path: Path, e: BaseException) -> str:
    if path.is_file() and path.stat().st_size == 0:
        return "empty (0 bytes)"
    said = str(e).removeprefix(f"{path}: ") if isinstance(e, LLMMakerError) else _first_line(e)
    return f"truncated or corrupt: {said}"


def _first_line(e: BaseException) -> str:
    if isinstance(e, CheckpointException) and e.failures:  # DCP: what failed on the first rank that failed
        rank, (cause, _) = next(iter(e.failures.items()))
        return f"rank {rank}: {_first_line(cause)}"
    lines = (e.strerror if isinstance(e, OSError) and e.strerror else str(e)).strip().splitlines()
    first = re.split(r"(?<=[a-z])\. ", lines[0])[0][:200] if lines else ""  # its first sentence
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _move_aside(ckpt: Path) -> Path:
    aside, n = ckpt.with_name(ckpt.name + DAMAGED), 1
    while aside.exists():  # moved aside before (the step was redone and damaged again)
        n += 1
        aside = ckpt.with_name(f"{ckpt.name}{DAMAGED}-{n}")
    os.replace(ckpt, aside)
    return aside


_WRITE_ERRORS = (OSError, RuntimeError, CheckpointException)  # torch.save may say "full disk" as a RuntimeError


class _WriteFailed(CheckpointError):
    """Writing `path` failed; the caller that owns the temp dir removes it, then re-raises with
    the way out (`with_way_out`), so the free space said is what is really left."""

    def __init__(self, path: Path, cause: BaseException, needed: Optional[int]):
        self.path, self.cause, self.needed = path, cause, needed
        super().__init__(self.message("free space on that disk and retry"))

    def message(self, way_out: str) -> str:
        return (f"could not write {self.path} ({_first_line(self.cause)}): {_room(self.path.parent, self.needed)}; "
                f"{way_out}")

    def with_way_out(self, way_out: str) -> CheckpointError:
        return CheckpointError(self.message(way_out))


@contextmanager
def _writing(path: Path, needed: Optional[int] = None, catch: tuple[type[BaseException], ...] = _WRITE_ERRORS):
    try:
        yield
    except _WriteFailed:
        raise
    except catch as e:
        raise _WriteFailed(path, e, needed) from e


def _room_for_checkpoint(root: Path, name: str, keep: int,
                         first: Callable[[], Optional[int]]) -> tuple[Optional[Path], Optional[int]]:
    """(the last good checkpoint, the bytes the next one needs: as many as the last took, or for
    the first, `first()`: its tensors' bytes). Refuses a checkpoint that clearly cannot fit, before
    writing; warns when, after this one and the pruning that follows it, the next will not fit."""
    existing = list_checkpoints(root)
    last = existing[-1] if existing else None
    needed = _tree_bytes(last) if last else first()
    if not needed:
        return last, None
    as_big = f"as big as {last.name}" if last else "its weights and optimizer state"
    _refuse_if_no_room(root, needed, f"checkpoint {name} ({as_big})", _checkpoint_way_out(last))
    pruned = sum(_tree_bytes(p) for p in existing[:max(0, len(existing) + 1 - keep)])
    if shutil.disk_usage(_existing(root)).free - needed + pruned < needed:
        print(f"warning: after checkpoint {name} the next one will not fit: {_room(root, needed)}; free space "
              "or lower train.keep_checkpoints", file=sys.stderr, flush=True)
    return last, needed


def _refuse_if_no_room(directory: Path, needed: int, what: str, way_out: str) -> None:
    if shutil.disk_usage(_existing(directory)).free < needed:
        raise CheckpointError(f"not enough space to write {what}, so nothing was written: "
                              f"{_room(directory, needed)}; {way_out}")


def _checkpoint_way_out(last: Optional[Path]) -> str:
    if last is None:
        return "free space on that disk, then rerun"
    return (f"the last good checkpoint {last} is intact; free space on that disk, or lower train.keep_checkpoints "
            "(resume deletes the checkpoints beyond it), then rerun with --resume")


def _room(directory: Path, needed: Optional[int]) -> str:
    """'X free of Y on the filesystem at M, about Z needed'."""
    where = _existing(directory)
    usage = shutil.disk_usage(where)
    mount = where
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    need = f", about {_size(needed)} needed" if needed else ""
    return f"{_size(usage.free)} free of {_size(usage.total)} on the filesystem at {mount}{need}"


def _existing(p: Path) -> Path:
    p = Path(p).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _weights_bytes(model: LlamaModel) -> int:
    """What model.safetensors will take, without copying the weights off the device."""
    sd = model.state_dict()
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return sum(t.nbytes for t in sd.values())


def _tensor_bytes(obj: Any) -> int:
    """The bytes of the tensors in a (nested) state dict."""
    if isinstance(obj, torch.Tensor):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    return sum(_tensor_bytes(v) for v in obj) if isinstance(obj, (list, tuple)) else 0


def _tree_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def _size(n: int) -> str:
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
