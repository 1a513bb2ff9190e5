"""Model directories and training checkpoints, written atomically with weights in safetensors.

A model directory (`final/`, or the model inside a checkpoint) holds:
  model.safetensors   the weights (a tied head is stored once, as embed_tokens)
  config.json         {"model": LlamaConfig fields, "tokenizer_hash": ..., plus stage metadata}
  tokenizer.json      the tokenizer the weights were trained with

A training checkpoint `checkpoints/step_XXXXXXXX/` adds:
  optimizer.pt        optimizer state (loaded with weights_only=True)
  trainer_state.json  step, data cursor, tokens seen, RNG state, metrics so far
Checkpoints are built in a `.tmp-*` directory and renamed into place, so a directory named
`step_*` is always complete; a crash leaves only a `.tmp-*` directory that is ignored.
"""
from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

from llm_maker.artifacts import atomic_dir, atomic_write_json
from llm_maker.errors import CheckpointError
from llm_maker.model.llama import LlamaConfig, LlamaModel
from llm_maker.tokenizer.tokenizer import Tokenizer

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
STEP_DIR = re.compile(r"^step_(\d{8})$")


def model_state_dict(model: LlamaModel) -> dict[str, torch.Tensor]:
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def write_model_files(directory: Path, model: LlamaModel, tokenizer: Tokenizer, meta: dict[str, Any]) -> None:
    """Write weights, config and tokenizer into an existing (temporary) directory."""
    save_file(model_state_dict(model), str(directory / WEIGHTS), metadata={"format": "pt"})
    config = {"model": model.config.to_dict(), "tokenizer_hash": tokenizer.hash, **meta}
    atomic_write_json(directory / CONFIG, config)
    tokenizer.save(directory)


def save_model_dir(out_dir: str | Path, model: LlamaModel, tokenizer: Tokenizer, meta: dict[str, Any]) -> Path:
    """Write a complete model directory atomically (temp dir, then rename)."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        write_model_files(tmp, model, tokenizer, meta)
    return out_dir


def read_model_config(model_dir: str | Path) -> dict[str, Any]:
    p = Path(model_dir) / CONFIG
    if not p.is_file():
        raise CheckpointError(f"{model_dir}: no {CONFIG}; not a model directory")
    return json.loads(p.read_text(encoding="utf-8"))


def load_model_dir(model_dir: str | Path, device: str | torch.device = "cpu",
                   expected_tokenizer_hash: Optional[str] = None) -> tuple[LlamaModel, Tokenizer, dict[str, Any]]:
    """Load (model, tokenizer, config) from a model directory or a training checkpoint."""
    model_dir = Path(model_dir)
    meta = read_model_config(model_dir)
    if expected_tokenizer_hash is not None and meta.get("tokenizer_hash") != expected_tokenizer_hash:
        raise CheckpointError(
            f"{model_dir}: the checkpoint was trained with tokenizer {meta.get('tokenizer_hash')}, "
            f"but this run's tokenizer is {expected_tokenizer_hash}; retrain or point at the matching tokenizer"
        )
    cfg = LlamaConfig(**meta["model"])
    model = LlamaModel(cfg)
    load_weights(model, model_dir / WEIGHTS)
    tokenizer = Tokenizer.load(model_dir)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise CheckpointError(f"{model_dir}: tokenizer has {tokenizer.vocab_size} tokens but the model only {cfg.vocab_size}")
    return model.to(device), tokenizer, meta


def load_weights(model: LlamaModel, path: Path) -> None:
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    sd = load_file(str(path))
    if model.config.tie_embeddings:
        sd["lm_head.weight"] = sd["embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")


# ----------------------------------------------------------------------------------------
# Training checkpoints
# ----------------------------------------------------------------------------------------

def rng_state() -> dict[str, str]:
    """CPU (and CUDA) torch RNG state, base64 so it fits in JSON."""
    state = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available():
        state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(torch.from_numpy(np.frombuffer(base64.b64decode(state["torch"]), dtype=np.uint8).copy()))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(
            [torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype=np.uint8).copy()) for s in state["cuda"]])


def save_checkpoint(ckpt_root: str | Path, step: int, model: LlamaModel, optimizer: torch.optim.Optimizer,
                    tokenizer: Tokenizer, meta: dict[str, Any], trainer_state: dict[str, Any], keep: int) -> Path:
    """Write checkpoints/step_XXXXXXXX atomically, then prune all but the newest `keep`."""
    ckpt_root = Path(ckpt_root)
    out = ckpt_root / f"step_{step:08d}"
    with atomic_dir(out) as tmp:
        write_model_files(tmp, model, tokenizer, meta)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        atomic_write_json(tmp / "trainer_state.json", {**trainer_state, "step": step, "rng": rng_state()})
    for old in list_checkpoints(ckpt_root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return out


def list_checkpoints(ckpt_root: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first. `.tmp-*` (partial) directories never match."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)
             and (p / "trainer_state.json").is_file() and (p / WEIGHTS).is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(ckpt_root: str | Path) -> Optional[Path]:
    ckpts = list_checkpoints(ckpt_root)
    return ckpts[-1] if ckpts else None


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))


def load_optimizer_state(ckpt: Path) -> dict[str, Any]:
    return torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)


def check_resumable(stage_dir: Path, fingerprint_: str, what: str, retrain: str) -> None:
    """Resuming is for an interrupted run of the same config: refuse the newest checkpoint if it
    was written with another `what` (config, data, base model), rather than silently continue
    -- or "finish" at zero steps -- from another run's state. `retrain` says how to start over."""
    ckpt = latest_checkpoint(Path(stage_dir) / "checkpoints")
    if ckpt is not None and read_model_config(ckpt).get("fingerprint") != fingerprint_:
        raise CheckpointError(f"{ckpt} was written with another {what}; {retrain}")
