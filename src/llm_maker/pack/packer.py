"""The pack stage: encode each split once into shard files of token ids.

    PACK_DIR/
      train.bin          raw little-endian uint16 (or uint32) token ids, EOS after every document
      val.bin            (a split larger than pack.shard_tokens: train-00000.bin, train-00001.bin, ...)
      manifest.json      dtype, vocab_size, eos_id, per-shard token/document counts and SHA-256,
                         bytes per token, document length histogram, tokenizer hash, ...
      data_report.*      the data report (data/report.py): counts, drops and why, length histogram

Pretraining reads the shards through `load_split` as memory maps, so a corpus larger than RAM
trains at disk speed. Packing streams: at most 2 batches of `batch_documents` documents per
worker are in flight, and shards are written as they fill (pack/shards.py), so memory does not
grow with the corpus. An interrupted pack (crash, kill -9, Ctrl-C) keeps its complete shards in
a hidden `.pack.partial` folder beside PACK_DIR and continues after them on the next run.
"""
from __future__ import annotations

import itertools
import multiprocessing
import os
import shutil
from collections import deque
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from llm_maker.artifacts import (
    is_up_to_date,
    read_manifest,
    require_manifest,
    sha256_file,
    stage_fingerprint,
    write_manifest,
)
from llm_maker.data.report import write_data_report
from llm_maker.data.stage import iter_split
from llm_maker.errors import DataError
from llm_maker.layout import SPLITS
from llm_maker.pack.shards import (
    LENGTH_EDGES,
    PROGRESS,
    SplitWriter,
    read_progress,
    write_progress,
)
from llm_maker.recipe import PackConfig
from llm_maker.tokenizer.tokenizer import Tokenizer

UINT16_VOCAB_LIMIT = 1 << 16  # ids 0..65535 fit in uint16
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


def choose_dtype(requested: str, vocab_size: int) -> np.dtype:
    """The on-disk token dtype for `pack.dtype` (auto | uint16 | uint32) and a vocabulary size."""
    if requested == "auto":
        return DTYPES["uint16"] if vocab_size <= UINT16_VOCAB_LIMIT else DTYPES["uint32"]
    if requested not in DTYPES:
        raise DataError(f"pack.dtype must be auto, uint16 or uint32, got {requested!r}")
    if requested == "uint16" and vocab_size > UINT16_VOCAB_LIMIT:
        raise DataError(
            f"pack.dtype is uint16 but the tokenizer's vocab_size is {vocab_size} (> {UINT16_VOCAB_LIMIT}); "
            "use uint32 or auto"
        )
    return DTYPES[requested]


def id_space_size(tokenizer: Tokenizer) -> int:
    """1 + the largest token id (a pretrained vocabulary may have gaps above get_vocab_size)."""
    ids = tokenizer.hf.get_vocab(with_added_tokens=True).values()
    return max(tokenizer.vocab_size, max(ids) + 1)


def documents_to_tokens(ids_per_doc: list[list[int]], eos_id: int, dtype: np.dtype) -> np.ndarray:
    """Concatenate documents' ids, EOS after each: (sum(len + 1),) array of `dtype`."""
    total = sum(len(ids) + 1 for ids in ids_per_doc)
    flat = np.fromiter(itertools.chain.from_iterable(ids + [eos_id] for ids in ids_per_doc),
                       dtype=np.int64, count=total)
    if total and flat.max() > np.iinfo(dtype).max:  # guard: never wrap an id silently
        raise DataError(f"token id {int(flat.max())} does not fit pack dtype {dtype.name}")
    return flat.astype(dtype)


def encode_to_tokens(tokenizer: Tokenizer, texts: list[str], dtype: np.dtype) -> np.ndarray:
    """One batch of documents -> their ids with EOS after each (Rust encodes on all cores)."""
    return documents_to_tokens(tokenizer.encode_batch(texts), tokenizer.eos_id, dtype)


def encode_batch(tokenizer: Tokenizer, texts: list[str], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, lengths, text_bytes) of a batch: ids with EOS after each document, then per
    document its token count (EOS included) and its UTF-8 bytes."""
    ids = tokenizer.encode_batch(texts)
    lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    text_bytes = np.fromiter((len(t.encode("utf-8")) for t in texts), dtype=np.int64, count=len(texts))
    return documents_to_tokens(ids, tokenizer.eos_id, dtype), lengths, text_bytes


# --- the optional process pool: each worker holds its own tokenizer --------------------------
# Measured on 2 cores (18.7 MB of text): Rust threads alone 8.4 s CPU, a 2-process pool 9.2-10.7 s
# CPU and no faster. A pool only pays where the serial Python part (JSON, list -> array) would
# bottleneck many Rust threads, so it is used for large splits only (see bench/pack_throughput.py).
POOL_MIN_BYTES = 64 << 20  # splits smaller than this never start a pool (spawn costs ~1 s)

_worker_tokenizer: Optional[Tokenizer] = None


def _init_worker(tokenizer_file: str) -> None:
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core instead of Rust threads
    _worker_tokenizer = Tokenizer.load(tokenizer_file).as_plain_text()


def _encode_in_worker(texts: list[str], dtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    assert _worker_tokenizer is not None
    return encode_batch(_worker_tokenizer, texts, np.dtype(dtype))


def encoded_batches(tokenizer: Tokenizer, text_batches: Iterator[list[str]], dtype: np.dtype,
                    workers: int, tokenizer_file: Path) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """encode_batch of each text batch, in input order, in this process or a pool of `workers`.

    The pool keeps at most 2 batches per worker in flight so memory stays bounded
    (Pool.imap would read the whole split ahead)."""
    if workers <= 1:
        for texts in text_batches:
            yield encode_batch(tokenizer, texts, dtype)
        return
    # spawn, not fork: a forked child of a process that already ran Rust threads disables them
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(str(tokenizer_file),)) as pool:
        pending: deque = deque()
        for texts in text_batches:
            pending.append(pool.apply_async(_encode_in_worker, (texts, dtype.str)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _text_batches(data_dir: Path, split: str, skip: int, batch_documents: int) -> Iterator[list[str]]:
    """The split's texts after its first `skip` documents (already packed), in lists."""
    docs = itertools.islice(iter_split(data_dir, split), skip, None)
    while batch := [doc.text for doc in itertools.islice(docs, batch_documents)]:
        yield batch


def pack_split(tokenizer: Tokenizer, data_dir: Path, split: str, work: Path, dtype: np.dtype, cfg: PackConfig,
               tokenizer_file: Path, progress: dict[str, Any]) -> None:
    """Encode one split into shards in `work`, continuing after the shards `progress` lists."""
    state = progress["splits"].setdefault(split, {"shards": [], "done": False})
    if state["done"]:
        return

    def on_shard(entry: dict[str, Any]) -> None:
        state["shards"].append(entry)
        write_progress(work, progress)

    done_docs = sum(e["documents"] for e in state["shards"])
    writer = SplitWriter(work, split, dtype, cfg.shard_tokens, len(state["shards"]), on_shard)
    big = (Path(data_dir) / f"{split}.jsonl").stat().st_size >= POOL_MIN_BYTES
    texts = _text_batches(data_dir, split, done_docs, cfg.batch_documents)
    try:
        for tokens, lengths, text_bytes in encoded_batches(tokenizer, texts, dtype, cfg.workers if big else 1,
                                                           tokenizer_file):
            writer.add(tokens, lengths, text_bytes)
        writer.finish()
    except BaseException:
        writer.abort()  # the unfinished shard goes; the complete ones stay for the next run
        raise
    state["done"] = True
    write_progress(work, progress)


def split_summary(shards: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals of one split's shard entries."""
    return {"tokens": sum(e["tokens"] for e in shards), "documents": sum(e["documents"] for e in shards),
            "text_bytes": sum(e["text_bytes"] for e in shards),
            "max_doc_tokens": max((e["max_doc_tokens"] for e in shards), default=0),
            "length_histogram": np.sum([e["length_histogram"] for e in shards] or [np.zeros(len(LENGTH_EDGES), int)],
                                       axis=0).tolist()}


def _finalize_names(work: Path, progress: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """A split of one shard becomes `{split}.bin` (the single-file layout); returns the shard lists."""
    shards = {}
    for split in SPLITS:
        entries = progress["splits"][split]["shards"]
        if len(entries) == 1 and entries[0]["file"] != f"{split}.bin":
            (work / entries[0]["file"]).replace(work / f"{split}.bin")
            entries[0]["file"] = f"{split}.bin"
        shards[split] = entries
    return shards


def partial_dir(out_dir: Path) -> Path:
    return out_dir.with_name(f".{out_dir.name}.partial")


def pack_tokens(cfg: PackConfig, data_dir: Path, tokenizer_dir: Path, out_dir: Path, force: bool = False) -> Path:
    """Write out_dir/{train,val}*.bin and manifest.json; skipped when config and inputs are
    unchanged; an interrupted run of the same config continues after its complete shards."""
    data_dir, tokenizer_dir, out_dir = Path(data_dir), Path(tokenizer_dir), Path(out_dir)
    require_manifest(data_dir, "data")
    require_manifest(tokenizer_dir, "tokenizer")
    # workers and batch size change how fast, not what is written: they are not fingerprinted
    fp = stage_fingerprint({"dtype": cfg.dtype, "shard_tokens": cfg.shard_tokens, "special_tokens_in_text": "as text"},
                           data_dir, tokenizer_dir)
    if not force and is_up_to_date(out_dir, fp):
        return out_dir
    tokenizer = Tokenizer.load(tokenizer_dir).as_plain_text()  # only EOS between documents is special
    vocab_size = id_space_size(tokenizer)
    dtype = choose_dtype(cfg.dtype, vocab_size)
    if cfg.batch_documents < 1:
        raise DataError(f"pack.batch_documents must be at least 1, got {cfg.batch_documents}")
    if cfg.shard_tokens < 1:
        raise DataError(f"pack.shard_tokens must be at least 1, got {cfg.shard_tokens}")
    work = partial_dir(out_dir)
    if force:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    progress = read_progress(work, fp, dtype.itemsize)
    for split in SPLITS:
        pack_split(tokenizer, data_dir, split, work, dtype, cfg, tokenizer_dir / "tokenizer.json", progress)
    shards = _finalize_names(work, progress)
    write_progress(work, progress)  # the final names, in case we stop before the swap below
    totals = {split: split_summary(entries) for split, entries in shards.items()}
    text_tokens = sum(t["tokens"] - t["documents"] for t in totals.values())  # EOS carries no text
    fields = dict(
        dtype=dtype.name, vocab_size=vocab_size, eos_id=tokenizer.eos_id,
        train_tokens=totals["train"]["tokens"], val_tokens=totals["val"]["tokens"],
        documents={split: t["documents"] for split, t in totals.items()},
        text_bytes={split: t["text_bytes"] for split, t in totals.items()},
        bytes_per_token=round(sum(t["text_bytes"] for t in totals.values()) / max(text_tokens, 1), 4),
        shard_tokens=cfg.shard_tokens,
        shards={split: [{k: e[k] for k in ("file", "tokens", "documents", "sha256")} for e in entries]
                for split, entries in shards.items()},
        doc_length={"edges": LENGTH_EDGES.tolist(),
                    **{split: {"max": t["max_doc_tokens"], "histogram": t["length_histogram"]}
                       for split, t in totals.items()}},
        tokenizer_hash=tokenizer.hash,
        source_sha256={f"{split}.jsonl": sha256_file(data_dir / f"{split}.jsonl") for split in SPLITS},
        config=asdict(cfg),
    )
    _write_data_report(data_dir, work, fields)
    write_manifest(work, "pack", fp, **fields)
    (work / PROGRESS).unlink()
    if out_dir.exists():
        shutil.rmtree(out_dir)
    work.replace(out_dir)
    return out_dir


def _write_data_report(data_dir: Path, work: Path, pack_fields: dict[str, Any]) -> None:
    write_data_report(read_manifest(data_dir) or {}, pack_fields, work)
