"""Native multiple-choice eval: HellaSwag / ARC / PIQA / SciQ-style items scored by the
log-likelihood of each choice, exactly as lm-evaluation-harness scores them, without it.

Items are jsonl, one per line: {"context": "...", "choices": ["...", ...], "label": 0}.
Each choice is the continuation " " + choice of the context (lm-eval's target delimiter).
  acc       the choice with the highest summed log-likelihood is the label
  acc_norm  the same after dividing by the choice's length in characters (lm-eval's acc_norm:
            longer answers are not penalised for having more tokens)

Tokenisation follows lm-eval's HF backend, so counts match it on the same model: trailing
spaces of the context move to the continuation, the continuation's ids are those of
encode(context + continuation) after encode(context), an empty context is replaced by one
prefix token (<|endoftext|>), and inputs longer than the context window keep their last
`seq_len + 1` tokens. Fast enough to run every eval step of pretraining (`training_hook`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from llm_maker.artifacts import iter_jsonl_rows
from llm_maker.errors import DataError
from llm_maker.model.llama import LlamaModel
from llm_maker.tokenizer.tokenizer import Tokenizer

TARGET_DELIMITER = " "  # lm-eval's default between the context and a choice


@dataclass(frozen=True)
class MCItem:
    context: str
    choices: tuple[str, ...]
    label: int


def parse_mc_item(row: object, where: str) -> MCItem:
    """One jsonl row -> MCItem; DataError naming `where` (file:line) and the bad field."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with context, choices, label; got {type(row).__name__}")
    context, choices, label = row.get("context"), row.get("choices"), row.get("label")
    if not isinstance(context, str):
        raise DataError(f"{where}: `context` must be a string, got {context!r:.60}")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise DataError(f"{where}: `choices` must be a list of at least 2 non-empty strings, got {choices!r:.80}")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
        raise DataError(f"{where}: `label` must be an index into the {len(choices)} choices, got {label!r}")
    return MCItem(context, tuple(choices), label)


def load_mc_items(path: str | Path) -> list[MCItem]:
    items = [parse_mc_item(row, where) for where, row in iter_jsonl_rows(path, "multiple-choice file")]
    if not items:
        raise DataError(f"{path}: no multiple-choice items")
    return items


# --------------------------------------------------------------------------------------
# Requests and log-likelihoods (lm-eval's HF backend conventions)
# --------------------------------------------------------------------------------------

def encode_request(tokenizer: Tokenizer, context: str, continuation: str,
                   prefix_id: int) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval's HFLM encodes a loglikelihood request."""
    if context == "":
        cont = tokenizer.encode(continuation)
        return ([prefix_id], cont) if cont[0] != prefix_id else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:  # "word boundary" spaces belong to the continuation
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return ctx, whole[len(ctx):]


@torch.inference_mode()
def loglikelihoods(model: LlamaModel, requests: list[tuple[list[int], list[int]]], batch_size: int = 16,
                   device: Optional[torch.device | str] = None) -> list[float]:
    """Summed log-probability of each continuation given its context, in request order.

    Inputs are (context + continuation)[-(T+1):][:-1] with T the context window, right-padded
    into batches of similar length (longest first, as lm-eval orders them)."""
    device = device or next(model.parameters()).device
    max_length = model.config.seq_len
    rows = []
    for i, (ctx, cont) in enumerate(requests):
        if not cont:
            raise DataError(f"request {i}: the continuation encodes to no tokens")
        inp = (ctx + cont)[-(max_length + 1):][:-1]
        rows.append((i, inp, cont))
    rows.sort(key=lambda r: (-len(r[1] + r[2]), r[0]))
    out = [0.0] * len(requests)
    was_training = model.training
    model.eval()
    try:
        for first in range(0, len(rows), batch_size):
            chunk = rows[first:first + batch_size]
            width = max(len(inp) for _, inp, _ in chunk)
            batch = torch.zeros((len(chunk), width), dtype=torch.long)  # (B, T), right-padded
            for b, (_, inp, _) in enumerate(chunk):
                batch[b, :len(inp)] = torch.tensor(inp)
            logprobs = F.log_softmax(model(batch.to(device)).float(), dim=-1)  # (B, T, V)
            for b, (i, inp, cont) in enumerate(chunk):
                n = len(cont)
                picked = logprobs[b, len(inp) - n:len(inp)]  # (n, V): the positions predicting cont
                out[i] = float(picked.gather(1, torch.tensor(cont, device=picked.device)[:, None]).sum())
    finally:
        model.train(was_training)
    return out


def choose(lls: list[float], choices: tuple[str, ...]) -> tuple[int, int]:
    """(argmax of the log-likelihoods, argmax after dividing by each choice's character length);
    np.argmax takes the first of tied maxima, as lm-eval does."""
    lls_arr = np.array(lls)
    return int(np.argmax(lls_arr)), int(np.argmax(lls_arr / np.array([float(len(c)) for c in choices])))


def score_items(model: LlamaModel, tokenizer: Tokenizer, items: list[MCItem], batch_size: int = 16,
                device: Optional[torch.device | str] = None) -> dict:
    """{"n", "correct", "correct_norm", "acc", "acc_norm", "predictions": [(pred, pred_norm)]}."""
    requests, spans = [], []
    for item in items:
        start = len(requests)
        requests += [encode_request(tokenizer, item.context, TARGET_DELIMITER + c, tokenizer.eos_id)
                     for c in item.choices]
        spans.append((start, len(requests)))
    lls = loglikelihoods(model, requests, batch_size, device)
    predictions = [choose(lls[a:b], item.choices) for item, (a, b) in zip(items, spans, strict=False)]
    correct = sum(p == item.label for (p, _), item in zip(predictions, items, strict=False))
    correct_norm = sum(p == item.label for (_, p), item in zip(predictions, items, strict=False))
    n = len(items)
    return {"n": n, "correct": correct, "correct_norm": correct_norm, "acc": correct / n if n else None,
            "acc_norm": correct_norm / n if n else None, "predictions": predictions}


def training_hook(path: Optional[str], tokenizer: Tokenizer, max_items: Optional[int] = None,
                  batch_size: int = 16) -> Optional[Callable[[LlamaModel], dict[str, float]]]:
    """For the training loop: a function model -> {"mc_acc", "mc_acc_norm"} over the first
    `max_items` items of `path`, or None when no file is configured. Items load once, here."""
    if path is None:
        return None
    items = load_mc_items(path)[:max_items]

    def hook(model: LlamaModel) -> dict[str, float]:
        r = score_items(model, tokenizer, items, batch_size)
        return {"mc_acc": round(r["acc"], 6), "mc_acc_norm": round(r["acc_norm"], 6)}

    return hook
