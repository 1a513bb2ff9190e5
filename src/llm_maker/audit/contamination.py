"""`llm-maker audit RUN_DIR --eval-sets ...`: how much of each evaluation set the model saw in training.

Training text is what was trained on, as tokens: the packed pretraining split (pack/, every
shard) and, when the run has one, the SFT training set (sft/data/train.jsonl). Evaluation sets:

  multiple-choice jsonl   {"context", "choices", "label"}: the context followed by its gold
                          answer, and each other choice, are the item's text
  chat jsonl              {"messages": [...]}: each message (the run's SFT held-out set
                          sft/data/heldout.jsonl is audited by default)
  cloze jsonl             {"context", "continuation"}: the two joined (lm-eval's loglikelihood rows)
  text jsonl              {"text"}

An item overlaps when any of its token n-grams (13 by default, as GPT-3's audit used words) occurs
in the training tokens; per set the report gives the fraction of items that overlap and the worst
items, with the matched text and where it was found. Memory holds the evaluation n-grams and one
chunk of training tokens (pack/ is memory-mapped), never the corpus.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from llm_maker.artifacts import atomic_write_json, atomic_write_text, iter_jsonl_rows, read_manifest
from llm_maker.audit.ngrams import EvalNgrams
from llm_maker.errors import DataError, LLMMakerError
from llm_maker.layout import RunPaths
from llm_maker.pack.shards import load_split
from llm_maker.tokenizer.tokenizer import Tokenizer

CHUNK_TOKENS = 1 << 22  # training tokens hashed at a time: ~100 MB of temporaries
PREVIEW_CHARS = 160


@dataclass
class EvalItem:
    segments: list[str]  # texts whose n-grams are the item's
    preview: str  # what the report shows of the item


def item_from_row(row: Any, where: str) -> EvalItem:
    """One evaluation item of a multiple-choice, chat or text row."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "choices" in row:
        context, choices, label = row.get("context"), row.get("choices"), row.get("label")
        if not (isinstance(context, str) and isinstance(choices, list) and all(isinstance(c, str) for c in choices)):
            raise DataError(f"{where}: a multiple-choice row needs a string 'context' and a list of string 'choices'")
        if not isinstance(label, int) or not 0 <= label < len(choices):
            raise DataError(f"{where}: 'label' must be an index into the {len(choices)} choices, got {label!r}")
        gold = f"{context} {choices[label]}"
        return EvalItem([gold] + [c for i, c in enumerate(choices) if i != label], gold)
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                     for m in messages):
            raise DataError(f"{where}: 'messages' must be a list of {{'role', 'content'}} objects")
        return EvalItem([m["content"] for m in messages], " | ".join(m["content"] for m in messages))
    if isinstance(row.get("context"), str) and isinstance(row.get("continuation"), str):
        text = row["context"] + row["continuation"]  # the continuation carries its own leading space
        return EvalItem([text], text)
    if isinstance(row.get("text"), str):
        return EvalItem([row["text"]], row["text"])
    raise DataError(f"{where}: expected a multiple-choice row (context, choices, label), a chat row (messages), "
                    f"a cloze row (context, continuation) or a text row (text); fields: {', '.join(sorted(row))}")


def read_eval_set(path: Path) -> list[EvalItem]:
    return [item_from_row(row, where) for where, row in iter_jsonl_rows(path, "evaluation set")]


SOURCE_FILES = {"pretrain": "data/train.jsonl", "sft": "sft/data/train.jsonl"}  # where a match's document is


def sft_tokens(path: Path, tokenizer: Tokenizer) -> np.ndarray:
    """The SFT training set as one token stream: a conversation's messages joined by newlines, as
    the chat template places them, EOS after each conversation (so document i is line i + 1)."""
    ids: list[int] = []
    for _, row in iter_jsonl_rows(path, "SFT training set"):
        ids.extend(tokenizer.encode("\n".join(m["content"] for m in row["messages"])) + [tokenizer.eos_id])
    return np.asarray(ids, dtype=np.int64)


def training_streams(paths: RunPaths, tokenizer: Tokenizer, include_sft: bool) -> Iterator[tuple[str, Any]]:
    """(name, tokens) of what the run trained on: the packed train split, then SFT's training set."""
    manifest = read_manifest(paths.pack)
    if manifest is None:
        raise LLMMakerError(f"{paths.pack}: no manifest.json; run the `pack` stage before the audit")
    if manifest.get("tokenizer_hash") not in (None, tokenizer.hash):
        raise LLMMakerError(f"{paths.pack} was packed with another tokenizer than {paths.tokenizer}; rerun `pack`")
    yield "pretrain", load_split(paths.pack, "train")
    sft_train = paths.sft / "data" / "train.jsonl"
    if include_sft and sft_train.is_file():
        yield "sft", sft_tokens(sft_train, tokenizer)


def scan_stream(index: EvalNgrams, name: str, tokens: Any, eos_id: int, chunk_tokens: int) -> int:
    """Feed one training stream to the index in overlapping chunks; returns its token count."""
    from tqdm import tqdm

    n, total, docs = index.n, len(tokens), 0
    with tqdm(total=total, unit="tok", unit_scale=True, desc=f"audit {name}", disable=not sys.stderr.isatty()) as bar:
        for start in range(0, max(total - n + 1, 0), chunk_tokens):
            chunk = np.asarray(tokens[start:start + chunk_tokens + n - 1])
            index.scan(chunk, name, start, eos_id, docs)
            docs += int(np.count_nonzero(chunk[:chunk_tokens] == eos_id))
            bar.update(min(chunk_tokens, total - start))
    return total


def set_report(name: str, items: list[EvalItem], first: int, total: np.ndarray, matched: np.ndarray,
               index: EvalNgrams, tokenizer: Tokenizer, max_examples: int) -> dict[str, Any]:
    """Per-set figures from the global per-item counts (items first .. first + len(items) - 1)."""
    t, m = total[first:first + len(items)], matched[first:first + len(items)]
    scored = int(np.count_nonzero(t))
    overlapping = np.flatnonzero(m > 0)
    fraction = m / np.maximum(t, 1)
    worst = sorted(overlapping.tolist(), key=lambda i: (-fraction[i], i))[:max_examples]
    entries_of = {}
    for e, match in sorted(index.matches.items()):
        item = int(index.segment_item[index.segments[e]]) - first
        if 0 <= item < len(items):
            entries_of.setdefault(item, (e, match))
    examples = []
    for i in worst:
        e, match = entries_of[i]
        examples.append({
            "item": i, "overlap": round(float(fraction[i]), 4), "matched_ngrams": int(m[i]), "ngrams": int(t[i]),
            "text": items[i].preview[:PREVIEW_CHARS],
            "matched_text": tokenizer.decode(index.entry_tokens(e).tolist()),
            "found_in": {"source": match.source, "token_offset": match.offset, "document": match.document,
                         "file": SOURCE_FILES[match.source], "line": match.document + 1},
        })
    return {"name": name, "items": len(items), "items_scored": scored, "items_too_short": len(items) - scored,
            "items_with_overlap": len(overlapping),
            "fraction_with_overlap": round(len(overlapping) / max(scored, 1), 6),
            "overlapping_items": overlapping.tolist(), "worst": examples}


def audit_run(run_dir: str | Path, eval_sets: list[str | Path], n: int = 13, sft_heldout: bool = True,
              include_sft_train: bool = True, max_examples: int = 5,
              chunk_tokens: int = CHUNK_TOKENS) -> dict[str, Any]:
    """The contamination report of a run against evaluation sets (and its SFT held-out set)."""
    if n < 1:
        raise LLMMakerError(f"--ngram must be at least 1, got {n}")
    if chunk_tokens < 1:
        raise LLMMakerError(f"chunk_tokens must be at least 1, got {chunk_tokens}")
    paths = RunPaths.of(run_dir)
    tokenizer = Tokenizer.load(paths.tokenizer)
    sets = [(Path(p).name, read_eval_set(Path(p))) for p in eval_sets]
    heldout = paths.sft / "data" / "heldout.jsonl"
    if sft_heldout and heldout.is_file():
        sets.append(("sft-heldout", read_eval_set(heldout)))
    if not sets:
        raise LLMMakerError("nothing to audit: pass --eval-sets FILE ... (the run has no sft/data/heldout.jsonl)")
    segments, owner, base = [], [], 0  # every segment's token ids and its item's global number
    for _, items in sets:
        for i, item in enumerate(items):
            for text in item.segments:
                segments.append(np.asarray(tokenizer.encode(text), dtype=np.int64))
                owner.append(base + i)
        base += len(items)
    index = EvalNgrams.build(segments, owner, n)
    training = {name: scan_stream(index, name, tokens, tokenizer.eos_id, chunk_tokens)
                for name, tokens in training_streams(paths, tokenizer, include_sft_train)}
    n_items = sum(len(items) for _, items in sets)
    total, matched = index.item_overlap(n_items)
    starts = np.cumsum([0] + [len(items) for _, items in sets])
    return {"run_dir": str(paths.root), "ngram": n, "unit": "tokens", "training_tokens": training,
            "sets": [set_report(name, items, int(starts[k]), total, matched, index, tokenizer, max_examples)
                     for k, (name, items) in enumerate(sets)]}


def audit_markdown(report: dict[str, Any]) -> str:
    lines = [f"# Contamination audit: {report['ngram']}-token overlap", "",
             "Training tokens: " + ", ".join(f"{k} {v:,}" for k, v in report["training_tokens"].items()), "",
             "| set | items | scored | with overlap | fraction |", "| --- | ---: | ---: | ---: | ---: |"]
    for s in report["sets"]:
        lines.append(f"| {s['name']} | {s['items']} | {s['items_scored']} | {s['items_with_overlap']} | "
                     f"{s['fraction_with_overlap']:.2%} |")
    for s in report["sets"]:
        if s["worst"]:
            lines += ["", f"## {s['name']}: worst items", "", "| item | overlap | matched text | found in |",
                      "| ---: | ---: | --- | --- |"]
            for w in s["worst"]:
                where = f"{w['found_in']['file']} line {w['found_in']['line']}"
                text = w["matched_text"].replace("|", "\\|").replace("\n", " ")
                lines.append(f"| {w['item']} | {w['overlap']:.0%} | {text} | {where} |")
    return "\n".join(lines) + "\n"


def write_audit(report: dict[str, Any], out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    atomic_write_json(out_dir / "contamination.json", report)
    atomic_write_text(out_dir / "contamination.md", audit_markdown(report))
    return out_dir
