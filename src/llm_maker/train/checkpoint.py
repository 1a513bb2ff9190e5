"""Model directories and training checkpoints: one module, one save path, weights in safetensors.

A model directory (`final/`, or the model inside a checkpoint) holds:
  model.safetensors   the weights (a tied head is stored once, as embed_tokens)
  config.json         {"model": LlamaConfig fields, "tokenizer_hash": ..., plus stage metadata}
  tokenizer.json      the tokenizer the weights were trained with

A training checkpoint `checkpoints/step_XXXXXXXX/` is a model directory plus:
  optimizer.pt        optimizer state, one process or DDP (loaded with weights_only=True)
  dcp/                with FSDP2 instead: every rank's shard of weights and optimizer state,
                      written by torch.distributed.checkpoint; it loads into any number of
                      ranks, one process included (DCP reshards on load)
  trainer_state.json  the loop's `TrainState` (step, tokens seen, last losses and metrics),
                      the data cursor and the RNG state

Every checkpoint is assembled in `.tmp-step_XXXXXXXX/` and renamed into place by rank 0, so a
directory named `step_*` is always complete; a crash leaves only a `.tmp-*` directory, which
resume never picks.
"""
from __future__ import annotations

import base64
import dataclasses
import json
import os
import re
import shutil
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from llm_maker.artifacts import atomic_dir, atomic_write_json, is_up_to_date
from llm_maker.errors import CheckpointError
from llm_maker.layout import WEIGHTS
from llm_maker.model.llama import LlamaConfig, LlamaModel
from llm_maker.tokenizer.tokenizer import Tokenizer
from llm_maker.train.distributed import DistContext, barrier

CONFIG = "config.json"
OPTIMIZER = "optimizer.pt"
TRAINER_STATE = "trainer_state.json"
DCP_DIR = "dcp"
STEP_DIR = re.compile(r"^step_(\d{8})$")


# ----------------------------------------------------------------------------------------
# Model directories
# ----------------------------------------------------------------------------------------

DEFAULT_TEMPLATE = "chatml"  # the chat format of a model whose config.json names none


@dataclass
class ModelMeta:
    """What a model directory's config.json says about the model besides its shape and
    tokenizer hash: written by `write_model_files`, read by `load_model_dir`, nowhere else."""

    stage: Optional[str] = None  # the stage that made it: pretrain, sft (None: a hand-made directory)
    recipe: Optional[str] = None  # the recipe's name
    fingerprint: Optional[str] = None  # the stage fingerprint it was trained under
    chat_template: Optional[str] = None  # the template SFT taught it (sft/templates.py); None: a base model
    stop_token_ids: list[int] = field(default_factory=list)  # ids that end an answer (SFT)
    base_model: Optional[str] = None  # the model directory SFT started from
    imported_from: Optional[str] = None  # the Hugging Face directory `import-hf` read
    steps: Optional[int] = None  # training summary, once finished
    tokens_seen: Optional[int] = None
    final_loss: Optional[float] = None
    val_loss: Optional[float] = None
    extra: dict[str, Any] = field(default_factory=dict)  # keys of other writers, kept as they are

    @property
    def template(self) -> str:
        """The chat format to talk to it in."""
        return self.chat_template or DEFAULT_TEMPLATE

    @property
    def is_chat_model(self) -> bool:
        return self.stage == "sft"

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
                      meta: ModelMeta | dict[str, Any]) -> None:
    """Write weights, config and tokenizer into an existing (temporary) directory."""
    save_file(model_state_dict(model), str(directory / WEIGHTS), metadata={"format": "pt"})
    config = {"model": model.config.to_dict(), "tokenizer_hash": tokenizer.hash, **ModelMeta.of(meta).to_json()}
    atomic_write_json(directory / CONFIG, config)
    tokenizer.save(directory)


def save_model_dir(out_dir: str | Path, model: LlamaModel, tokenizer: Tokenizer,
                   meta: ModelMeta | dict[str, Any]) -> Path:
    """Write a complete model directory atomically (temp dir, then rename)."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        write_model_files(tmp, model, tokenizer, meta)
    return out_dir


def read_model_config(model_dir: str | Path) -> dict[str, Any]:
    """config.json as stored: {"model": ..., "tokenizer_hash": ..., ModelMeta's fields}."""
    p = Path(model_dir) / CONFIG
    if not p.is_file():
        raise CheckpointError(f"{model_dir}: no {CONFIG}; not a model directory")
    return json.loads(p.read_text(encoding="utf-8"))


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
    cfg = LlamaConfig(**config.pop("model"))
    config.pop("tokenizer_hash", None)
    meta = ModelMeta.of(config)
    model = LlamaModel(cfg)
    load_weights(model, model_dir / WEIGHTS)
    tokenizer = Tokenizer.load(model_dir)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise CheckpointError(f"{model_dir}: tokenizer has {tokenizer.vocab_size} tokens but the model only "
                              f"{cfg.vocab_size}")
    return model.to(device=device, dtype=dtype), tokenizer, meta


def load_weights(model: LlamaModel, path: Path) -> None:
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
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
    """final/: the whole model (gathered from every rank's shard under FSDP2), written by rank 0."""
    whole = full_model(model, ctx)
    if ctx.is_main:
        save_model_dir(out_dir, whole, tokenizer, meta)
    barrier(ctx)
    return out_dir


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
    def tensor(b64: str) -> torch.Tensor:
        return torch.from_numpy(np.frombuffer(base64.b64decode(b64), dtype=np.uint8).copy())

    torch.set_rng_state(tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensor(s) for s in state["cuda"]])


def save_checkpoint(ckpt_root: str | Path, model: LlamaModel, optimizer: Any, tokenizer: Tokenizer,
                    meta: ModelMeta, state: TrainState, grad_accum_steps: int, keep: int,
                    ctx: DistContext = DistContext(), sharded: bool = False) -> Path:
    """Write checkpoints/step_N (N = state.step) atomically, then prune all but the newest `keep`.

    One process or DDP: rank 0 writes the weights and optimizer.pt. FSDP2 (`sharded`): every
    rank writes its shard into dcp/ and rank 0 adds the gathered weights, so the checkpoint is
    still a model directory. Every rank must call this (barriers and, with FSDP2, collectives)."""
    out = Path(ckpt_root) / f"step_{state.step:08d}"
    tmp = out.with_name(f".tmp-{out.name}")  # one name for every rank: with FSDP2 they all write into it
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(ctx)
    if sharded:
        with _one_process_is_intended():
            dcp.save(_dcp_state(model, optimizer), checkpoint_id=tmp / DCP_DIR, no_dist=not ctx.enabled)
    whole = full_model(model, ctx)
    if ctx.is_main:
        write_model_files(tmp, whole, tokenizer, meta)
        if not sharded:
            torch.save(optimizer.state_dict(), tmp / OPTIMIZER)
        atomic_write_json(tmp / TRAINER_STATE, {**state.to_json(grad_accum_steps), "rng": rng_state()})
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        for old in list_checkpoints(ckpt_root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(ctx)
    return out


def load_checkpoint(ckpt: Path, model: LlamaModel, optimizer: Any, tokenizer: Tokenizer) -> TrainState:
    """Restore weights, optimizer state (from a checkpoint of any world size) and RNG into this
    run; refuse a checkpoint of another tokenizer or model shape."""
    config = read_model_config(ckpt)
    if config.get("tokenizer_hash") != tokenizer.hash:
        raise CheckpointError(f"{ckpt}: trained with tokenizer {config.get('tokenizer_hash')}, but this run's "
                              f"tokenizer is {tokenizer.hash}; use --force to start over")
    if config["model"] != model.config.to_dict():
        raise CheckpointError(f"{ckpt}: model shape {config['model']} differs from the recipe's "
                              f"{model.config.to_dict()}; use --force to start over")
    if (ckpt / DCP_DIR).is_dir():
        state = _dcp_state(model, optimizer)
        no_dist = not (dist.is_available() and dist.is_initialized())
        with _one_process_is_intended():
            dcp.load(state, checkpoint_id=ckpt / DCP_DIR, no_dist=no_dist)  # reshards to this run's ranks
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, _optimizers(optimizer), state["optim"])
    elif _is_sharded(model):
        raise CheckpointError(f"{ckpt}: written by one process or DDP (no {DCP_DIR}/), but this run shards the "
                              f"model (train.distributed: fsdp2); resume it with train.distributed: ddp")
    else:
        load_weights(model, ckpt / WEIGHTS)
        optimizer.load_state_dict(torch.load(ckpt / OPTIMIZER, map_location="cpu", weights_only=True))
    raw = json.loads((ckpt / TRAINER_STATE).read_text(encoding="utf-8"))
    set_rng_state(raw["rng"])
    return TrainState.from_json(raw)


def list_checkpoints(ckpt_root: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first. `.tmp-*` (partial) directories never match."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)
             and (p / TRAINER_STATE).is_file() and (p / WEIGHTS).is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(ckpt_root: str | Path) -> Optional[Path]:
    ckpts = list_checkpoints(ckpt_root)
    return ckpts[-1] if ckpts else None


def check_resumable(stage_dir: Path, fingerprint: str, what: str, retrain: str) -> None:
    """Resuming is for an interrupted run of the same config: refuse the newest checkpoint if it
    was written with another `what` (config, data, base model), rather than silently continue
    -- or "finish" at zero steps -- from another run's state. `retrain` says how to start over."""
    ckpt = latest_checkpoint(Path(stage_dir) / "checkpoints")
    if ckpt is not None and read_model_config(ckpt).get("fingerprint") != fingerprint:
        raise CheckpointError(f"{ckpt} was written with another {what}; {retrain}")


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
                      what: str, retrain: str) -> bool:
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
        check_resumable(out, fingerprint, what, retrain)
    return False
