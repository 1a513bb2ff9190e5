"""The YAML recipe: one file drives a run, validated in full before any compute.

A recipe is a tree of typed dataclasses. `load_recipe(path)` reads the YAML, rejects unknown
keys and wrong types with an error naming the key and the file, resolves relative paths
against the recipe's folder, fills the model shape from a named preset, and checks that the
shapes are possible (`d_model % n_heads == 0`, ...) and that the input files exist.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from llm_maker.errors import RecipeError
from llm_maker.typed_yaml import parse_dataclass


@dataclass
class SourceConfig:
    """One input of the corpus. `type`: builtin | text | jsonl | parquet | fineweb-edu."""

    type: str = "builtin"
    path: Optional[str] = None  # file or folder (text/jsonl/parquet; fineweb-edu: a local folder, else download)
    text_field: str = "text"  # jsonl/parquet column holding the document
    max_documents: Optional[int] = None  # cap for this source (applied after reading, before selection)
    # fineweb-edu only (see data/fineweb.py): which shards to download, and row filters on its columns
    repo_id: str = "HuggingFaceFW/fineweb-edu"
    config: str = "sample-10BT"  # sample-10BT | sample-100BT | sample-350BT | default | CC-MAIN-2024-10 ...
    revision: str = "main"
    cache_dir: Optional[str] = None  # download folder; default ~/.cache/llm-maker/hub
    max_files: Optional[int] = None  # download only the first N parquet shards of the config
    min_score: Optional[float] = None
    min_int_score: Optional[int] = None
    min_language_score: Optional[float] = None
    min_token_count: Optional[int] = None
    max_token_count: Optional[int] = None


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=lambda: [SourceConfig()])
    selection_key: str = "llm-maker"  # BLAKE2b key: same key -> same subset and split everywhere
    fraction: float = 1.0  # keep documents whose keyed hash falls below this fraction
    max_documents: Optional[int] = None  # then keep at most this many, lowest hash first
    val_fraction: float = 0.05
    min_chars: int = 1  # drop documents shorter than this (after stripping)


@dataclass
class TokenizerConfig:
    """`type: bpe` trains a byte-level BPE; `type: pretrained` loads `path`: a tokenizer.json, a
    folder holding one (or a Hugging Face tokenizer's other files), or a tiktoken `.tiktoken` file."""

    type: str = "bpe"
    vocab_size: int = 4096
    min_frequency: int = 2
    path: Optional[str] = None
    max_train_chars: Optional[int] = None  # cap on training text (hash-ordered sample)
    tiktoken_encoding: Optional[str] = None  # a .tiktoken file's encoding (cl100k_base...); None: its file name


@dataclass
class PackConfig:
    dtype: str = "auto"  # auto | uint16 | uint32
    workers: int = 2
    batch_documents: int = 256  # documents per encode_batch call
    shard_tokens: int = 100_000_000  # tokens per shard file at most (200 MB in uint16), written as it fills


@dataclass
class ModelConfigSpec:
    """Model shape in the recipe: a preset name and/or explicit dims (explicit wins)."""

    preset: Optional[str] = "tiny"
    n_layers: Optional[int] = None
    d_model: Optional[int] = None
    n_heads: Optional[int] = None
    n_kv_heads: Optional[int] = None
    d_mlp: Optional[int] = None
    vocab_size: Optional[int] = None  # None: take it from the tokenizer
    seq_len: Optional[int] = None
    tie_embeddings: Optional[bool] = None
    rope_theta: Optional[float] = None
    norm_eps: Optional[float] = None
    # Continued pretraining: start from this model directory (e.g. RUN/pretrain/final made by
    # `llm-maker import-hf`); its config.json then gives the shape and the dims above must be unset.
    init_from: Optional[str] = None


@dataclass
class TrainConfig:
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    precision: str = "auto"  # auto (bf16 where supported) | bf16 | fp32
    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    max_steps: int = 200
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to this fraction of the peak
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 8
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    log_every: int = 10
    compile: bool = False
    activation_checkpointing: bool = False
    seed: int = 1337
    progress: bool = True
    peak_tflops: Optional[float] = None  # device peak for MFU; None: look the device up in train/mfu.py
    # Under torchrun with N > 1 ranks: ddp (replicated model) | fsdp2 (fully_shard, sharded checkpoints).
    # grad_accum_steps counts micro-batches per step over all ranks (each rank runs 1/N of them).
    distributed: str = "ddp"
    optimizer: str = "adamw"  # adamw | muon (Muon for the blocks' matrices, AdamW for embeddings, head, norms)
    loss_chunk_size: int = 0  # > 0: the loss goes through the head this many tokens at a time (no full logits)
    mc_eval: Optional[str] = None  # multiple-choice jsonl (context/choices/label) scored at every eval step
    mc_eval_items: Optional[int] = 200  # score at most this many of its items (None: all)
    # Optional experiment tracking beside metrics.csv (the `tracking` extra; never required):
    tensorboard: bool = False  # TensorBoard event files in <stage>/tensorboard/
    wandb: bool = False  # Weights & Biases (set WANDB_MODE=offline to keep it on this machine)
    wandb_project: str = "llm-maker"


@dataclass
class SFTSourceConfig:
    """One instruction set of a mixture (see sft/formats.py)."""

    source: str = "builtin"  # builtin | a .jsonl/.parquet file | hf:owner/name[:config] (needs `datasets`)
    format: str = "auto"  # auto | messages | sharegpt | alpaca | dolly | squad
    weight: float = 1.0  # expected copies of each conversation: 0.5 keeps half, 2 repeats each twice
    split: str = "train"  # hub datasets only
    max_conversations: Optional[int] = None


@dataclass
class SFTDataConfig:
    source: str = "builtin"  # builtin | a .jsonl/.parquet file | hf:owner/name[:config]
    format: str = "auto"  # format of `source`: auto | messages | sharegpt | alpaca | dolly | squad
    mixture: list[SFTSourceConfig] = field(default_factory=list)  # several weighted sets; replaces `source`
    strip_system: bool = False  # drop system messages (a small model may do better without them)
    dedup: bool = True  # drop exact repeats of a conversation (before weighting)
    heldout_fraction: float = 0.1
    max_conversations: Optional[int] = None


@dataclass
class SFTConfig:
    enabled: bool = True
    template: str = "chatml"  # chatml | parchment
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-3, max_steps=100, warmup_steps=10))


@dataclass
class EvalConfig:
    enabled: bool = True
    prompts: list[str] = field(
        default_factory=lambda: [
            "The meaning of the word",
            "In Python, a list is",
            "What is the capital of France?",
        ]
    )
    max_new_tokens: int = 48
    max_heldout: int = 100  # held-out SFT items scored for exact match
    val_batches: int = 16


@dataclass
class Recipe:
    name: str = "run"
    run_dir: str = "runs/run"
    seed: int = 1337
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    pack: PackConfig = field(default_factory=PackConfig)
    model: ModelConfigSpec = field(default_factory=ModelConfigSpec)
    train: TrainConfig = field(default_factory=TrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    source_file: Optional[str] = None  # set by load_recipe; not a YAML key

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("source_file", None)
        return d


# --------------------------------------------------------------------------------------
# Semantic validation
# --------------------------------------------------------------------------------------

SOURCE_TYPES = ("builtin", "text", "jsonl", "parquet", "fineweb-edu")
TEMPLATES = ("chatml", "parchment")


def _check(cond: bool, recipe_file: str, key: str, message: str) -> None:
    if not cond:
        raise RecipeError(f"{recipe_file}: `{key}` {message}")


def _resolve(path: Optional[str], base: Path) -> Optional[str]:
    if path is None:
        return None
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (base / p))


def validate_recipe(r: Recipe, recipe_file: str, base: Path, check_files: bool = True) -> None:
    """Check every value that could only fail later, naming the key and the recipe file."""
    from llm_maker.model.presets import PRESETS, resolve_model_config

    f = recipe_file
    _check(bool(r.name) and "/" not in r.name, f, "name", f"must be a non-empty name without '/', got {r.name!r}")
    _check(len(r.data.sources) > 0, f, "data.sources", "must list at least one source")
    for i, s in enumerate(r.data.sources):
        key = f"data.sources[{i}]"
        _check(s.type in SOURCE_TYPES, f, f"{key}.type", f"must be one of {SOURCE_TYPES}, got {s.type!r}")
        if s.type not in ("builtin", "fineweb-edu"):
            _check(s.path is not None, f, f"{key}.path", f"is required for a {s.type} source")
        if s.path is not None:
            s.path = _resolve(s.path, base)
            if check_files:
                _check(Path(s.path).exists(), f, f"{key}.path", f"does not exist: {s.path}")
        s.cache_dir = _resolve(s.cache_dir, base)
        _validate_fineweb_fields(s, f, key)
        if s.max_documents is not None:
            _check(s.max_documents > 0, f, f"{key}.max_documents", "must be positive")
    d = r.data
    _check(0.0 < d.fraction <= 1.0, f, "data.fraction", f"must be in (0, 1], got {d.fraction}")
    _check(0.0 < d.val_fraction < 1.0, f, "data.val_fraction", f"must be in (0, 1), got {d.val_fraction}")
    _check(d.max_documents is None or d.max_documents > 1, f, "data.max_documents", "must be at least 2")

    t = r.tokenizer
    _check(t.type in ("bpe", "pretrained"), f, "tokenizer.type", f"must be bpe or pretrained, got {t.type!r}")
    if t.type == "bpe":
        _check(300 <= t.vocab_size <= 1_000_000, f, "tokenizer.vocab_size", f"must be in [300, 1000000], got {t.vocab_size}")
    else:
        _check(t.path is not None, f, "tokenizer.path", "is required when tokenizer.type is pretrained")
        t.path = _resolve(t.path, base)
        if check_files:
            _check(Path(t.path).exists(), f, "tokenizer.path", f"does not exist: {t.path}")

    _check(r.pack.dtype in ("auto", "uint16", "uint32"), f, "pack.dtype", f"must be auto, uint16 or uint32, got {r.pack.dtype!r}")
    _check(r.pack.workers >= 1, f, "pack.workers", "must be at least 1")
    _check(r.pack.shard_tokens >= 1024, f, "pack.shard_tokens", f"must be at least 1024, got {r.pack.shard_tokens}")
    if r.pack.dtype == "uint16" and t.type == "bpe":
        _check(t.vocab_size <= 65535, f, "pack.dtype",
               f"is uint16 but tokenizer.vocab_size is {t.vocab_size} (> 65535); use uint32 or auto")

    m = r.model
    if m.init_from is not None:
        m.init_from = _resolve(m.init_from, base)
        if check_files:
            _check((Path(m.init_from) / "config.json").is_file(), f, "model.init_from",
                   f"is not a model directory (no config.json): {m.init_from}")
        dims = [n for n in ("n_layers", "d_model", "n_heads", "n_kv_heads", "d_mlp", "vocab_size", "seq_len",
                            "tie_embeddings", "rope_theta", "norm_eps") if getattr(m, n) is not None]
        _check(not dims, f, f"model.{dims[0] if dims else ''}", "cannot be set with model.init_from (the "
               "initial model's config.json gives the shape)")
    if m.preset is not None:
        _check(m.preset in PRESETS, f, "model.preset", f"unknown preset {m.preset!r}; choose one of {sorted(PRESETS)}")
    try:
        resolve_model_config(m, vocab_size=m.vocab_size or (t.vocab_size if t.type == "bpe" else None) or 256)
    except ValueError as e:  # the message is "field: why"
        name, _, why = str(e).partition(": ")
        raise RecipeError(f"{f}: `model.{name}` {why}") from None

    for key, tc in (("train", r.train), ("sft.train", r.sft.train)):
        _validate_train(tc, f, key)
        tc.mc_eval = _resolve(tc.mc_eval, base)
        if check_files and tc.mc_eval is not None:
            _check(Path(tc.mc_eval).is_file(), f, f"{key}.mc_eval", f"does not exist: {tc.mc_eval}")
    _check(r.sft.template in TEMPLATES, f, "sft.template", f"must be one of {TEMPLATES}, got {r.sft.template!r}")
    _validate_sft_source(r.sft.data, f, "sft.data", base, check_files and r.sft.enabled)
    for i, m in enumerate(r.sft.data.mixture):
        _validate_sft_source(m, f, f"sft.data.mixture[{i}]", base, check_files and r.sft.enabled)
        _check(m.weight > 0, f, f"sft.data.mixture[{i}].weight", f"must be positive, got {m.weight}")
    _check(0.0 <= r.sft.data.heldout_fraction < 1.0, f, "sft.data.heldout_fraction", "must be in [0, 1)")
    _check(r.eval.max_new_tokens > 0, f, "eval.max_new_tokens", "must be positive")


def _validate_fineweb_fields(s: SourceConfig, f: str, key: str) -> None:
    """The fineweb-edu fields: checked in data/fineweb.py, which raises ValueError("field: why")."""
    from llm_maker.data.fineweb import check_source_fields

    try:
        check_source_fields(s)
    except ValueError as e:
        name, _, why = str(e).partition(": ")
        raise RecipeError(f"{f}: `{key}.{name}` {why}") from None


def _validate_sft_source(s: Any, f: str, key: str, base: Path, check_files: bool) -> None:
    """`source` of sft.data or of a mixture entry: builtin, hf:NAME, or a local file."""
    from llm_maker.sft.formats import FORMATS

    _check(s.format in FORMATS, f, f"{key}.format", f"must be one of {FORMATS}, got {s.format!r}")
    if s.source == "builtin" or s.source.startswith("hf:"):
        return
    s.source = _resolve(s.source, base)
    if check_files:
        _check(Path(s.source).exists(), f, f"{key}.source", f"does not exist: {s.source}")


def _validate_train(tc: TrainConfig, f: str, key: str) -> None:
    _check(tc.precision in ("auto", "bf16", "fp32"), f, f"{key}.precision", f"must be auto, bf16 or fp32, got {tc.precision!r}")
    for name in ("micro_batch_size", "grad_accum_steps", "max_steps", "eval_every", "checkpoint_every",
                 "keep_checkpoints", "log_every", "eval_batches"):
        _check(getattr(tc, name) >= 1, f, f"{key}.{name}", f"must be at least 1, got {getattr(tc, name)}")
    _check(tc.lr > 0, f, f"{key}.lr", f"must be positive, got {tc.lr}")
    _check(0 <= tc.min_lr_ratio <= 1, f, f"{key}.min_lr_ratio", "must be in [0, 1]")
    _check(tc.warmup_steps >= 0, f, f"{key}.warmup_steps", "must be >= 0")
    _check(tc.grad_clip >= 0, f, f"{key}.grad_clip", "must be >= 0 (0 disables clipping)")
    _check(tc.distributed in ("ddp", "fsdp2"), f, f"{key}.distributed", f"must be ddp or fsdp2, got {tc.distributed!r}")
    _check(tc.optimizer in ("adamw", "muon"), f, f"{key}.optimizer", f"must be adamw or muon, got {tc.optimizer!r}")
    _check(not (tc.optimizer == "muon" and tc.distributed == "fsdp2"), f, f"{key}.optimizer",
           "is muon, which needs whole matrices (Newton-Schulz), but fsdp2 shards them; use distributed: ddp")
    _check(tc.loss_chunk_size >= 0, f, f"{key}.loss_chunk_size", f"must be >= 0 (0: plain loss), got {tc.loss_chunk_size}")
    for switch, module in (("tensorboard", "tensorboard"), ("wandb", "wandb")):
        if getattr(tc, switch):
            import importlib.util

            _check(importlib.util.find_spec(module) is not None, f, f"{key}.{switch}",
                   f"is on but the `{module}` package is not installed: pip install 'llm-maker[tracking]'")


def load_recipe(path: str | Path, overrides: Optional[dict[str, Any]] = None, check_files: bool = True) -> Recipe:
    """Read, parse and validate a recipe file; raise RecipeError naming the key and file."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from None
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: not UTF-8 text: {e}") from None
    raw = raw or {}
    if overrides:
        raw = _apply_overrides(raw, overrides)
    return recipe_from_dict(raw, recipe_file=str(path), base=path.parent, check_files=check_files)


def recipe_from_dict(raw: dict[str, Any], recipe_file: str = "<recipe>", base: Path | None = None,
                     check_files: bool = True) -> Recipe:
    r = parse_dataclass(Recipe, raw, "", recipe_file)
    base = base or Path.cwd()
    validate_recipe(r, recipe_file, base, check_files=check_files)
    r.run_dir = _resolve(r.run_dir, Path.cwd()) or r.run_dir
    r.source_file = recipe_file
    return r


def _apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Apply dotted-key overrides (`train.max_steps=10`) to the raw YAML tree."""
    import copy

    raw = copy.deepcopy(raw)
    for dotted, value in overrides.items():
        node = raw
        parts = dotted.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise RecipeError(f"override `{dotted}`: `{p}` is not a mapping")
        node[parts[-1]] = value
    return raw


def parse_override(text: str) -> tuple[str, Any]:
    """`key.sub=value` -> (key.sub, YAML-parsed value)."""
    if "=" not in text:
        raise RecipeError(f"override {text!r} must look like key.sub=value")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)
