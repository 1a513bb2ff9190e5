"""The DPO stage: the SFT model later stages take (sft/best or sft/final) + tokenizer/ + preference
pairs -> dpo/{data,reference,checkpoints,final,best,metrics.csv}.

    dpo/data/train.jsonl, heldout.jsonl  the triples used, one {"prompt", "chosen", "rejected", ...} per line
    dpo/reference/                       the frozen reference's summed completion log-probs of every pair
                                         (logprobs.safetensors), computed once; its manifest names the
                                         reference (directory, weights hash), the precision and the encoded
                                         pairs, and a resume whose reference and pairs match reuses it
    dpo/final/, best/                    the tuned model, with tokenizer_config.json (the SFT model's template)
    dpo/manifest.json                    counts (pairs, dropped_too_long, dropped_prompt_too_long, dropped_missing,
                                         ...), the summary, `use` (dpo.use, read by layout.RunPaths.model)
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

from llm_maker.artifacts import (
    atomic_dir,
    atomic_write_json,
    fingerprint_inputs,
    inputs_fingerprint,
    read_json,
    read_manifest,
    require_manifest,
    sha256_file,
    write_manifest,
)
from llm_maker.devices import precision_name, resolve_device, resolve_precision
from llm_maker.dpo.data import (
    DPOBatches,
    EncodedPair,
    encode_pairs,
    load_preferences,
    pad_pairs,
    pair_seq_len,
    preference_signature,
    split_pairs,
)
from llm_maker.dpo.loss import DPOLoss, preference_metrics, reference_logprobs
from llm_maker.errors import CheckpointError, DataError
from llm_maker.layout import BEST, FINAL, WEIGHTS, RunPaths
from llm_maker.recipe import Recipe
from llm_maker.sft.stage import write_jsonl
from llm_maker.sft.templates import hf_tokenizer_config, stop_token_ids
from llm_maker.stopping import StageStopped
from llm_maker.tokenizer.tokenizer import Tokenizer
from llm_maker.train import trainer
from llm_maker.train.checkpoint import ModelMeta, latest_checkpoint, load_model_dir, prepare_stage_dir
from llm_maker.train.distributed import barrier, init_distributed, local_device
from llm_maker.train.stage import multiple_choice_evaluations
from llm_maker.train.trainer import Evaluation

REFERENCE = "reference"
REFERENCE_FILE = "logprobs.safetensors"


def start_model_dir(paths: RunPaths) -> Path:
    """The SFT model DPO starts from: the one later stages take (sft.use, RunPaths.model)."""
    require_manifest(paths.sft, "sft")
    start = paths.model("sft")
    if not (start / WEIGHTS).is_file():
        raise CheckpointError(f"{start}: no SFT model ({WEIGHTS} missing); rerun `llm-maker sft RECIPE --force`")
    return start


def reference_model_dir(recipe: Recipe, start: Path) -> Path:
    """dpo.reference, or the SFT model DPO starts from."""
    return Path(recipe.dpo.reference) if recipe.dpo.reference else start


def dpo_inputs(recipe: Recipe, paths: RunPaths, start: Path) -> dict[str, Any]:
    """DPO config + the SFT stage + tokenizer + what else decides the pairs and the reference: the
    data signature, the split key, which SFT model (best/final), an explicit reference's weights.
    dpo.use changes no weight (the manifest records it); "settings" (dpo.train) rides along unhashed."""
    config = {**dataclasses.asdict(recipe.dpo), "train": recipe.dpo.train.fingerprint_fields()}
    del config["use"]
    reference = None
    if recipe.dpo.reference:  # its bytes, not its path: moving it retrains nothing
        weights = Path(recipe.dpo.reference) / WEIGHTS
        reference = sha256_file(weights) if weights.is_file() else f"missing: {weights}"
    extra = {"data": preference_signature(recipe.dpo.data, recipe.seed), "selection_key": recipe.data.selection_key,
             "start_model": start.name, "reference_weights": reference}
    inputs = fingerprint_inputs(config, paths.sft, paths.tokenizer, extra=extra)
    return {**inputs, "settings": fingerprint_inputs(recipe.dpo.train)["config"]}


def preference_evaluation(batches: DPOBatches, max_batches: int) -> Evaluation:
    """DPO's held-out `val_pref_acc` and `val_reward_margin` at every eval step."""
    def evaluate(module, device, amp_dtype) -> dict[str, Any]:
        val = (b for i, b in enumerate(batches.val_batches()) if i < max_batches)
        m = preference_metrics(module, val, device, amp_dtype)
        return {k: None if v is None else f"{v:.4f}" for k, v in m.items()}

    return evaluate


# --------------------------------------------------------------------------------------
# The reference's log-probs, once
# --------------------------------------------------------------------------------------

def pairs_digest(sets: list[list[EncodedPair]], seq_len: int) -> str:
    """A hash of the encoded pairs (ids and labels) and the padded length: what the log-probs are of."""
    h = hashlib.sha256(str(seq_len).encode())
    for pairs in sets:
        h.update(json.dumps([[list(p.chosen.ids), list(p.chosen.labels), list(p.rejected.ids),
                              list(p.rejected.labels)] for p in pairs]).encode())
        h.update(b"|")
    return h.hexdigest()


def reference_identity(ref_dir: Path, digest: str, amp_dtype: Optional[torch.dtype], device: torch.device,
                       batch_size: int) -> dict[str, Any]:
    config = read_json(ref_dir / "config.json") or {}
    return {"dir": str(ref_dir), "weights_sha256": sha256_file(ref_dir / WEIGHTS), "stage": config.get("stage"),
            "fingerprint": config.get("fingerprint"), "precision": precision_name(amp_dtype),
            "device": device.type, "batch_size": batch_size, "pairs_sha256": digest}


def cached_reference(ref_out: Path, identity: dict[str, Any]) -> Optional[dict[str, torch.Tensor]]:
    """The stored log-probs when they were made by this reference for these pairs, else None."""
    manifest = read_manifest(ref_out)
    if manifest is None or manifest.get("identity") != identity or not (ref_out / REFERENCE_FILE).is_file():
        return None
    return load_file(str(ref_out / REFERENCE_FILE))


def compute_reference(ref_dir: Path, tokenizer: Tokenizer, sets: dict[str, list[EncodedPair]], seq_len: int,
                      batch_size: int, device: torch.device, amp_dtype: Optional[torch.dtype],
                      beta: float) -> dict[str, torch.Tensor]:
    """Summed completion log-probs (n, 2) of each set's pairs under the frozen reference, batched and
    padded as training batches are (same forward, same autocast)."""
    model, _, _ = load_model_dir(ref_dir, device=device, expected_tokenizer_hash=tokenizer.hash)
    module = DPOLoss(model, beta)
    out = {}
    for name, pairs in sets.items():
        batches = (pad_pairs(pairs[i:i + batch_size], seq_len, tokenizer.pad_id)
                   for i in range(0, len(pairs), batch_size))
        out[name] = reference_logprobs(module, batches, device, amp_dtype)
    return out


def write_reference(ref_out: Path, identity: dict[str, Any], logprobs: dict[str, torch.Tensor]) -> None:
    with atomic_dir(ref_out) as tmp:
        save_file({k: v.contiguous() for k, v in logprobs.items()}, str(tmp / REFERENCE_FILE))
        atomic_write_json(tmp / "manifest.json", {"stage": "dpo-reference", "identity": identity,
                                                   "pairs": {k: len(v) for k, v in logprobs.items()}})


# --------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------

def kept_model(recipe: Recipe, summary: dict[str, Any]) -> str:
    return BEST if recipe.dpo.use == BEST and (summary.get("best") or {}).get("dir") else FINAL


def record_choice(out: Path, recipe: Recipe) -> None:
    """An up-to-date dpo/ whose recipe now names another dpo.use: the manifest says it, when that model exists."""
    manifest = read_manifest(out) or {}
    want = BEST if recipe.dpo.use == BEST and (out / BEST / WEIGHTS).is_file() else FINAL
    if manifest and manifest.get("use", FINAL) != want:
        atomic_write_json(out / "manifest.json", {**manifest, "use": want})


def drop_counts(read: dict[str, Any], train: dict[str, Any], heldout: dict[str, Any]) -> dict[str, int]:
    """The manifest's top-level counts: pairs read, kept, and dropped by reason."""
    counts = {"pairs": read["rows"], "kept_train": train["kept"], "kept_heldout": heldout["kept"],
              "dropped_too_long": train["dropped_too_long"] + heldout["dropped_too_long"],
              "dropped_prompt_too_long": train["dropped_prompt_too_long"] + heldout["dropped_prompt_too_long"]}
    for reason in ("missing", "identical", "special_token", "prompt_mismatch"):
        counts[f"dropped_{reason}"] = read["dropped"].get(reason, 0)
    return counts


def run_dpo(recipe: Recipe, paths: RunPaths, resume: bool = False, force: bool = False) -> Path:
    """Tune the SFT model on preference pairs with DPO against a frozen reference; returns dpo/
    (with final/, and best/ with dpo.train.keep_best or dpo.use: best, when done)."""
    out = paths.dpo
    tok_manifest = require_manifest(paths.tokenizer, "tokenizer")
    start = start_model_dir(paths)
    ref_dir = reference_model_dir(recipe, start)
    inputs = dpo_inputs(recipe, paths, start)
    fp = inputs_fingerprint(inputs)
    tc = recipe.dpo.train
    ctx = init_distributed(resolve_device(tc.device))
    if prepare_stage_dir(out, fp, force, resume, ctx, "DPO", "DPO config, data or SFT model",
                         "run `llm-maker dpo RECIPE --force` to start DPO over", inputs):
        if ctx.is_main:
            record_choice(out, recipe)
        return out
    if ctx.is_main:
        (out / "manifest.json").unlink(missing_ok=True)  # from here on, dpo/ is not a finished stage

    tokenizer = Tokenizer.load(paths.tokenizer)
    model, _, start_meta = load_model_dir(start, device="cpu", expected_tokenizer_hash=tokenizer.hash)
    template = start_meta.template  # the SFT model's: DPO scores completions in the format it answers in

    triples, read_stats = load_preferences(recipe.dpo.data, recipe.seed)
    train, heldout = split_pairs(triples, recipe.dpo.data.heldout_fraction, recipe.data.selection_key)
    if not train:
        raise DataError(f"no DPO training pairs from dpo.data.source={recipe.dpo.data.source!r} "
                        f"(rows read: {read_stats['rows']}, dropped: {read_stats['dropped']}, "
                        f"heldout_fraction={recipe.dpo.data.heldout_fraction})")
    if ctx.is_main:
        write_jsonl(out / "data" / "train.jsonl", train)
        write_jsonl(out / "data" / "heldout.jsonl", heldout)
    max_len = model.config.seq_len + 1  # x = ids[:-1] must fit the context
    train_enc, train_stats = encode_pairs(tokenizer, train, template, max_len)
    heldout_enc, heldout_stats = encode_pairs(tokenizer, heldout, template, max_len)
    if not train_enc:
        raise DataError(f"none of the {len(train)} DPO training pairs fits model.seq_len={model.config.seq_len} "
                        f"(too long: {train_stats['dropped_too_long']}, prompt alone too long: "
                        f"{train_stats['dropped_prompt_too_long']})")

    device = local_device(resolve_device(tc.device), ctx)
    amp_dtype = resolve_precision(tc.precision, device, "dpo.train.precision")
    seq_len = pair_seq_len(train_enc, heldout_enc)
    identity = reference_identity(ref_dir, pairs_digest([train_enc, heldout_enc], seq_len), amp_dtype, device,
                                  tc.micro_batch_size)
    ref_out = out / REFERENCE
    if ctx.is_main and cached_reference(ref_out, identity) is None:
        write_reference(ref_out, identity, compute_reference(ref_dir, tokenizer, {"train": train_enc,
                                                                                  "heldout": heldout_enc},
                                                             seq_len, tc.micro_batch_size, device, amp_dtype,
                                                             recipe.dpo.beta))
    barrier(ctx)  # every rank reads the one set rank 0 wrote
    ref = cached_reference(ref_out, identity)
    if ref is None:
        raise CheckpointError(f"{ref_out}: the reference log-probs are missing or were made for other pairs")

    if recipe.dpo.use == BEST:  # later stages take best/: keep it, whatever dpo.train.keep_best says
        tc = dataclasses.replace(tc, keep_best=True)
    batches = DPOBatches(train_enc, ref["train"], tc.micro_batch_size, tokenizer.pad_id, seed=tc.seed,
                         val_encoded=heldout_enc, val_ref=ref["heldout"])
    loss_module = DPOLoss(model, recipe.dpo.beta, tc.loss_chunk_size, recipe.dpo.sft_weight)
    meta = ModelMeta(stage="dpo", recipe=recipe.name, fingerprint=fp, trained_with=inputs, chat_template=template,
                     stop_token_ids=stop_token_ids(tokenizer, template), base_model=str(start),
                     extra={"dpo_reference": str(ref_dir), "dpo_beta": recipe.dpo.beta})
    evaluations = [preference_evaluation(batches, tc.eval_batches), *multiple_choice_evaluations(tc, tokenizer)]
    # trainer.run_training, looked up at call time: tests substitute it
    summary = trainer.run_training(model, batches, tc, out_dir=out, tokenizer=tokenizer, meta=meta, resume=resume,
                                   evaluations=evaluations, loss_module=loss_module)
    if summary.get("stopped"):  # paused at a checkpoint: no manifest, so the next run resumes
        raise StageStopped("dpo", summary["steps"], summary["stopped_by"], latest_checkpoint(out / "checkpoints"))
    if not summary.get("final_dir"):
        return out  # not rank 0
    for model_dir in (summary["final_dir"], (summary.get("best") or {}).get("dir")):
        if model_dir:
            atomic_write_json(Path(model_dir) / "tokenizer_config.json",
                              hf_tokenizer_config(template, model.config.seq_len))
    write_manifest(out, "dpo", fp, template=template, summary=summary, tokenizer_hash=tokenizer.hash,
                   use=kept_model(recipe, summary), start_model=str(start), beta=recipe.dpo.beta,
                   reference={k: identity[k] for k in ("dir", "weights_sha256", "stage", "precision")},
                   tokenizer_fingerprint=tok_manifest.get("fingerprint"),
                   **drop_counts(read_stats, train_stats, heldout_stats),
                   data={"read": read_stats, "train": train_stats, "heldout": heldout_stats},
                   batch_seq_len=batches.seq_len)
    return out
