"""The distill stage: pack/ + tokenizer/ + a teacher (+ pretrain/final) -> distill/{checkpoints,final,metrics.csv}.

The recipe's model (distill.student: scratch, from distill.train.seed) or pretrain/final
(student: pretrain) trains on the packed tokens with distill/loss.py's loss against
distill.teacher, online (the teacher runs on each micro-batch) or cached (its top-k log-probs,
computed once into pack/teacher/..., distill/teacher.py). The trainer is pretraining's: the same
checkpoints, exact resume, STOP files and DDP / FSDP2; the teacher stays in the batch source.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from llm_maker.artifacts import fingerprint_inputs, inputs_fingerprint, require_manifest, write_manifest
from llm_maker.devices import resolve_device
from llm_maker.distill.loss import DistillLoss
from llm_maker.distill.teacher import (
    CachedTeacherBatches,
    OnlineTeacherBatches,
    TopKCache,
    build_topk_cache,
    check_teacher,
    load_teacher,
    teacher_identity,
    topk_cache_dir,
)
from llm_maker.errors import CheckpointError
from llm_maker.layout import RunPaths
from llm_maker.model.llama import count_parameters
from llm_maker.pack.shards import load_split
from llm_maker.recipe import Recipe
from llm_maker.stopping import StageStopped
from llm_maker.tokenizer.tokenizer import Tokenizer
from llm_maker.train.batches import PretrainBatches
from llm_maker.train.checkpoint import ModelMeta, latest_checkpoint, prepare_stage_dir
from llm_maker.train.distributed import barrier, init_distributed, local_device
from llm_maker.train.stage import build_model, initial_model, model_config_for, multiple_choice_evaluations
from llm_maker.train.trainer import run_training

CACHE_LOGITS_ELEMENTS = 1 << 27  # blocks per teacher forward while caching: ~512 MB of fp32 logits


def distill_inputs(recipe: Recipe, paths: RunPaths, teacher: dict[str, Any]) -> dict[str, Any]:
    """What decides the weights: the distill config with the teacher's identity (its weights hash and
    tokenizer) in place of its path, distill.train's result fields, the student's shape, the packed
    tokens and tokenizer (and pretrain/ when the student starts from it). top_k only in cached mode."""
    dc = recipe.distill
    config = {**dataclasses.asdict(dc), "train": dc.train.fingerprint_fields(),
              "teacher": {"hash": teacher["hash"], "tokenizer_hash": teacher["tokenizer_hash"]}}
    if dc.mode == "online":
        del config["top_k"]
    upstream = [paths.pack, paths.tokenizer] + ([paths.pretrain] if dc.student == "pretrain" else [])
    inputs = fingerprint_inputs({"distill": config, "model": dataclasses.asdict(recipe.model)}, *upstream)
    return {**inputs, "settings": fingerprint_inputs(dc.train)["config"]}


def run_distill(recipe: Recipe, paths: RunPaths, resume: bool = False, force: bool = False) -> Path:
    """Distill the teacher into the student on the packed tokens; returns distill/ (with final/ when done).

    Under torchrun every rank runs this; rank 0 alone deletes (--force), builds the top-k cache
    and writes the manifest."""
    dc, tc, out = recipe.distill, recipe.distill.train, paths.distill
    ctx = init_distributed(resolve_device(tc.device))
    pack_manifest = require_manifest(paths.pack, "pack")
    tokenizer = Tokenizer.load(paths.tokenizer)
    if pack_manifest.get("tokenizer_hash") != tokenizer.hash:
        raise CheckpointError(f"{paths.pack}: packed with tokenizer {pack_manifest.get('tokenizer_hash')}, "
                              f"but {paths.tokenizer} holds {tokenizer.hash}; rerun the pack stage")
    if dc.student == "pretrain":
        require_manifest(paths.pretrain, "pretrain")
        model = initial_model(str(paths.final("pretrain")), tokenizer)
        cfg = model.config
    else:
        cfg, model = model_config_for(recipe, tokenizer), None
    check_teacher(dc.teacher, tokenizer.hash, cfg.seq_len, "distill.teacher")  # before any compute
    teacher = teacher_identity(dc.teacher)
    inputs = distill_inputs(recipe, paths, teacher)
    fp = inputs_fingerprint(inputs)
    if prepare_stage_dir(out, fp, force, resume, ctx, "distillation", "distill config, teacher or data",
                         f"pass --force to distill from scratch (this deletes {out})", inputs):
        return out
    if model is None:
        model = build_model(cfg, tc.seed)
    device = local_device(resolve_device(tc.device), ctx)
    base = PretrainBatches(load_split(paths.pack, "train"), cfg.seq_len, tc.micro_batch_size, seed=tc.seed,
                           val_tokens=load_split(paths.pack, "val"), device=device)
    teacher_model = load_teacher(dc.teacher, device, dc.teacher_precision, "distill.teacher_precision")
    record = {"dir": teacher["dir"], "hash": teacher["hash"], "mode": dc.mode, "k": None, "T": dc.temperature,
              "alpha": dc.alpha, "precision": dc.teacher_precision}
    if dc.mode == "online":
        batches: Any = OnlineTeacherBatches(base, teacher_model, dc.temperature, cfg.vocab_size)
    else:
        cache_dir = topk_cache_dir(paths.pack, teacher["hash"], dc.top_k, dc.temperature, cfg.seq_len)
        if ctx.is_main:
            fields = {"k": dc.top_k, "temperature": dc.temperature, "seq_len": cfg.seq_len,
                      "teacher_hash": teacher["hash"], "teacher_precision": dc.teacher_precision,
                      "tokenizer_hash": tokenizer.hash, "pack_fingerprint": pack_manifest["fingerprint"]}
            computed = build_topk_cache(teacher_model, base.tokens, cache_dir, fields, cfg.vocab_size,
                                        batch_size=max(1, CACHE_LOGITS_ELEMENTS // (cfg.seq_len * cfg.vocab_size)))
            print(f"teacher top-k cache: {cache_dir} ({'built' if computed else 'reused'})", flush=True)
        barrier(ctx)  # the other ranks read it once rank 0 has finished it
        del teacher_model  # not needed during training
        batches = CachedTeacherBatches(base, TopKCache(cache_dir))
        record.update(k=dc.top_k, cache=str(cache_dir))
    meta = ModelMeta(stage="distill", recipe=recipe.name, fingerprint=fp, trained_with=inputs,
                     extra={"teacher": record})
    loss_module = DistillLoss(model, dc.alpha, dc.temperature, tc.loss_chunk_size)
    summary = run_training(model, batches, tc, out, tokenizer, meta, resume=resume,
                           evaluations=multiple_choice_evaluations(tc, tokenizer), loss_module=loss_module)
    if summary["stopped"]:  # paused at a checkpoint: no manifest, so the next run resumes
        raise StageStopped("distill", summary["steps"], summary["stopped_by"],
                           latest_checkpoint(out / "checkpoints"))
    if not ctx.is_main:
        return out
    write_manifest(out, "distill", fp, summary=summary, model=cfg.to_dict(), parameters=count_parameters(cfg),
                   tokenizer_hash=tokenizer.hash, pack_fingerprint=pack_manifest["fingerprint"], teacher=record,
                   student=dc.student)
    return out

