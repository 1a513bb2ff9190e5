"""The stages, in order, and where each one's artifacts live inside a run directory.

    RUNS_DIR/
      REGISTRY.md            `llm-maker registry RUNS_DIR`: one row per model of every run below
      RUN_DIR/
        recipe.yaml          the resolved recipe of the last pipeline run
        data/                train.jsonl, val.jsonl, manifest.json
        tokenizer/           tokenizer.json, manifest.json
        pack/                train.bin, val.bin (a split larger than pack.shard_tokens: shards
                             train-00000.bin, train-00001.bin, ...), manifest.json;
                             data_report.{json,md}, doc_lengths.png (`llm-maker data-report`)
        pretrain/            checkpoints/step_XXXXXXXX/, final/, best/ (train.keep_best), metrics.csv,
                             manifest.json
        distill/             the same, trained against a teacher (distill.enabled); in cached mode the
                             teacher's top-k log-probs per packed token sit beside the pack, in
                             pack/teacher/<teacher hash>-k<k>-T<T>-L<seq_len>/, reused by later runs
        sft/                 data/, checkpoints/, final/, best/, metrics.csv, manifest.json
        dpo/                 data/, reference/ (the reference's log-probs), checkpoints/, final/,
                             best/, metrics.csv, manifest.json (dpo.enabled)
        eval/                report.json, report.md, manifest.json;
                             lm_eval/{results.json,table.md,tasks/} (`llm-maker lm-eval`)
        audit/               contamination.{json,md} (`llm-maker audit`)
        card.md, plots/      the model card and its training curves (`llm-maker card` / `registry`)

A model directory (`final/`, `best/`, or the model inside a checkpoint) holds WEIGHTS, config.json
and tokenizer.json (train/checkpoint.py). Each stage writes the directory named after it; STAGES is
the one list of them, read by the pipeline (which adds how to run each), the CLI, the summary
and the registry.

A training stage may keep two models: final/ (the last step) and best/ (the evaluation with the
best validation metric). Which one later stages take (eval, chat, serve, export, lm-eval) is the
recipe's choice (`sft.use`, `dpo.use`, `sft.start_from`), recorded in the SFT and DPO stages'
manifests; `RunPaths.model` is the one place that reads it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from llm_maker.artifacts import read_manifest
from llm_maker.errors import LLMMakerError

WEIGHTS = "model.safetensors"  # a model directory's weights
FINAL = "final"  # a training stage's finished model directory: its last step
BEST = "best"  # its model at the evaluation with the best validation metric (train.keep_best)
KEPT_MODELS = (FINAL, BEST)
SPLITS = ("train", "val")  # the data and pack stages' splits


@dataclass(frozen=True)
class StageSpec:
    name: str  # the CLI verb and the directory under RUN_DIR
    help: str  # one line for `llm-maker --help`
    trains: bool = False  # writes checkpoints/ and final/; its verb takes --resume
    optional: bool = False  # the recipe can switch it off (`<name>.enabled: false`)


STAGES: tuple[StageSpec, ...] = (
    StageSpec("data", "select and split the corpus"),
    StageSpec("tokenizer", "train or load the tokenizer"),
    StageSpec("pack", "tokenize into memory-mapped token files"),
    StageSpec("pretrain", "pretrain the model", trains=True),
    StageSpec("distill", "train the model against a teacher's distribution", trains=True, optional=True),
    StageSpec("sft", "instruction-tune the pretrained model", trains=True, optional=True),
    StageSpec("dpo", "tune the SFT model on preference pairs (DPO)", trains=True, optional=True),
    StageSpec("eval", "evaluate and write the report", optional=True),
)
STAGE_NAMES = tuple(s.name for s in STAGES)
TRAIN_STAGES = tuple(s.name for s in STAGES if s.trains)


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @classmethod
    def of(cls, run_dir: str | Path) -> "RunPaths":
        return cls(Path(run_dir))

    def stage_dir(self, name: str) -> Path:
        if name not in STAGE_NAMES:
            raise LLMMakerError(f"unknown stage {name!r}; the stages are {', '.join(STAGE_NAMES)}")
        return self.root / name

    def final(self, name: str) -> Path:
        """The finished model directory of a training stage (`pretrain` or `sft`): its last step."""
        return self._train_stage_dir(name) / FINAL

    def best(self, name: str) -> Path:
        """A training stage's model at its best evaluation (written with train.keep_best)."""
        return self._train_stage_dir(name) / BEST

    def model(self, name: str) -> Path:
        """The model of a training stage that later stages take: best/ or final/, as the manifests
        record the recipe's choice (SFT's and DPO's own `use`; for pretraining and distillation,
        the SFT manifest's `start_from`); final/ when nothing says best or best/ holds no weights."""
        if name in ("sft", "dpo"):
            choice = (read_manifest(self.stage_dir(name)) or {}).get("use", FINAL)
        else:
            choice = (read_manifest(self.sft) or {}).get("start_from", FINAL)
        chosen = self._train_stage_dir(name) / choice
        return chosen if chosen.name in KEPT_MODELS and (chosen / WEIGHTS).is_file() else self.final(name)

    def _train_stage_dir(self, name: str) -> Path:
        if name not in TRAIN_STAGES:
            raise LLMMakerError(f"stage {name!r} trains no model; the training stages are {', '.join(TRAIN_STAGES)}")
        return self.stage_dir(name)

    @property
    def recipe(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def data(self) -> Path:
        return self.stage_dir("data")

    @property
    def tokenizer(self) -> Path:
        return self.stage_dir("tokenizer")

    @property
    def pack(self) -> Path:
        return self.stage_dir("pack")

    @property
    def pretrain(self) -> Path:
        return self.stage_dir("pretrain")

    @property
    def distill(self) -> Path:
        return self.stage_dir("distill")

    @property
    def sft(self) -> Path:
        return self.stage_dir("sft")

    @property
    def dpo(self) -> Path:
        return self.stage_dir("dpo")

    @property
    def eval(self) -> Path:
        return self.stage_dir("eval")

    def final_model(self) -> Path:
        """The newest finished model: DPO's, else SFT's, else distillation's, else pretraining's
        (each as `model` picks)."""
        for stage in ("dpo", "sft", "distill", "pretrain"):
            if (self.model(stage) / WEIGHTS).is_file():
                return self.model(stage)
        raise LLMMakerError(f"{self.root}: no finished model (pretrain/final, distill/final, sft/final or "
                            "dpo/final); run the pipeline first")

    def base_stage(self) -> str:
        """The pretrained model's stage, which SFT starts from and eval compares as the base: distill
        when a distill stage has finished (its manifest), else pretrain."""
        return "distill" if read_manifest(self.distill) is not None else "pretrain"


def run_dir_of(model_dir: Path) -> Optional[Path]:
    """RUN_DIR for RUN_DIR/{pretrain,distill,sft,dpo}/{final,best} (or a checkpoint under them), else None."""
    for parent in [model_dir, *model_dir.parents][:4]:
        if parent.name in TRAIN_STAGES:
            return parent.parent
    return None
