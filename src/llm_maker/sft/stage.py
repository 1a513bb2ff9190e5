"""The SFT stage: pretrain/final (or best/; distill/'s when the recipe enables distillation) + tokenizer/
-> sft/{data,checkpoints,final,best,metrics.csv}.

    sft/data/train.jsonl, heldout.jsonl   the conversations used, one {"messages": ...} per line
    sft/final/                            the tuned model at its last step, plus tokenizer_config.json (chat template)
    sft/best/                             the same at its best held-out evaluation (`sft.use: best`, the default)
    sft/manifest.json                     counts (dropped, supervised fraction), the training summary and
                                          which models later stages take: `use` (sft.use) and
                                          `start_from` (sft.start_from), read by layout.RunPaths.model
"""
from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path
from typing import Any

from llm_maker.artifacts import (
    atomic_write_json,
    atomic_write_text,
    fingerprint_inputs,
    inputs_fingerprint,
    read_manifest,
    require_manifest,
    write_manifest,
)
from llm_maker.devices import resolve_device
from llm_maker.distill.loss import DistillLoss
from llm_maker.distill.teacher import OnlineTeacherBatches, check_teacher, load_teacher, teacher_identity
from llm_maker.errors import CheckpointError, DataError
from llm_maker.layout import BEST, FINAL, WEIGHTS, RunPaths
from llm_maker.recipe import Recipe, SFTConfig
from llm_maker.sft.dataset import SFTBatches, encode_conversations, split_heldout
from llm_maker.sft.formats import data_signature, load_sft_data
from llm_maker.sft.templates import hf_tokenizer_config, stop_token_ids
from llm_maker.stopping import StageStopped
from llm_maker.tokenizer.tokenizer import Tokenizer
from llm_maker.train import trainer
from llm_maker.train.checkpoint import ModelMeta, latest_checkpoint, load_model_dir, prepare_stage_dir
from llm_maker.train.distributed import init_distributed, local_device
from llm_maker.train.evaluation import token_accuracy
from llm_maker.train.stage import multiple_choice_evaluations
from llm_maker.train.trainer import Evaluation


def sft_conversations(recipe: Recipe) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The recipe's conversations (built-in set, a file in any format of sft/formats.py, a hub
    dataset or a weighted mixture), capped at max_conversations, and the mixture's counts."""
    return load_sft_data(recipe.sft.data, seed=recipe.seed, selection_key=recipe.data.selection_key)


def sft_inputs(recipe: Recipe, paths: RunPaths) -> dict[str, Any]:
    """SFT config + upstream fingerprints + what else decides the data: the split key, the
    recipe seed (built-in set), the bytes of each file source, the name of each hub dataset.
    Hashed into the stage fingerprint; "settings" (the whole sft.train config) rides along unhashed.
    sft.use changes no weight (the manifest records it); sft.start_from does, when it is not final."""
    data_sig = data_signature(recipe.sft.data, recipe.seed)
    config = {**dataclasses.asdict(recipe.sft), "train": recipe.sft.train.fingerprint_fields()}
    del config["use"]
    if recipe.sft.start_from == FINAL:  # as before the key existed: those runs keep their fingerprint
        del config["start_from"]
    if recipe.sft.distill.teacher is None:  # no teacher: as before the key existed
        del config["distill"]
    else:  # the teacher by its identity (weights, shape, tokenizer), not by its path
        teacher = teacher_identity(recipe.sft.distill.teacher)
        config["distill"]["teacher"] = {"hash": teacher["hash"], "tokenizer_hash": teacher["tokenizer_hash"]}
    inputs = fingerprint_inputs(config, paths.stage_dir(recipe.base_stage), paths.tokenizer,
                                extra={"data": data_sig, "selection_key": recipe.data.selection_key})
    return {**inputs, "settings": fingerprint_inputs(recipe.sft.train)["config"]}


def token_accuracy_evaluation(batches: SFTBatches, max_batches: int) -> Evaluation:
    """SFT's held-out token accuracy (`val_token_acc` in metrics.csv) at every eval step."""
    def evaluate(module, device, amp_dtype) -> dict[str, Any]:
        acc = token_accuracy(module, itertools.islice(batches.val_batches(), max_batches), device, amp_dtype)
        return {"val_token_acc": None if acc is None else f"{acc:.4f}"}

    return evaluate


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def base_model_dir(recipe: Recipe, paths: RunPaths) -> Path:
    """The pretrained model SFT starts from (`sft.start_from`): final/ or best/ of pretrain (or of
    distill, when the recipe enables it: Recipe.base_stage)."""
    stage = recipe.base_stage
    if recipe.sft.start_from == FINAL:
        return paths.final(stage)
    best = paths.best(stage)
    if not (best / WEIGHTS).is_file():
        key = "train" if stage == "pretrain" else "distill.train"
        what = {"pretrain": "pretraining", "distill": "distillation"}[stage]
        raise CheckpointError(f"{best}: no best {what} model, but sft.start_from is best; set {key}.keep_best: "
                              f"true and rerun the stage (llm-maker {stage} RECIPE --force), or set "
                              "sft.start_from: final")
    return best


def kept_model(recipe: Recipe, summary: dict[str, Any]) -> str:
    """The SFT model later stages take: best/ when the recipe says so and the run kept one, else final/."""
    return BEST if recipe.sft.use == BEST and (summary.get("best") or {}).get("dir") else FINAL


def record_choice(out: Path, recipe: Recipe) -> None:
    """A finished sft/ whose recipe now names another `sft.use` (which changes no weight, so the
    stage is up to date): its manifest says the new choice, when that model exists."""
    manifest = read_manifest(out) or {}
    want = BEST if recipe.sft.use == BEST and (out / BEST / WEIGHTS).is_file() else FINAL
    if recipe.sft.use != want:
        print(f"note: sft.use is {recipe.sft.use} but {out} holds no {recipe.sft.use}/ (trained without it): "
              f"later stages take {want}/; `llm-maker sft RECIPE --force` retrains with it", flush=True)
    if manifest and manifest.get("use", FINAL) != want:
        atomic_write_json(out / "manifest.json", {**manifest, "use": want})


def sft_template(recipe_template: str, base_meta: ModelMeta) -> str:
    """The template SFT trains with: the recipe's, unless that is the default and the base model (an
    import) has its own template that one of ours renders alike (config.json's chat_template, set by
    import-hf / import-gguf's probe). A Jinja template ours do not match is not trained with: its
    turns' label masks are not known, so SFT falls back to the recipe's (chatml)."""
    default = next(f.default for f in dataclasses.fields(SFTConfig) if f.name == "template")
    if recipe_template == default and base_meta.chat_template and base_meta.extra.get("jinja_chat_template"):
        return base_meta.chat_template
    return recipe_template


def run_sft(recipe: Recipe, paths: RunPaths, resume: bool = False, force: bool = False) -> Path:
    """Fine-tune pretrain/final (or best/: sft.start_from) on chat data with completion-only loss;
    returns sft/ (with final/, and best/ unless sft.use is final, when done)."""
    out = paths.sft
    tok_manifest = require_manifest(paths.tokenizer, "tokenizer")
    require_manifest(paths.stage_dir(recipe.base_stage), recipe.base_stage)
    base_dir = base_model_dir(recipe, paths)  # before --force deletes anything
    teacher_cfg = recipe.sft.distill
    if teacher_cfg.teacher is not None:  # a teacher with another tokenizer: refused before any compute
        check_teacher(teacher_cfg.teacher, Tokenizer.load(paths.tokenizer).hash, 0, "sft.distill.teacher")
    inputs = sft_inputs(recipe, paths)
    fp = inputs_fingerprint(inputs)
    ctx = init_distributed(resolve_device(recipe.sft.train.device))
    if prepare_stage_dir(out, fp, force, resume, ctx, "SFT", "SFT config, data or base model",
                         "run `llm-maker sft RECIPE --force` to start SFT over", inputs):
        if ctx.is_main:
            record_choice(out, recipe)
        return out
    (out / "manifest.json").unlink(missing_ok=True)  # from here on, sft/ is not a finished stage

    tokenizer = Tokenizer.load(paths.tokenizer)
    model, _, base_meta = load_model_dir(base_dir, device="cpu", expected_tokenizer_hash=tokenizer.hash)
    template = sft_template(recipe.sft.template, base_meta)

    convs, mixture = sft_conversations(recipe)
    train, heldout = split_heldout(convs, recipe.sft.data.heldout_fraction, recipe.data.selection_key)
    if not train:
        raise DataError(f"no SFT training conversations from sft.data.source={recipe.sft.data.source!r} "
                        f"(max_conversations={recipe.sft.data.max_conversations}, "
                        f"heldout_fraction={recipe.sft.data.heldout_fraction})")
    write_jsonl(out / "data" / "train.jsonl", train)
    write_jsonl(out / "data" / "heldout.jsonl", heldout)

    max_len = model.config.seq_len + 1  # x = ids[:-1] must fit the context
    train_enc, train_stats = encode_conversations(tokenizer, train, template, max_len)
    heldout_enc, heldout_stats = encode_conversations(tokenizer, heldout, template, max_len)
    if not train_enc:
        raise DataError(f"none of the {len(train)} SFT training conversations fits model.seq_len="
                        f"{model.config.seq_len} (too long: {train_stats['dropped_too_long']}, "
                        f"no assistant turn: {train_stats['dropped_no_assistant']})")
    tc = recipe.sft.train
    if recipe.sft.use == BEST:  # later stages take best/: keep it, whatever sft.train.keep_best says
        tc = dataclasses.replace(tc, keep_best=True)
    batches = SFTBatches(train_enc, tc.micro_batch_size, tokenizer.pad_id, seed=tc.seed, val_encoded=heldout_enc)

    meta = ModelMeta(stage="sft", recipe=recipe.name, fingerprint=fp, trained_with=inputs, chat_template=template,
                     stop_token_ids=stop_token_ids(tokenizer, template), base_model=str(base_dir))
    evaluations = [token_accuracy_evaluation(batches, tc.eval_batches),
                   *multiple_choice_evaluations(tc, tokenizer)]
    teaching: dict[str, Any] = {}
    if teacher_cfg.teacher is not None:  # online distillation, the KL on the supervised positions only
        check_teacher(teacher_cfg.teacher, tokenizer.hash, batches.seq_len, "sft.distill.teacher")
        device = local_device(resolve_device(tc.device), ctx)
        teacher = load_teacher(teacher_cfg.teacher, device, teacher_cfg.teacher_precision,
                               "sft.distill.teacher_precision")
        teaching = {"batches": OnlineTeacherBatches(batches, teacher, teacher_cfg.temperature,
                                                    model.config.vocab_size),
                    "loss_module": DistillLoss(model, teacher_cfg.alpha, teacher_cfg.temperature,
                                               tc.loss_chunk_size)}
    # trainer.run_training, looked up at call time: tests substitute it
    summary = trainer.run_training(model, teaching.pop("batches", batches), tc, out_dir=out, tokenizer=tokenizer,
                                   meta=meta, resume=resume, evaluations=evaluations, **teaching)
    if summary.get("stopped"):  # paused at a checkpoint: no manifest, so the next run resumes
        raise StageStopped("sft", summary["steps"], summary["stopped_by"], latest_checkpoint(out / "checkpoints"))
    if not summary.get("final_dir"):
        return out  # not rank 0
    for model_dir in (summary["final_dir"], (summary.get("best") or {}).get("dir")):
        if model_dir:
            atomic_write_json(Path(model_dir) / "tokenizer_config.json",
                              hf_tokenizer_config(template, model.config.seq_len))
    write_manifest(out, "sft", fp, template=template, summary=summary, tokenizer_hash=tokenizer.hash,
                   use=kept_model(recipe, summary), start_from=recipe.sft.start_from,
                   tokenizer_fingerprint=tok_manifest.get("fingerprint"),
                   data={"source": recipe.sft.data.source, "train": train_stats, "heldout": heldout_stats,
                         "mixture": mixture},
                   batch_seq_len=batches.seq_len)
    return out
