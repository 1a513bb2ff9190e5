"""registry/: run status from the artifacts, REGISTRY.md, model cards with plots, the trainer's
tracking hook and SFT token accuracy. Runs are built as files (manifests, metrics.csv,
config.json), so every status can be staged exactly."""
from __future__ import annotations

import csv
import json
import math
import os
import time
from pathlib import Path

import pytest
import torch
import yaml

from helpers import successor_model
from llm_maker.artifacts import write_manifest
from llm_maker.errors import LLMMakerError
from llm_maker.layout import RunPaths
from llm_maker.model.llama import LlamaConfig, count_parameters
from llm_maker.recipe import TrainConfig
from llm_maker.registry.registry import GENERATED_MARK, run_status, scan_run, scan_runs, write_card, write_registry
from llm_maker.train.evaluation import token_accuracy
from llm_maker.train.trackers import open_trackers, scalars
from llm_maker.train.trainer import METRICS_FIELDS, MetricsLog

DIMS = LlamaConfig(vocab_size=512, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_mlp=128, seq_len=64).to_dict()
PARAMS = count_parameters(LlamaConfig(**DIMS))
RECIPE = {"name": "r", "train": {"max_steps": 40, "eval_every": 20, "grad_clip": 1.0},
          "sft": {"enabled": True, "template": "chatml", "train": {"max_steps": 20, "eval_every": 10}}}
NOW = time.time()
OLD = NOW - 3600  # an hour ago: not running


def write_metrics(stage_dir: Path, steps: list[int], loss=lambda s: 5.0 - s / 20, acc: bool = False) -> None:
    stage_dir.mkdir(parents=True, exist_ok=True)
    with open(stage_dir / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=METRICS_FIELDS)
        w.writeheader()
        for s in steps:
            w.writerow({"step": s, "tokens": s * 1000, "loss": loss(s), "val_loss": 4.0 if s % 20 == 0 else "",
                        "lr": f"{1e-3 * min(1, s / 10):.3e}", "grad_norm": 0.5 + s / 100, "tokens_per_s": 5000,
                        "peak_mem_mb": 100, "elapsed_s": s / 10,
                        "val_token_acc": f"{0.2 + s / 100:.4f}" if acc and s % 10 == 0 else ""})


def write_model(directory: Path, stage: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({"model": DIMS, "stage": stage}))
    (directory / "model.safetensors").write_bytes(b"")


def make_run(root: Path, name: str, upto: str = "eval", age_s: float = 3600, **extra) -> Path:
    """A run whose stages up to and including `upto` finished; then `extra` staging."""
    run = root / name
    run.mkdir(parents=True)
    (run / "recipe.yaml").write_text(yaml.safe_dump({**RECIPE, "name": name}))
    stages = ["data", "tokenizer", "pack", "pretrain", "sft", "eval"]
    for stage in stages[: stages.index(upto) + 1] if upto else []:
        fields = {}
        if stage == "pretrain":
            write_metrics(run / stage, list(range(10, 41, 10)))
            write_model(run / stage / "final", stage)
            fields = {"model": DIMS, "parameters": PARAMS, "summary": {"tokens_seen": 40_000, "val_loss": 3.9,
                                                                         "device": "cpu", "precision": "fp32"}}
        if stage == "sft":
            write_metrics(run / stage, list(range(5, 21, 5)), acc=True)
            write_model(run / stage / "final", stage)
            fields = {"summary": {"tokens_seen": 8_000, "val_loss": 2.5}, "batch_seq_len": 50,
                      "data": {"train": {"kept": 90}}}
        if stage == "eval":
            (run / "eval").mkdir(parents=True, exist_ok=True)
            (run / "eval" / "report.json").write_text(json.dumps({
                "validation": {"base": {"loss": 3.8, "perplexity": math.exp(3.8)},
                               "sft": {"loss": 4.5, "perplexity": math.exp(4.5)}, "tokens_scored": 1000,
                               "unigram_loss": 6.0, "unigram_perplexity": math.exp(6.0)},
                "exact_match": {"accuracy": {"base": 0.0, "sft": 0.25}, "n_items": 8},
                "stop_table": {"stop_fraction": {"base": 0.0, "sft": 1.0}, "rows": [
                    {"prompt": "What is a list?", "base": {"text": "a list a list", "stopped": False, "n_tokens": 48},
                     "sft": {"text": "A sequence.", "stopped": True, "n_tokens": 4}}]},
                "base_completions": [{"prompt": "The tuple", "greedy": " is a sequence", "sampled": "x"}]}))
        write_manifest(run / stage, stage, "fp", **fields)
    for _key, fn in extra.items():
        fn(run)
    stamp = NOW - age_s
    for p in [run, *run.rglob("*")]:
        os.utime(p, (stamp, stamp))
    return run


def checkpoint(stage: str, step: int):
    def make(run: Path) -> None:
        write_metrics(run / stage, list(range(5, step + 1, 5)))
        ckpt = run / stage / "checkpoints" / f"step_{step:08d}"
        write_model(ckpt, stage)
        (ckpt / "trainer_state.json").write_text("{}")
    return make


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    make_run(root, "a-done")
    make_run(root, "b-running", upto="pack", age_s=20, pretrain=checkpoint("pretrain", 10))
    make_run(root, "c-paused", upto="pretrain", sft=checkpoint("sft", 10))
    make_run(root, "d-stopped", upto="pack", stop=lambda run: (run / "STOP").touch())
    make_run(root, "e-diverged", upto="pack", metrics=lambda run: write_metrics(
        run / "pretrain", [10, 20, 30], loss=lambda s: float("nan") if s >= 20 else 4.0))
    make_run(root, "f-crashed", upto="pack", metrics=lambda run: write_metrics(run / "pretrain", [10, 20]))
    make_run(root, "g-queued", upto="tokenizer")
    return root


def test_status_comes_from_manifests_checkpoints_and_metrics(runs):
    got = {r.name: (r.status, r.reason) for r in scan_runs(runs, now=NOW)}
    assert got["a-done"] == ("done", "all 6 stages finished")
    assert got["b-running"] == ("running", "pretrain step 10/40, updated 20 s ago")
    assert got["c-paused"][0] == "paused" and got["c-paused"][1].startswith("sft step 10/20 (checkpoint); resume with")
    assert got["d-stopped"] == ("paused",
                                f"pretrain (STOP file); resume with `llm-maker pipeline {runs}/d-stopped/recipe.yaml`")
    assert got["e-diverged"] == ("failed", "pretrain loss became NaN/inf at step 20")
    assert got["f-crashed"] == ("failed", "pretrain stopped before its first checkpoint; rerun it")
    assert got["g-queued"] == ("paused", "next stage `pack` not started")
    # The same run an hour later is no longer running: its checkpoint makes it paused.
    late = scan_run(runs / "b-running", now=NOW + 3600)
    assert late.status == "paused"


def test_recipe_without_sft_is_done_after_eval(tmp_path):
    run = make_run(tmp_path, "no-sft", upto="pretrain")
    (run / "recipe.yaml").write_text(yaml.safe_dump({**RECIPE, "sft": {"enabled": False}, "eval": {"enabled": False}}))
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    assert run_status(RunPaths.of(run), recipe, NOW) == ("done", "all 4 stages finished")


def test_registry_table_has_one_row_per_model(runs):
    out = write_registry(runs, cards=False, now=NOW)
    text = out.read_text()
    assert text.startswith(GENERATED_MARK)
    assert (f"| 1 | [a-done](a-done/card.md) | {PARAMS:,} | 512 | 40k | val 3.800 (44.7) | EM 0% · stops 0% | "
            "✅ done |") in text
    assert "| 2 | [a-done (SFT)](a-done/card.md) | " + f"{PARAMS:,} | 512 | 8k, 90 SFT conversations | " \
           "resp. 2.500 (12.2) | EM 25% · stops 100% | ✅ done |" in text
    assert "[b-running](b-running/card.md) | " + f"{PARAMS:,} | 512 | 10k | - | - | 🔄 running |" in text
    assert "| e-diverged | ❌ failed | pretrain loss became NaN/inf at step 20 |" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 9  # a: base + SFT; b, c (base + SFT), e, f: one each; d, g: the run alone


def test_card_and_plots(runs):
    card = write_card(runs / "a-done")
    text = card.read_text()
    for heading in ("## Architecture", "## Training recipe", "## Cost and throughput", "## Evaluation",
                    "## Samples", "## Training curves", "## Limitations", "## Use it"):
        assert heading in text
    assert f"| parameters | {PARAMS:,} |" in text
    assert "| attention heads (query / key-value) | 4 / 2 (head dim 16) | grouped-query attention" in text
    assert "| steps | 40 |" in text  # from recipe.yaml; the rest are TrainConfig's defaults
    assert "| batch | 8 × 1 accumulation × 64 tokens = 512 tokens/step |" in text
    assert "| batch | 8 × 1 accumulation × 50 tokens = 400 tokens/step |" in text  # SFT: padded to 50
    assert "| unigram baseline | 6.000 | 403.4 |" in text and "| sft | 100% | 25.0% of 8 |" in text
    assert "| What is a list? | no stop a list a list | eos@4 A sequence. |" in text
    assert "Undertrained: 0.4 tokens per parameter" in text  # 40,000 / 106,816
    assert "SFT raised the loss on plain text (3.80 → 4.50)" in text
    for name in ("loss", "lr", "grad_norm", "token_accuracy"):
        png = runs / "a-done" / "plots" / f"{name}.png"
        assert f"![{name}](plots/{name}.png)" in text
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5_000
    # No SFT metrics, no token-accuracy plot.
    write_card(runs / "c-paused")
    assert not (runs / "c-paused" / "plots" / "token_accuracy.png").exists()


def test_foreign_files_are_kept_unless_forced(runs):
    (runs / "REGISTRY.md").write_text("my notes\n")
    with pytest.raises(LLMMakerError, match="REGISTRY.md exists and was not written by llm-maker; pass --force"):
        write_registry(runs, cards=False)
    assert (runs / "REGISTRY.md").read_text() == "my notes\n"
    write_registry(runs, cards=False, force=True)
    write_registry(runs, cards=False)  # its own file is regenerated freely


def test_an_empty_folder_is_an_error(tmp_path):
    with pytest.raises(LLMMakerError, match="no runs found"):
        scan_runs(tmp_path)
    with pytest.raises(LLMMakerError, match="runs folder not found"):
        scan_runs(tmp_path / "missing")


def test_cli_registry_and_card(runs, capsys):
    from llm_maker.cli import main

    assert main(["registry", str(runs)]) == 0
    assert (runs / "REGISTRY.md").is_file() and (runs / "a-done" / "card.md").is_file()
    assert main(["card", str(runs / "c-paused")]) == 0
    assert capsys.readouterr().out.strip().endswith("c-paused/card.md")


# --------------------------------------------------------------------------------------
# Trainer hooks: tracking sinks and SFT token accuracy
# --------------------------------------------------------------------------------------

def test_metrics_rows_reach_the_sinks(tmp_path):
    logged = []

    class Recorder:
        def log(self, row):
            logged.append(row)

        def close(self):
            pass

    log = MetricsLog(tmp_path / "metrics.csv", resume_step=None)
    log.sinks = [Recorder()]
    log.write({"step": 10, "loss": 3.5, "val_loss": None, "lr": "1.000e-03"})
    assert scalars(logged[0]) == {"loss": 3.5, "lr": 1e-3}
    assert open_trackers(TrainConfig(), tmp_path, "pretrain") == []  # off by default


def test_tensorboard_sink_writes_event_files(tmp_path):
    pytest.importorskip("tensorboard", reason="the tracking extra is not installed")
    (sink,) = open_trackers(TrainConfig(tensorboard=True), tmp_path, "sft")
    sink.log({"step": 5, "loss": 2.0})
    sink.close()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_switching_on_a_missing_tracker_is_a_recipe_error(tmp_path):
    import importlib.util

    from llm_maker.recipe import recipe_from_dict

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    with pytest.raises(LLMMakerError, match=r"`train.wandb` is on but the `wandb` package is not installed"):
        recipe_from_dict({"train": {"wandb": True}}, recipe_file="r.yaml", base=tmp_path)


def test_token_accuracy_counts_supervised_targets_only():
    model = successor_model(20, {3: 4, 4: 5}, default=9)  # greedy: 3 -> 4, 4 -> 5, else 9
    x = torch.tensor([[3, 4, 7, 1]])
    y = torch.tensor([[4, 6, 9, -100]])  # right, wrong, right, ignored
    acc = token_accuracy(model, [(x, y)], torch.device("cpu"))
    assert acc == pytest.approx(2 / 3)
    assert token_accuracy(model, [], torch.device("cpu")) is None
