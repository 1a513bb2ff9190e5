"""What the registry knows about a run, read from its artifacts: the records that registry.py
builds and both REGISTRY.md and a run's card.md (card.py) render."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from llm_maker.recipe import Recipe

STATUS_ICON = {"done": "✅ done", "running": "🔄 running", "paused": "⏸ paused", "failed": "❌ failed"}


@dataclass
class ModelRow:
    """One model of a run: the pretrained (or distilled) base, its SFT version, its DPO version."""

    run: str
    stage: str  # pretrain | distill | sft | dpo
    parameters: Optional[int]
    vocab: Optional[int]
    tokens: Optional[int]
    val_loss: Optional[float]
    val_label: str  # what the loss is: "val" (pretraining text) or "resp." (held-out SFT or DPO responses)
    scores: list[str]
    status: str
    note: str = ""
    kept: str = "final"  # the stage's model later stages take: final or best (layout.RunPaths.model)
    kept_note: str = ""  # which step that is and why (export/card.py's kept_text), when there is a choice


@dataclass
class RunRecord:
    name: str
    path: Path
    status: str  # done | running | paused | failed (registry.py's docstring says when)
    reason: str
    recipe: dict[str, Any]
    models: list[ModelRow] = field(default_factory=list)

    def model(self, stage: str) -> Optional[ModelRow]:
        return next((m for m in self.models if m.stage == stage), None)


def stage_enabled(recipe: dict[str, Any], stage: str) -> bool:
    """Whether a plain recipe dict (a run's recipe.yaml) switches an optional stage on: its
    `enabled`, else the recipe's default (on for sft and eval, off for distill and dpo)."""
    default = getattr(Recipe(), stage).enabled
    return (recipe.get(stage) or {}).get("enabled", default) is not False


def base_stage_of(record: "RunRecord") -> str:
    """The stage of the run's base model: distill when the recipe enables it and it has a row (or
    there is no pretrained row), else pretrain."""
    if record.model("distill") and (stage_enabled(record.recipe, "distill") or not record.model("pretrain")):
        return "distill"
    return "pretrain"
