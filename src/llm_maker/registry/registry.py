"""The model registry: every run under a folder, read from its artifacts, as one table.

    llm-maker registry runs/        -> runs/REGISTRY.md (+ each run's card.md and plots/)

A run is any folder holding a run's stage directories. Its status comes from what is on disk:
  done     every stage the recipe asks for finished (its manifest.json exists)
  running  the unfinished stage wrote metrics or a checkpoint in the last few minutes
  paused   it stopped cleanly or can go on: a STOP file, a checkpoint to resume from, or the
           next stage simply not started
  failed   the loss became NaN/inf, or a training stage died before its first checkpoint
           (metrics or a partial `.tmp-*` directory, nothing to resume)
The optional stages are those the recipe enables (distill and dpo only with `enabled: true`;
pretraining is skipped when distillation trains the model from scratch).
One row per model: the base model (pretrained, or distilled from a teacher: its final KL and CE),
then its SFT model, then its DPO model (held-out preference accuracy and reward margin), each the
directory later stages take (final/ or best/: layout.RunPaths.model) with the step kept and why. `write_card` writes one
run's card.md (card.py renders it) and training curves (plots.py).
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Optional

import yaml

from llm_maker.artifacts import as_float, atomic_write_text, read_json, read_manifest, read_metrics
from llm_maker.errors import LLMMakerError
from llm_maker.export.card import kept_text, stage_figures, stage_train_config, teacher_label
from llm_maker.layout import BEST, FINAL, STAGES, TRAIN_STAGES, RunPaths
from llm_maker.markdown import GENERATED_MARK, check_generated, count, number, percent, table
from llm_maker.model.llama import LlamaConfig, count_parameters
from llm_maker.registry.card import CARD_FILE, PLOTS_DIR, card_markdown
from llm_maker.registry.plots import eval_steps, write_plots
from llm_maker.registry.records import STATUS_ICON, ModelRow, RunRecord, stage_enabled
from llm_maker.train.checkpoint import latest_checkpoint, list_checkpoints

REGISTRY_FILE = "REGISTRY.md"
RUNNING_WINDOW_S = 300.0  # a stage that wrote something more recently than this is running
NONE = "-"  # an empty cell of REGISTRY.md
# REGISTRY.md's name of each stage's model ("" : the run's name alone), and what its loss is measured on
ROW_LABEL = {"pretrain": "", "distill": "distilled", "sft": "SFT", "dpo": "DPO"}
LOSS_LABEL = {"pretrain": "val", "distill": "val", "sft": "resp.", "dpo": "resp."}


# --------------------------------------------------------------------------------------
# Reading a run
# --------------------------------------------------------------------------------------

def read_recipe(paths: RunPaths) -> dict[str, Any]:
    """The run's resolved recipe as plain YAML (not validated: its inputs may be gone)."""
    if not paths.recipe.is_file():
        return {}
    try:
        raw = yaml.safe_load(paths.recipe.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise LLMMakerError(f"{paths.recipe}: not valid YAML: {e}") from None
    return raw if isinstance(raw, dict) else {}


def expected_stages(recipe: dict[str, Any]) -> list[str]:
    """The stages the recipe asks for: an optional stage when it is enabled, and pretraining unless
    distillation trains the model from scratch in its place (pipeline.py's rule)."""
    distill = recipe.get("distill") or {}
    from_scratch = stage_enabled(recipe, "distill") and distill.get("student", "scratch") == "scratch"
    return [s.name for s in STAGES if (not s.optional or stage_enabled(recipe, s.name))
            and not (s.name == "pretrain" and from_scratch)]


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "recipe.yaml").is_file()
                              or any((path / s.name).is_dir() for s in STAGES if not s.optional))


def newest_mtime(directory: Path) -> Optional[float]:
    """The newest modification time of the directory and what is directly inside it (and in
    checkpoints/), enough to see a training stage at work without walking a data folder."""
    if not directory.is_dir():
        return None
    entries = [directory, *directory.iterdir()]
    ckpts = directory / "checkpoints"
    if ckpts.is_dir():
        entries += list(ckpts.iterdir())
    return max(p.stat().st_mtime for p in entries)


def diverged_at(rows: list[dict[str, str]]) -> Optional[int]:
    """The first logged step whose loss is NaN or infinite, or where the trainer gave up on a
    divergence (an `event` row "diverged at step N: ...", train/trainer.py)."""
    for r in rows:
        loss = as_float(r.get("loss"))
        if (loss is not None and not math.isfinite(loss)) or (r.get("event") or "").startswith("diverged"):
            return int(r["step"])
    return None


def run_status(paths: RunPaths, recipe: dict[str, Any], now: float,
               running_window_s: float = RUNNING_WINDOW_S) -> tuple[str, str]:
    """(done|running|paused|failed, why) for the run at `paths` (see the module docstring)."""
    stages = expected_stages(recipe)
    pending = [s for s in stages if read_manifest(paths.stage_dir(s)) is None]
    for stage in TRAIN_STAGES:
        step = diverged_at(read_metrics(paths.stage_dir(stage)))
        if step is not None:
            return "failed", f"{stage} loss became NaN/inf at step {step}"
    if not pending:
        return "done", f"all {len(stages)} stages finished"
    stage = pending[0]
    stage_dir = paths.stage_dir(stage)
    progress = stage_progress(stage_dir, recipe, stage)
    touched = newest_mtime(stage_dir)
    if touched is not None and now - touched < running_window_s:
        return "running", f"{stage}{progress}, updated {now - touched:.0f} s ago"
    has_ckpt = bool(list_checkpoints(stage_dir / "checkpoints")) if stage in TRAIN_STAGES else False
    stop_file = (stage_dir / "STOP").exists() or (paths.root / "STOP").exists()
    if stop_file or has_ckpt:
        why = "STOP file" if stop_file else "checkpoint"
        return "paused", f"{stage}{progress} ({why}); resume with `llm-maker pipeline {paths.recipe}`"
    debris = stage_dir.is_dir() and (read_metrics(stage_dir) or any(p.name.startswith(".tmp-")
                                                                     for p in stage_dir.iterdir()))
    if debris:
        return "failed", f"{stage} stopped before its first checkpoint; rerun it"
    return "paused", f"next stage `{stage}` not started"


def stage_progress(stage_dir: Path, recipe: dict[str, Any], stage: str) -> str:
    """' step 340/600' for a training stage with metrics, else ''."""
    rows = read_metrics(stage_dir)
    if stage not in TRAIN_STAGES or not rows:
        return ""
    total = stage_train_config(recipe, stage).get("max_steps")
    return f" step {rows[-1]['step']}" + (f"/{total}" if total else "")


def model_config(stage_dir: Path) -> Optional[dict[str, Any]]:
    """The model dims from final/config.json, else from the newest checkpoint."""
    for d in (stage_dir / FINAL, latest_checkpoint(stage_dir / "checkpoints")):
        config = read_json(d / "config.json") if d is not None else None
        if config and "model" in config:
            return config["model"]
    return None


def parameters_of(dims: Optional[dict[str, Any]]) -> Optional[int]:
    if not dims:
        return None
    try:
        return count_parameters(LlamaConfig(**dims))
    except TypeError:  # dims written by another version
        return None


def lm_eval_scores(run: Path, model_dir: Path) -> list[str]:
    """Headline lm-eval scores recorded for this model directory (eval/lm_eval/results.json)."""
    results = read_json(run / "eval" / "lm_eval" / "results.json") or {}
    model_dir = model_dir.resolve()
    out = []
    for name, info in (results.get("models") or {}).items():
        if Path(info.get("dir", "")).resolve() != model_dir:
            continue
        for task, h in (results.get("headline") or {}).get(name, {}).items():
            value = h["value"]
            is_accuracy = h.get("metric", "").startswith("acc")
            out.append(f"{task} {percent(value, 1)}" if is_accuracy else f"{task} {value:.3g}")
    return out


def report_name(paths: RunPaths, report: dict[str, Any], stage: str) -> Optional[str]:
    """The eval report's name of a stage's model: sft, dpo, or base for the stage eval scored as
    the base (the stage its report records; else the run's base stage); None: not scored."""
    if stage in ("sft", "dpo"):
        return stage
    base = (report.get("models") or {}).get("base") or {}
    scored = base.get("stage") if base.get("stage") in TRAIN_STAGES else paths.base_stage()
    return "base" if stage == scored else None


def model_rows(paths: RunPaths, name: str, status: str) -> list[ModelRow]:
    """The base, distilled, SFT and DPO rows of one run (a stage with nothing trained has no row)."""
    report = read_json(paths.eval / "report.json") or {}
    validation = report.get("validation") or {}
    em = (report.get("exact_match") or {}).get("accuracy") or {}
    stops = (report.get("stop_table") or {}).get("stop_fraction") or {}
    rows = []
    for stage in TRAIN_STAGES:
        stage_dir = paths.stage_dir(stage)
        manifest = read_manifest(stage_dir) or {}
        metrics = read_metrics(stage_dir)
        if not manifest and not metrics:
            continue
        summary = manifest.get("summary") or {}
        kept_model = paths.model(stage).name
        key = report_name(paths, report, stage)
        dims = manifest.get("model") or model_config(stage_dir)
        tokens = summary.get("tokens_seen") or (int(metrics[-1]["tokens"]) if metrics else None)
        val_losses = [v for v in (as_float(r.get("val_loss")) for r in metrics) if v is not None]
        loss = summary.get("val_loss") or (val_losses[-1] if val_losses else None)
        if key == "base":  # eval's score on the packed val split
            loss = (validation.get("base") or {}).get("loss") or loss
        best = summary.get("best") or {}
        if stage in ("sft", "dpo") and kept_model == BEST and best.get("metric") == "val_loss":
            loss = best.get("value")  # the kept model's held-out loss
        scores, note = [], ""
        if key in em:
            scores.append(f"EM {percent(em[key])}")
        if key in stops:
            scores.append(f"stops {percent(stops[key])}")
        if stage == "distill":
            fig = stage_figures(stage, manifest, metrics, kept_model)
            scores += [f"KL {number(fig['kl'])}"] * (fig["kl"] is not None) + \
                [f"CE {number(fig['ce'])}"] * (fig["ce"] is not None)
            teacher = fig["teacher"].get("dir")
            note = f"distilled from {teacher_label(teacher)}" if teacher else ""
        if stage == "dpo":
            fig = stage_figures(stage, manifest, metrics, kept_model)
            scores += [f"pref acc {percent(fig['val_pref_acc'])}"] * (fig["val_pref_acc"] is not None) + \
                [f"margin {number(fig['val_reward_margin'])}"] * (fig["val_reward_margin"] is not None)
            note = f"{fig['pairs']:,} preference pairs" if fig["pairs"] else ""
        if stage == "sft":
            kept = ((manifest.get("data") or {}).get("train") or {}).get("kept")
            note = f"{kept:,} SFT conversations" if kept else ""
        scores += lm_eval_scores(paths.root, paths.model(stage))
        rows.append(ModelRow(run=name, stage=stage, parameters=manifest.get("parameters") or parameters_of(dims),
                             vocab=(dims or {}).get("vocab_size"), tokens=tokens, val_loss=loss,
                             val_label=LOSS_LABEL[stage], scores=scores, status="done" if manifest else status,
                             note=note, kept=kept_model, kept_note=kept_text(summary, kept_model) or ""))
    return rows


def scan_run(run_dir: str | Path, now: Optional[float] = None) -> RunRecord:
    paths = RunPaths.of(run_dir)
    recipe = read_recipe(paths)
    name = str(recipe.get("name") or paths.root.name)
    status, reason = run_status(paths, recipe, time.time() if now is None else now)
    return RunRecord(name=name, path=paths.root, status=status, reason=reason, recipe=recipe,
                     models=model_rows(paths, name, status))


def scan_runs(runs_dir: str | Path, now: Optional[float] = None) -> list[RunRecord]:
    """Every run directly under `runs_dir` (or `runs_dir` itself if it is a run), by name."""
    root = Path(runs_dir)
    if not root.is_dir():
        raise LLMMakerError(f"{root}: runs folder not found")
    if is_run_dir(root) and (root / "recipe.yaml").is_file():
        return [scan_run(root, now)]
    runs = [scan_run(p, now) for p in sorted(root.iterdir()) if is_run_dir(p)]
    if not runs:
        raise LLMMakerError(f"{root}: no runs found (a run folder holds recipe.yaml and stage folders)")
    return runs


# --------------------------------------------------------------------------------------
# REGISTRY.md
# --------------------------------------------------------------------------------------

def fmt_loss(loss: Optional[float], label: str) -> str:
    """`val 3.800 (44.7)`: the loss and, in brackets, its perplexity."""
    return NONE if loss is None else f"{label} {number(loss)} ({number(math.exp(min(loss, 50.0)), 1)})"


def registry_markdown(runs: list[RunRecord], runs_dir: Path, out_dir: Optional[Path] = None) -> str:
    """REGISTRY.md: the table of every model, then each run's status and card."""
    lines = [GENERATED_MARK, "", f"# Model registry: `{runs_dir}`", "",
             f"{len(runs)} run(s), {sum(len(r.models) for r in runs)} model(s). Loss in nats/token, "
             "perplexity in brackets: comparable only between models with the same tokenizer. `val`: "
             "the pretraining validation split; `resp.`: held-out SFT (DPO: chosen) responses. KL, CE: a "
             "distilled model's last KL to its teacher and cross-entropy; pref acc, margin: a DPO model's "
             "held-out preference accuracy and reward margin.", ""]
    rows = []
    for run in runs:
        for m in run.models:
            label = f"{m.run} ({ROW_LABEL[m.stage]})" if ROW_LABEL[m.stage] else m.run
            tokens = count(m.tokens, NONE) + (f", {m.note}" if m.note else "")
            card = Path(os.path.relpath(run.path / CARD_FILE, out_dir or runs_dir)).as_posix()
            loss = fmt_loss(m.val_loss, m.val_label) + (f" · {m.kept_note}" if m.kept_note else "")
            rows.append([len(rows) + 1, f"[{label}]({card})", number(m.parameters, missing=NONE),
                         number(m.vocab, missing=NONE), tokens, loss,
                         " · ".join(m.scores) or NONE, STATUS_ICON[m.status]])
        if not run.models:
            rows.append([len(rows) + 1, run.name, *[NONE] * 5, STATUS_ICON[run.status]])
    lines += table(["#", "model / run", "params", "vocab", "train tokens", "val loss (ppl)", "eval", "status"], rows)
    lines += ["## Runs", "", *table(["run", "status", "why", "folder"],
                                    [[run.name, STATUS_ICON[run.status], run.reason, f"`{run.path}`"] for run in runs])]
    return "\n".join(lines)


def write_card(run_dir: str | Path, force: bool = False, record: Optional[RunRecord] = None) -> Path:
    """Write RUN_DIR/card.md and RUN_DIR/plots/*.png; returns the card's path."""
    run_dir = Path(run_dir)
    paths = RunPaths.of(run_dir)
    record = record or scan_run(run_dir)
    out = run_dir / CARD_FILE
    check_generated(out, force)
    stages = {}
    for stage in TRAIN_STAGES:
        manifest, metrics = read_manifest(paths.stage_dir(stage)), read_metrics(paths.stage_dir(stage))
        if manifest or metrics:
            stages[stage] = {"manifest": manifest, "metrics": metrics, "dims": model_config(paths.stage_dir(stage))}
    clip = as_float((record.recipe.get("train") or {}).get("grad_clip"))
    made = write_plots(run_dir, run_dir / PLOTS_DIR, grad_clip=clip if clip is not None else 1.0,
                       eval_every=eval_steps(record.recipe))
    plots = {name: os.path.relpath(path, run_dir) for name, path in made.items()}
    text = card_markdown(record, read_json(paths.eval / "report.json"),
                         read_json(paths.eval / "lm_eval" / "results.json"), plots, stages)
    atomic_write_text(out, text)
    return out


def write_registry(runs_dir: str | Path, out: Optional[str | Path] = None, cards: bool = True,
                   force: bool = False, now: Optional[float] = None) -> Path:
    """Scan `runs_dir`, write REGISTRY.md (and each run's card.md + plots); returns its path."""
    runs_dir = Path(runs_dir)
    runs = scan_runs(runs_dir, now)
    out = Path(out) if out else runs_dir / REGISTRY_FILE
    check_generated(out, force)
    if cards:
        for run in runs:
            write_card(run.path, force=force, record=run)
    atomic_write_text(out, registry_markdown(runs, runs_dir, out.parent))
    return out
