"""Where each stage's artifacts live inside a run directory.

    RUN_DIR/
      recipe.yaml          the resolved recipe of the last pipeline run
      data/                train.jsonl, val.jsonl, manifest.json
      tokenizer/           tokenizer.json, manifest.json
      pack/                train.bin, val.bin, manifest.json
      pretrain/            checkpoints/step_XXXXXXXX/, final/, metrics.csv, manifest.json
      sft/                 data/, checkpoints/, final/, metrics.csv, manifest.json
      eval/                report.json, report.md, manifest.json
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @classmethod
    def of(cls, run_dir: str | Path) -> "RunPaths":
        return cls(Path(run_dir))

    @property
    def recipe(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def pack(self) -> Path:
        return self.root / "pack"

    @property
    def pretrain(self) -> Path:
        return self.root / "pretrain"

    @property
    def sft(self) -> Path:
        return self.root / "sft"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    def final_model(self) -> Path:
        """The newest finished model: SFT's if it exists, else pretraining's."""
        for stage in (self.sft, self.pretrain):
            if (stage / "final" / "model.safetensors").is_file():
                return stage / "final"
        from llm_maker.errors import LLMMakerError

        raise LLMMakerError(f"{self.root}: no finished model (pretrain/final or sft/final); run the pipeline first")
