"""Run every stage of a recipe in order: data -> tokenizer -> pack -> pretrain -> distill -> sft
-> dpo -> eval (distill and dpo when the recipe enables them; distill.student: scratch distills in
place of pretraining, which is then skipped).

Each stage skips itself when its manifest's fingerprint (config + upstream fingerprints) is
unchanged, and the training stages resume from their newest complete checkpoint, so running
the pipeline again after an interruption continues where it stopped.

STAGES adds to layout.STAGES (names, directories, help) how to run each stage; the pipeline and
the CLI's stage verbs both run a stage through it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from llm_maker import layout
from llm_maker.artifacts import atomic_write_text, read_manifest
from llm_maker.data.stage import prepare_data
from llm_maker.distill.stage import run_distill
from llm_maker.dpo.stage import run_dpo
from llm_maker.eval.evaluate import run_eval
from llm_maker.layout import RunPaths, StageSpec
from llm_maker.pack.packer import pack_tokens
from llm_maker.recipe import Recipe
from llm_maker.sft.stage import run_sft
from llm_maker.stopping import StageStopped, signal_received
from llm_maker.tokenizer.stage import build_tokenizer
from llm_maker.train.stage import run_pretrain

Runner = Callable[[Recipe, RunPaths, bool, bool], Path]  # (recipe, paths, resume, force) -> the stage's dir


def _data(recipe: Recipe, paths: RunPaths, resume: bool, force: bool) -> Path:
    return prepare_data(recipe.data, paths.data, force=force)


def _tokenizer(recipe: Recipe, paths: RunPaths, resume: bool, force: bool) -> Path:
    return build_tokenizer(recipe.tokenizer, paths.data, paths.tokenizer, force=force)


def _pack(recipe: Recipe, paths: RunPaths, resume: bool, force: bool) -> Path:
    return pack_tokens(recipe.pack, paths.data, paths.tokenizer, paths.pack, force=force)


def _eval(recipe: Recipe, paths: RunPaths, resume: bool, force: bool) -> Path:
    return run_eval(recipe, paths, force=force)


def _always(recipe: Recipe) -> bool:
    return True


@dataclass(frozen=True)
class Stage:
    spec: StageSpec  # name, help, whether it trains (layout.py: readable without importing the stages)
    run: Runner
    enabled: Callable[[Recipe], bool] = _always

    @property
    def name(self) -> str:
        return self.spec.name


_RUNNERS: dict[str, tuple[Runner, Callable[[Recipe], bool]]] = {
    "data": (_data, _always),
    "tokenizer": (_tokenizer, _always),
    "pack": (_pack, _always),
    # distill.student: scratch distills in place of pretraining
    "pretrain": (run_pretrain, lambda recipe: not (recipe.distill.enabled and recipe.distill.student == "scratch")),
    "distill": (run_distill, lambda recipe: recipe.distill.enabled),
    "sft": (run_sft, lambda recipe: recipe.sft.enabled),
    "dpo": (run_dpo, lambda recipe: recipe.dpo.enabled),
    "eval": (_eval, lambda recipe: recipe.eval.enabled),
}
assert set(_RUNNERS) == set(layout.STAGE_NAMES), "every stage of layout.STAGES needs a runner here"
STAGES: tuple[Stage, ...] = tuple(Stage(spec, *_RUNNERS[spec.name]) for spec in layout.STAGES)
STAGE_BY_NAME = {s.name: s for s in STAGES}


def run_stage(name: str, recipe: Recipe, resume: bool = False, force: bool = False) -> Path:
    """Run one stage of the recipe (whether or not the recipe enables it); returns its directory."""
    return STAGE_BY_NAME[name].run(recipe, RunPaths.of(recipe.run_dir), resume, force)


def run_pipeline(recipe: Recipe, force: bool = False, only: Optional[list[str]] = None,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the recipe's stages; returns {stage: {"dir", "status", "seconds"}}.

    A training stage that was stopped (STOP file, SIGINT, SIGTERM) ends the pipeline there: its
    status is "paused" and `StageStopped` is raised (with `.results`) after the log line; a SIGTERM
    during a stage that cannot stop midway (data, pack, ...) stops the pipeline after it. Running
    the pipeline again resumes."""
    paths = RunPaths.of(recipe.run_dir)
    paths.root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(paths.recipe, yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    results: dict[str, Any] = {}
    for stage in STAGES:
        if (only and stage.name not in only) or not stage.enabled(recipe):
            continue
        stage_dir = paths.stage_dir(stage.name)
        before = read_manifest(stage_dir)
        if signal_received():
            stop = StageStopped(stage.name, None, signal_received(), None)
            log(f"[{stage.name}] not started: {signal_received()} received; run the same command again to go on")
            stop.results = results
            raise stop
        log(f"[{stage.name}] ...")
        t0 = time.perf_counter()
        try:
            out = stage.run(recipe, paths, not force, force)
        except StageStopped as stop:
            seconds = time.perf_counter() - t0
            results[stage.name] = {"dir": str(stage_dir), "status": "paused", "seconds": round(seconds, 1)}
            log(f"[{stage.name}] {stop} after {seconds:.1f}s; run the same command again to resume")
            stop.results = results
            raise
        after = read_manifest(stage_dir)
        seconds = time.perf_counter() - t0
        if after is None:
            status = "paused"
        elif before is not None and before.get("created_unix") == after.get("created_unix"):
            status = "up to date, skipped"
        else:
            status = "done"
        results[stage.name] = {"dir": str(out), "status": status, "seconds": round(seconds, 1)}
        log(f"[{stage.name}] {status} in {seconds:.1f}s -> {out}")
        if status == "paused":
            log(f"[{stage.name}] stopped before the end; run the same command again to resume")
            break
    return results
