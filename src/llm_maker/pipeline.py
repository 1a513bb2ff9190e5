"""Run every stage of a recipe in order: data -> tokenizer -> pack -> pretrain -> sft -> eval.

Each stage skips itself when its manifest's fingerprint (config + upstream fingerprints) is
unchanged, and the training stages resume from their newest complete checkpoint, so running
the pipeline again after an interruption continues where it stopped.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from llm_maker.artifacts import atomic_write_text, read_manifest
from llm_maker.layout import RunPaths
from llm_maker.recipe import Recipe

STAGES = ("data", "tokenizer", "pack", "pretrain", "sft", "eval")


def _stage_runners(recipe: Recipe, paths: RunPaths, force: bool) -> dict[str, Callable[[], Path]]:
    from llm_maker.data import prepare_data
    from llm_maker.eval import run_eval
    from llm_maker.pack import pack_tokens
    from llm_maker.sft import run_sft
    from llm_maker.tokenizer import build_tokenizer
    from llm_maker.train.stage import run_pretrain

    return {
        "data": lambda: prepare_data(recipe.data, paths.data, force=force),
        "tokenizer": lambda: build_tokenizer(recipe.tokenizer, paths.data, paths.tokenizer, force=force),
        "pack": lambda: pack_tokens(recipe.pack, paths.data, paths.tokenizer, paths.pack, force=force),
        "pretrain": lambda: run_pretrain(recipe, paths, resume=not force, force=force),
        "sft": lambda: run_sft(recipe, paths, resume=not force, force=force),
        "eval": lambda: run_eval(recipe, paths, force=force),
    }


def run_pipeline(recipe: Recipe, force: bool = False, only: Optional[list[str]] = None,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the recipe's stages; returns {stage: {"dir", "status", "seconds"}}.

    A training stage that was stopped (STOP file, SIGINT, SIGTERM) ends the pipeline early with
    status "paused"; running the pipeline again resumes it."""
    paths = RunPaths.of(recipe.run_dir)
    paths.root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(paths.recipe, yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    runners = _stage_runners(recipe, paths, force)
    enabled = {"sft": recipe.sft.enabled, "eval": recipe.eval.enabled}
    results: dict[str, Any] = {}
    for name in STAGES:
        if (only and name not in only) or not enabled.get(name, True):
            continue
        stage_dir = getattr(paths, name)
        before = read_manifest(stage_dir)
        log(f"[{name}] ...")
        t0 = time.perf_counter()
        out = runners[name]()
        after = read_manifest(stage_dir)
        seconds = time.perf_counter() - t0
        if after is None:
            status = "paused"
        elif before is not None and before.get("created_unix") == after.get("created_unix"):
            status = "up to date, skipped"
        else:
            status = "done"
        results[name] = {"dir": str(out), "status": status, "seconds": round(seconds, 1)}
        log(f"[{name}] {status} in {seconds:.1f}s -> {out}")
        if status == "paused":
            log(f"[{name}] stopped before the end; run the same command again to resume")
            break
    return results
