"""A golden loss curve: the demo shape's first 50 pretraining losses on CPU in fp32 with a fixed
seed, compared to tests/data/golden_pretrain_losses.json to 1e-4. A change that alters the
numerics of data, tokenizer, packing, model, optimizer or schedule fails here loudly.

Regenerate only on purpose (and say why in the commit):
    LLM_MAKER_REGEN_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden.py
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import yaml

from llm_maker.cli import main

GOLDEN = Path(__file__).parent / "data" / "golden_pretrain_losses.json"
STEPS = 50


@pytest.mark.slow  # a 50-step pretraining run
def test_first_50_pretraining_losses_match_the_golden_curve(tmp_path, prose_jsonl):
    demo = yaml.safe_load((Path(__file__).parents[1] / "configs" / "demo.yaml").read_text())
    recipe = {
        "name": "golden", "run_dir": str(tmp_path / "run"), "seed": 1337,
        "data": {"sources": [{"type": "jsonl", "path": str(prose_jsonl)}], "val_fraction": 0.1,
                 "selection_key": "golden"},
        "tokenizer": {"vocab_size": 512},
        "model": demo["model"],  # the demo shape (preset tiny) with the tokenizer's vocabulary
        "train": {**demo["train"], "max_steps": STEPS, "log_every": 1, "eval_every": STEPS,
                  "checkpoint_every": STEPS, "eval_batches": 1, "device": "cpu", "precision": "fp32",
                  "progress": False},
        "sft": {"enabled": False},
    }
    path = tmp_path / "golden.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["pipeline", str(path), "--only", "data", "tokenizer", "pack", "pretrain"]) == 0
    with open(tmp_path / "run" / "pretrain" / "metrics.csv", newline="") as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f)]
    assert len(losses) == STEPS

    if os.environ.get("LLM_MAKER_REGEN_GOLDEN"):
        GOLDEN.write_text(json.dumps({"steps": STEPS, "losses": losses}, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())["losses"]
    assert losses[-1] < losses[0] - 1.0  # it learns
    worst = max(abs(a - b) for a, b in zip(losses, golden, strict=False))
    assert losses == pytest.approx(golden, abs=1e-4), f"loss curve moved from the golden one by up to {worst:.2e}"
