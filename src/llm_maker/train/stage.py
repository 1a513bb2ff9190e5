"""The pretraining stage: pack/ + tokenizer/ -> pretrain/{checkpoints,final,metrics.csv}."""
from __future__ import annotations

from pathlib import Path

import torch

from llm_maker.artifacts import fingerprint_inputs, inputs_fingerprint, require_manifest, write_manifest
from llm_maker.devices import resolve_device
from llm_maker.errors import CheckpointError, RecipeError
from llm_maker.eval.multiple_choice import training_hook
from llm_maker.layout import RunPaths
from llm_maker.model.llama import LlamaConfig, LlamaModel, count_parameters
from llm_maker.model.presets import resolve_model_config
from llm_maker.pack.shards import load_split
from llm_maker.plan import check_before_training
from llm_maker.recipe import Recipe, TrainConfig
from llm_maker.stopping import StageStopped
from llm_maker.tokenizer.tokenizer import Tokenizer
from llm_maker.train.batches import PretrainBatches
from llm_maker.train.checkpoint import ModelMeta, latest_checkpoint, load_model_dir, prepare_stage_dir
from llm_maker.train.distributed import init_distributed, local_device
from llm_maker.train.trainer import Evaluation, run_training


def model_config_for(recipe: Recipe, tokenizer: Tokenizer) -> LlamaConfig:
    """The recipe's model shape with the tokenizer's vocabulary (unless the recipe sets a larger one)."""
    spec = recipe.model
    if spec.vocab_size is not None and spec.vocab_size < tokenizer.vocab_size:
        raise RecipeError(f"{recipe.source_file}: `model.vocab_size` is {spec.vocab_size}, smaller than the "
                          f"tokenizer's {tokenizer.vocab_size} tokens")
    try:
        return resolve_model_config(spec, vocab_size=spec.vocab_size or tokenizer.vocab_size)
    except ValueError as e:  # "field: why"
        name, _, why = str(e).partition(": ")
        raise RecipeError(f"{recipe.source_file}: `model.{name}` {why}") from None


def build_model(cfg: LlamaConfig, seed: int) -> LlamaModel:
    """Build and check the model: its parameter count must match the formula of count_parameters."""
    torch.manual_seed(seed)
    model = LlamaModel(cfg)
    expected, actual = count_parameters(cfg), model.num_parameters()
    assert expected == actual, f"parameter count {actual:,} != {expected:,} from the dims"
    return model


def initial_model(model_dir: str, tokenizer: Tokenizer) -> LlamaModel:
    """The starting point of continued pretraining, refused if it was trained with another tokenizer."""
    model, _, _ = load_model_dir(model_dir, expected_tokenizer_hash=tokenizer.hash)
    return model


def multiple_choice_evaluations(tc: TrainConfig, tokenizer: Tokenizer) -> list[Evaluation]:
    """`train.mc_eval`: multiple-choice acc / acc_norm over its items at every eval step, or nothing."""
    hook = training_hook(tc.mc_eval, tokenizer, tc.mc_eval_items)  # the items load once, here
    return [] if hook is None else [lambda module, device, amp_dtype: hook(module)]


def pretrain_inputs(recipe: Recipe, paths: RunPaths) -> dict:
    """What decides the weights: the model shape, the train fields that change results (its
    resolved seed included; not logging or checkpoint cadence), the packed tokens and tokenizer.
    Hashed into the stage fingerprint; "settings" (the whole train config) rides along unhashed."""
    inputs = fingerprint_inputs({"model": recipe.model, "train": recipe.train.fingerprint_fields()},
                                paths.pack, paths.tokenizer)
    return {**inputs, "settings": fingerprint_inputs(recipe.train)["config"]}


def run_pretrain(recipe: Recipe, paths: RunPaths, resume: bool = False, force: bool = False) -> Path:
    """Pretrain the recipe's model on the packed tokens; returns pretrain/ (with final/ when done).

    Under torchrun every rank runs this; rank 0 alone deletes (--force) and writes the manifest."""
    out = paths.pretrain
    ctx = init_distributed(resolve_device(recipe.train.device))
    pack_manifest = require_manifest(paths.pack, "pack")
    tokenizer = Tokenizer.load(paths.tokenizer)
    if pack_manifest.get("tokenizer_hash") != tokenizer.hash:
        raise CheckpointError(f"{paths.pack}: packed with tokenizer {pack_manifest.get('tokenizer_hash')}, "
                              f"but {paths.tokenizer} holds {tokenizer.hash}; rerun the pack stage")
    inputs = pretrain_inputs(recipe, paths)
    fp = inputs_fingerprint(inputs)
    if prepare_stage_dir(out, fp, force, resume, ctx, "pretraining", "model/train config or other data",
                         f"pass --force to retrain from scratch (this deletes {out})", inputs):
        return out
    # The plan (plan.py): printed, and on a GPU a run that cannot fit stops here, before any compute.
    check_before_training(recipe, paths, local_device(resolve_device(recipe.train.device), ctx), ctx.world_size,
                          tokenizer.vocab_size, show=ctx.is_main)
    if recipe.model.init_from:
        model = initial_model(recipe.model.init_from, tokenizer)
        cfg = model.config
    else:
        cfg = model_config_for(recipe, tokenizer)
        model = build_model(cfg, recipe.train.seed)
    tc = recipe.train
    device = local_device(resolve_device(tc.device), ctx)
    # Global micro-batch indices: the trainer deals them to the ranks (train/distributed.py), so the
    # batch source is the one-process one and a step sees the same blocks on any number of ranks.
    batches = PretrainBatches(load_split(paths.pack, "train"), cfg.seq_len, tc.micro_batch_size, seed=tc.seed,
                              val_tokens=load_split(paths.pack, "val"), device=device)
    meta = ModelMeta(stage="pretrain", recipe=recipe.name, fingerprint=fp, trained_with=inputs)
    summary = run_training(model, batches, tc, out, tokenizer, meta, resume=resume,
                           evaluations=multiple_choice_evaluations(tc, tokenizer))
    if summary["stopped"]:  # paused at a checkpoint: no manifest, so the next run resumes
        raise StageStopped("pretrain", summary["steps"], summary["stopped_by"],
                           latest_checkpoint(out / "checkpoints"))
    if not ctx.is_main:
        return out
    write_manifest(out, "pretrain", fp, summary=summary, model=cfg.to_dict(),
                   parameters=count_parameters(cfg), tokenizer_hash=tokenizer.hash,
                   pack_fingerprint=pack_manifest["fingerprint"])
    return out
