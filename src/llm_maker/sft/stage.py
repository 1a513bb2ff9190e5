"""The SFT stage: pretrain/final + tokenizer/ -> sft/{data,checkpoints,final,metrics.csv}.

    sft/data/train.jsonl, heldout.jsonl   the conversations used, one {"messages": ...} per line
    sft/final/                            the tuned model, plus tokenizer_config.json (chat template)
    sft/manifest.json                     counts (dropped, supervised fraction) and the training summary
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from llm_maker.artifacts import (atomic_write_json, atomic_write_text, is_up_to_date, require_manifest,
                                 stage_fingerprint, write_manifest)
from llm_maker.errors import CheckpointError, DataError
from llm_maker.layout import RunPaths
from llm_maker.recipe import Recipe
from llm_maker.sft.dataset import SFTBatches, encode_conversations, split_heldout
from llm_maker.sft.templates import end_token, jinja_chat_template, stop_token_ids
from llm_maker.tokenizer.tokenizer import PAD, Tokenizer
from llm_maker.train.checkpoint import check_resumable, load_model_dir


def sft_conversations(recipe: Recipe) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The recipe's conversations (built-in set, a file in any format of sft/formats.py, a hub
    dataset or a weighted mixture), capped at max_conversations, and the mixture's counts."""
    from llm_maker.sft.formats import load_sft_data

    return load_sft_data(recipe.sft.data, seed=recipe.seed, selection_key=recipe.data.selection_key)


def sft_fingerprint(recipe: Recipe, paths: RunPaths) -> str:
    """SFT config + upstream fingerprints + what else decides the data: the split key, the
    recipe seed (built-in set), the bytes of each file source, the name of each hub dataset."""
    from llm_maker.sft.formats import data_signature

    data_sig = data_signature(recipe.sft.data, recipe.seed)
    return stage_fingerprint(recipe.sft, paths.pretrain, paths.tokenizer,
                             extra={"data": data_sig, "selection_key": recipe.data.selection_key})


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def hf_tokenizer_config(template: str, model_max_length: int) -> dict[str, Any]:
    """tokenizer_config.json for transformers: the chat template and its end/pad tokens."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": jinja_chat_template(template),
        "eos_token": end_token(template),
        "pad_token": PAD,
        "bos_token": None,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
    }


def run_sft(recipe: Recipe, paths: RunPaths, resume: bool = False, force: bool = False) -> Path:
    """Fine-tune pretrain/final on chat data with completion-only loss; returns sft/ (with final/ when done)."""
    from llm_maker.train.trainer import run_training  # looked up at call time: tests substitute it

    out = paths.sft
    tok_manifest = require_manifest(paths.tokenizer, "tokenizer")
    require_manifest(paths.pretrain, "pretrain")
    fp = sft_fingerprint(recipe, paths)
    if force:
        shutil.rmtree(out, ignore_errors=True)
    elif is_up_to_date(out, fp) and (out / "final").is_dir():
        return out
    elif (out / "manifest.json").is_file() and not resume:
        raise CheckpointError(f"{out} holds a finished SFT run with another config; pass --force to retrain")
    if resume:
        check_resumable(out, fp, "SFT config, data or base model",
                        "run `llm-maker sft RECIPE --force` to start SFT over")
    (out / "manifest.json").unlink(missing_ok=True)  # from here on, sft/ is not a finished stage

    tokenizer = Tokenizer.load(paths.tokenizer)
    model, _, _ = load_model_dir(paths.pretrain / "final", device="cpu", expected_tokenizer_hash=tokenizer.hash)
    template = recipe.sft.template

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
    batches = SFTBatches(train_enc, tc.micro_batch_size, tokenizer.pad_id, seed=tc.seed, val_encoded=heldout_enc)

    meta = {"stage": "sft", "recipe": recipe.name, "fingerprint": fp, "chat_template": template,
            "stop_token_ids": stop_token_ids(tokenizer, template), "base_model": str(paths.pretrain / "final")}
    summary = run_training(model, batches, tc, out_dir=out, tokenizer=tokenizer, meta=meta, resume=resume)
    if summary.get("stopped") or not summary.get("final_dir"):
        return out  # paused: no manifest, so the next run resumes
    atomic_write_json(Path(summary["final_dir"]) / "tokenizer_config.json",
                      hf_tokenizer_config(template, model.config.seq_len))
    write_manifest(out, "sft", fp, template=template, summary=summary, tokenizer_hash=tokenizer.hash,
                   tokenizer_fingerprint=tok_manifest.get("fingerprint"),
                   data={"source": recipe.sft.data.source, "train": train_stats, "heldout": heldout_stats,
                         "mixture": mixture},
                   batch_seq_len=batches.seq_len)
    return out
