"""The eval stage: pack/ + the base model (+ the SFT model, + the DPO model) -> eval/{report.json, report.md}.

The models are those later stages take (layout.RunPaths.model): pretrain/final and sft/best by
default (the recipe's sft.start_from and sft.use). The base is the recipe's base stage's model
(distill/'s when distillation is enabled); dpo/'s model, when there is one, is scored beside SFT's.

What it measures, and why:
  validation        val loss / perplexity of each model on the packed val split, beside the
                    unigram baseline (a model that learned nothing but token frequencies)
  stop_table        the same chat prompts answered greedily by the base, SFT (and DPO) models:
                    the text, whether it stopped on the template's stop token and after how
                    many tokens (the LLM Maker design doc: SFT teaches a model to answer *and stop*)
  exact_match       greedy answer == reference on held-out SFT conversations
  base_completions  plain-text continuations of the recipe prompts: what pretraining learned
  models            parameter count and tokens seen
All generation is greedy except one seeded sample per base completion, so a rerun repeats it.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from llm_maker.artifacts import is_up_to_date, read_manifest, require_manifest, stage_fingerprint, write_manifest
from llm_maker.devices import inference_dtype, precision_name, resolve_device
from llm_maker.errors import CheckpointError, DataError, LLMMakerError
from llm_maker.eval.report import REPORT_JSON, write_report
from llm_maker.layout import FINAL, RunPaths
from llm_maker.model.llama import LlamaModel
from llm_maker.pack.shards import load_split, unigram_loss
from llm_maker.recipe import Recipe
from llm_maker.serve.generate import REPLACEMENT_CHAR, answer_ids, complete, complete_ids, generate
from llm_maker.sft.dataset import load_conversations
from llm_maker.sft.templates import end_token, prompt_ids, stop_token_ids
from llm_maker.tokenizer.tokenizer import Tokenizer
from llm_maker.train.checkpoint import WEIGHTS, ModelMeta, load_model_dir
from llm_maker.train.evaluation import mean_loss
from llm_maker.train.loss import CausalLMLoss

MODEL_NAMES = ("base", "sft", "dpo")  # report.json's models; dpo only when dpo/ holds a model
HELDOUT_IN_STOP_TABLE = 3  # held-out prompts added to the recipe's in the stop table
EXAMPLES_IN_REPORT = 5  # exact-match items shown with their answers
SAMPLE_TEMPERATURE, SAMPLE_TOP_K = 0.8, 40  # the sampled base completion


# --------------------------------------------------------------------------------------
# Measurements: pure functions of models, tokenizer and data
# --------------------------------------------------------------------------------------

def validation_blocks(n_tokens: int, seq_len: int, batch_size: int, max_batches: int) -> tuple[int, int]:
    """(block length, number of blocks) scored by `validation_loss` on a split of n_tokens."""
    if n_tokens < 2:
        raise DataError(f"the validation split holds {n_tokens} tokens; need at least 2 to score a model")
    seq_len = min(seq_len, n_tokens - 1)  # a split shorter than one block is one shorter block
    return seq_len, min((n_tokens - 1) // seq_len, batch_size * max_batches)


def validation_loss(model: LlamaModel, tokens: np.ndarray, seq_len: int, batch_size: int, max_batches: int,
                    device: torch.device | str) -> float:
    """Mean next-token loss over the first `batch_size * max_batches` non-overlapping blocks of
    `tokens` (block i predicts tokens[i*T+1 : i*T+T+1] from tokens[i*T : i*T+T]), by the
    training loop's own definition (train/evaluation.py).

    Deterministic: always the same blocks, in order."""
    seq_len, n_blocks = validation_blocks(len(tokens), seq_len, batch_size, max_batches)

    def batches():
        for first in range(0, n_blocks, batch_size):
            rows = range(first, min(first + batch_size, n_blocks))
            block = np.stack([np.asarray(tokens[r * seq_len:r * seq_len + seq_len + 1]) for r in rows])  # (B, T+1)
            block = torch.from_numpy(block.astype(np.int64))
            yield block[:, :-1], block[:, 1:]

    return mean_loss(CausalLMLoss(model), batches(), device)


def perplexity(loss: Optional[float]) -> Optional[float]:
    if loss is None:
        return None
    return math.exp(loss) if loss < 700 else float("inf")  # exp overflows a double past ~709


def stop_table(models: dict[str, Optional[LlamaModel]], tokenizer: Tokenizer, chats: list[tuple[str, list[dict]]],
               template: str, max_new_tokens: int, device: torch.device | str) -> dict[str, Any]:
    """Answer each (source, messages) chat greedily with every model; a model that is None
    gets None cells. `stopped` means the answer ended with the template's end-of-turn token (the
    exported tokenizer's eos_token: <|im_end|> for chatml); generation also halts on
    <|endoftext|>, which a base model emits when it thinks a *document* ended -- that is
    counted apart as `ended_document`, not as having learned to stop its answer."""
    stop_ids = stop_token_ids(tokenizer, template)
    turn_end = tokenizer.token_id(end_token(template))
    rows = []
    for source, messages in chats:
        ids = prompt_ids(tokenizer, messages, template)
        row: dict[str, Any] = {"prompt": messages[-1]["content"], "source": source}
        for name, model in models.items():
            if model is None:
                row[name] = None
                continue
            gen = generate(model, ids, max_new_tokens, stop_ids=stop_ids, device=device)
            new_ids = list(gen)
            answer = answer_ids(gen)
            halted_on = new_ids[-1] if gen.stopped else None
            row[name] = {"text": tokenizer.decode(answer), "n_tokens": len(answer),
                         "stopped": halted_on == turn_end,
                         "ended_document": halted_on is not None and halted_on != turn_end}
        rows.append(row)

    def share(name: str, key: str) -> Optional[float]:
        return sum(r[name][key] for r in rows) / len(rows) if models[name] is not None and rows else None

    return {"template": template, "max_new_tokens": max_new_tokens, "rows": rows,
            "stop_token": end_token(template),
            "stop_fraction": {name: share(name, "stopped") for name in models},
            "ended_document_fraction": {name: share(name, "ended_document") for name in models}}


def can_still_match(answer: str, reference: str) -> bool:
    """Whether a growing greedy answer may still equal `reference` once stripped (a trailing
    U+FFFD is a character still arriving)."""
    a = answer.lstrip().rstrip(REPLACEMENT_CHAR)
    return reference.startswith(a) or (a.startswith(reference) and not a[len(reference):].strip())


def answer_budget(tokenizer: Tokenizer, reference: str, max_new_tokens: int) -> int:
    """New tokens an exact-match answer may use: at most twice the reference's (+8), so an
    untrained model's run of blank lines (which can still match) does not take the full budget."""
    return min(max_new_tokens, 2 * len(tokenizer.encode(reference)) + 8)


def greedy_matches(model: LlamaModel, tokenizer: Tokenizer, ids: list[int], reference: str, budget: int,
                   stop_ids: list[int], device: torch.device | str) -> bool:
    """Exact match without generating past the first certain mismatch: greedy decoding is
    deterministic, so stopping early cannot change the verdict, and a wrong answer costs a
    token or two instead of the whole budget."""
    gen = generate(model, ids, budget, stop_ids=stop_ids, device=device)
    for _ in gen:
        if not can_still_match(tokenizer.decode(answer_ids(gen)), reference):
            return False
    return tokenizer.decode(answer_ids(gen)).strip() == reference


def exact_match(models: dict[str, Optional[LlamaModel]], tokenizer: Tokenizer, items: list[list[dict]],
                template: str, max_new_tokens: int, device: torch.device | str) -> dict[str, Any]:
    """Share of held-out items whose greedy answer, stripped, equals the reference, stripped.
    The first EXAMPLES_IN_REPORT items are answered in full, to be shown in the report."""
    stop_ids = stop_token_ids(tokenizer, template)
    correct = {name: 0 for name, m in models.items() if m is not None}
    examples = []
    for i, messages in enumerate(items):
        reference = messages[-1]["content"].strip()
        ids = prompt_ids(tokenizer, messages[:-1], template)
        budget = answer_budget(tokenizer, reference, max_new_tokens)
        example: dict[str, Any] = {"prompt": messages[-2]["content"], "reference": reference}
        for name, model in models.items():
            if model is None:
                example[name] = None
            elif i < EXAMPLES_IN_REPORT:
                example[name] = complete_ids(model, tokenizer, ids, max_new_tokens=budget, stop_ids=stop_ids,
                                             device=device)["text"].strip()
                correct[name] += example[name] == reference
            else:
                correct[name] += greedy_matches(model, tokenizer, ids, reference, budget, stop_ids, device)
        if i < EXAMPLES_IN_REPORT:
            examples.append(example)
    accuracy = {name: (correct[name] / len(items) if name in correct and items else None) for name in models}
    return {"n_items": len(items), "correct": correct, "accuracy": accuracy, "examples": examples}


def base_completions(model: LlamaModel, tokenizer: Tokenizer, prompts: list[str], max_new_tokens: int, seed: int,
                     device: torch.device | str) -> list[dict[str, str]]:
    """A greedy and a seeded sampled continuation of each prompt, stopping at a document end.
    Each prompt gets its own seed (seed + index): with one seed, a weak model that barely reads
    the prompt draws the same tokens for every prompt."""
    out = []
    for i, prompt in enumerate(prompts):
        kw = dict(max_new_tokens=max_new_tokens, stop_ids=[tokenizer.eos_id], device=device)
        greedy = complete(model, tokenizer, prompt, **kw)["text"]
        sampled = complete(model, tokenizer, prompt, temperature=SAMPLE_TEMPERATURE, top_k=SAMPLE_TOP_K,
                           seed=seed + i, **kw)["text"]
        out.append({"prompt": prompt, "greedy": greedy, "sampled": sampled})
    return out


# --------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------

def read_heldout(path: Path) -> list[list[dict]]:
    """The SFT stage's held-out conversations that end with an assistant answer (the
    reference); [] when the file does not exist."""
    if not path.is_file():
        return []
    convs = load_conversations(path, allow_empty=True)
    return [c["messages"] for c in convs if len(c["messages"]) >= 2 and c["messages"][-1]["role"] == "assistant"]


def model_info(model_dir: Path, model: LlamaModel, meta: ModelMeta) -> dict[str, Any]:
    """Parameters and tokens seen, from the model dir's config.json or else its stage manifest."""
    summary = (read_manifest(model_dir.parent) or {}).get("summary") or {}
    return {"dir": str(model_dir), "stage": meta.stage, "parameters": model.num_parameters(),
            "tokens_seen": meta.tokens_seen if meta.tokens_seen is not None else summary.get("tokens_seen"),
            "steps": meta.steps if meta.steps is not None else summary.get("steps")}


def has_model(model_dir: Path) -> bool:
    return (model_dir / WEIGHTS).is_file()


# --------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------

def later_stages(recipe: Recipe, paths: RunPaths) -> list[str]:
    """The distill and dpo stages eval depends on: distill when it is the base, dpo when the
    recipe enables it or dpo/ holds a model (which eval then scores)."""
    return [stage for stage, used in (("distill", recipe.base_stage == "distill"),
                                      ("dpo", recipe.dpo.enabled or has_model(paths.model("dpo")))) if used]


def eval_fingerprint(recipe: Recipe, paths: RunPaths) -> str:
    """The eval config, the upstream stages and which of their models it scores (sft.use changes
    no SFT weight, so it is not in the SFT fingerprint; final/ for all stays out, and so do the
    distill and dpo stages of a run that has neither: its fingerprint is the one it had before)."""
    later = later_stages(recipe, paths)
    kept = {stage: paths.model(stage).name for stage in ("pretrain", "sft", *later)}
    return stage_fingerprint(recipe.eval, paths.pack, paths.pretrain, paths.sft,
                             *(paths.stage_dir(stage) for stage in later),
                             extra=None if set(kept.values()) == {FINAL} else {"models": kept})


def run_eval(recipe: Recipe, paths: RunPaths, force: bool = False) -> Path:
    """Evaluate the run's base (and SFT, and DPO) model; returns eval/ holding report.json and report.md."""
    out = paths.eval
    fp = eval_fingerprint(recipe, paths)
    if not force and is_up_to_date(out, fp) and (out / REPORT_JSON).is_file():
        return out
    t0 = time.perf_counter()
    pack_manifest = require_manifest(paths.pack, "pack")
    base_stage = recipe.base_stage
    base_dir, sft_dir, dpo_dir = paths.model(base_stage), paths.model("sft"), paths.model("dpo")
    if not has_model(base_dir):
        raise LLMMakerError(f"{base_dir}: no finished base model; run the `{base_stage}` stage first")
    device = resolve_device(recipe.train.device)
    dtype = inference_dtype(recipe.eval.precision, device, "eval.precision")
    base, tokenizer, base_meta = load_model_dir(base_dir, device, dtype=dtype)
    if pack_manifest.get("tokenizer_hash") not in (None, tokenizer.hash):
        raise CheckpointError(f"{paths.pack}: packed with tokenizer {pack_manifest['tokenizer_hash']}, but "
                              f"{base_dir} was trained with {tokenizer.hash}; rerun the pack and pretrain stages")
    sft, sft_meta = None, None
    if has_model(sft_dir):
        sft, _, sft_meta = load_model_dir(sft_dir, device, expected_tokenizer_hash=tokenizer.hash, dtype=dtype)
    models = {"base": base, "sft": sft}
    dirs = {"base": base_dir, "sft": sft_dir}
    metas = {"base": base_meta, "sft": sft_meta}
    if has_model(dpo_dir):  # a key only when there is a DPO model: a run without one reports as before
        models["dpo"], _, metas["dpo"] = load_model_dir(dpo_dir, device, expected_tokenizer_hash=tokenizer.hash,
                                                        dtype=dtype)
        dirs["dpo"] = dpo_dir
    chat_meta = sft_meta or metas.get("dpo")
    template = (chat_meta.chat_template if chat_meta else None) or recipe.sft.template
    ec = recipe.eval

    val_tokens = load_split(paths.pack, "val")
    batch_size = recipe.train.micro_batch_size
    losses = {name: (validation_loss(m, val_tokens, m.config.seq_len, batch_size, ec.val_batches, device)
                     if m is not None else None) for name, m in models.items()}
    unigram = unigram_loss(paths.pack)
    block_len, n_blocks = validation_blocks(len(val_tokens), base.config.seq_len, batch_size, ec.val_batches)

    heldout = read_heldout(paths.sft / "data" / "heldout.jsonl")
    chats = ([("recipe", [{"role": "user", "content": p}]) for p in ec.prompts]
             + [("heldout", m[:-1]) for m in heldout[:HELDOUT_IN_STOP_TABLE]])

    report = {
        "run": recipe.name,
        "device": str(device),
        "precision": precision_name(dtype),
        "template": template,
        "models": {name: model_info(dirs[name], m, metas[name]) if m is not None else None
                   for name, m in models.items()},
        "validation": {"tokens_scored": block_len * n_blocks, "unigram_loss": unigram,
                       "unigram_perplexity": perplexity(unigram),
                       **{name: (None if loss is None else {"loss": loss, "perplexity": perplexity(loss)})
                          for name, loss in losses.items()}},
        "stop_table": stop_table(models, tokenizer, chats, template, ec.max_new_tokens, device),
        "exact_match": exact_match(models, tokenizer, heldout[:ec.max_heldout], template, ec.max_new_tokens, device),
        "base_completions": base_completions(base, tokenizer, ec.prompts, ec.max_new_tokens, recipe.seed, device),
    }
    report["eval_seconds"] = round(time.perf_counter() - t0, 2)
    write_report(out, report)
    write_manifest(out, "eval", fp, report=REPORT_JSON, tokenizer_hash=tokenizer.hash,
                   models={name: info["dir"] if info else None for name, info in report["models"].items()})
    return out
