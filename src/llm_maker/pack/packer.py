"""The pack stage: encode each split once into a flat binary file of token ids.

    PACK_DIR/
      train.bin      raw little-endian uint16 (or uint32) token ids, EOS after every document
      val.bin
      manifest.json  dtype, vocab_size, eos_id, token and document counts, tokenizer hash, ...

Pretraining reads the .bin files through `load_split` as memory maps, so a corpus larger
than RAM trains at disk speed. Packing streams: at most a few batches of `batch_documents`
documents are in memory at once.
"""
from __future__ import annotations

import itertools
import multiprocessing
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from llm_maker.artifacts import (atomic_dir, is_up_to_date, require_manifest, sha256_file, stage_fingerprint,
                                 write_manifest)
from llm_maker.data.stage import SPLITS, iter_split_batches
from llm_maker.errors import DataError
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


# --- the optional process pool: each worker holds its own tokenizer --------------------------
# Measured on 2 cores (18.7 MB of text): Rust threads alone 8.4 s CPU, a 2-process pool 9.2-10.7 s
# CPU and no faster. A pool only pays where the serial Python part (JSON, list -> array) would
# bottleneck many Rust threads, so it is used for large splits only.
POOL_MIN_BYTES = 64 << 20  # splits smaller than this never start a pool (spawn costs ~1 s)

_worker_tokenizer: Optional[Tokenizer] = None


def _init_worker(tokenizer_file: str) -> None:
    global _worker_tokenizer
    import os
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core instead of Rust threads
    _worker_tokenizer = Tokenizer.load(tokenizer_file)


def _encode_in_worker(texts: list[str], dtype: str) -> np.ndarray:
    assert _worker_tokenizer is not None
    return encode_to_tokens(_worker_tokenizer, texts, np.dtype(dtype))


def _token_batches(tokenizer: Tokenizer, text_batches: Iterator[list[str]], dtype: np.dtype,
                   workers: int, tokenizer_file: Path) -> Iterator[np.ndarray]:
    """encode_to_tokens of each text batch, in input order, in this process or a pool.

    The pool keeps at most 2 batches per worker in flight so memory stays bounded
    (Pool.imap would read the whole split ahead)."""
    if workers <= 1:
        for texts in text_batches:
            yield encode_to_tokens(tokenizer, texts, dtype)
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


@dataclass
class SplitStats:
    documents: int = 0
    tokens: int = 0  # including one EOS per document
    text_bytes: int = 0  # UTF-8 bytes of the documents


def pack_split(tokenizer: Tokenizer, data_dir: Path, split: str, out_file: Path, dtype: np.dtype,
               cfg: PackConfig, tokenizer_file: Path) -> SplitStats:
    """Stream one split's documents through the tokenizer into `out_file`."""
    stats = SplitStats()
    batches = iter_split_batches(data_dir, split, cfg.batch_documents)
    texts = _count_texts(([doc.text for doc in batch] for batch in batches), stats)
    big = (Path(data_dir) / f"{split}.jsonl").stat().st_size >= POOL_MIN_BYTES
    with open(out_file, "wb") as f:
        for tokens in _token_batches(tokenizer, texts, dtype, cfg.workers if big else 1, tokenizer_file):
            f.write(tokens.tobytes())
            stats.tokens += len(tokens)
    return stats


def _count_texts(text_batches: Iterator[list[str]], stats: SplitStats) -> Iterator[list[str]]:
    for texts in text_batches:
        stats.documents += len(texts)
        stats.text_bytes += sum(len(t.encode("utf-8")) for t in texts)
        yield texts


def pack_tokens(cfg: PackConfig, data_dir: Path, tokenizer_dir: Path, out_dir: Path, force: bool = False) -> Path:
    """Write out_dir/{train,val}.bin and manifest.json; skipped when config and inputs are unchanged."""
    data_dir, tokenizer_dir, out_dir = Path(data_dir), Path(tokenizer_dir), Path(out_dir)
    require_manifest(data_dir, "data")
    require_manifest(tokenizer_dir, "tokenizer")
    # workers and batch size change how fast, not what is written: only dtype is fingerprinted
    fp = stage_fingerprint({"dtype": cfg.dtype}, data_dir, tokenizer_dir)
    if not force and is_up_to_date(out_dir, fp):
        return out_dir
    tokenizer = Tokenizer.load(tokenizer_dir)
    vocab_size = id_space_size(tokenizer)
    dtype = choose_dtype(cfg.dtype, vocab_size)
    if cfg.batch_documents < 1:
        raise DataError(f"pack.batch_documents must be at least 1, got {cfg.batch_documents}")
    stats: dict[str, SplitStats] = {}
    with atomic_dir(out_dir) as tmp:
        for split in SPLITS:
            stats[split] = pack_split(tokenizer, data_dir, split, tmp / f"{split}.bin", dtype, cfg,
                                      tokenizer_dir / "tokenizer.json")
        text_tokens = sum(s.tokens - s.documents for s in stats.values())  # EOS carries no text
        write_manifest(
            tmp, "pack", fp,
            dtype=dtype.name,
            vocab_size=vocab_size,
            eos_id=tokenizer.eos_id,
            train_tokens=stats["train"].tokens,
            val_tokens=stats["val"].tokens,
            documents={split: s.documents for split, s in stats.items()},
            text_bytes={split: s.text_bytes for split, s in stats.items()},
            bytes_per_token=round(sum(s.text_bytes for s in stats.values()) / max(text_tokens, 1), 4),
            tokenizer_hash=tokenizer.hash,
            source_sha256={f"{split}.jsonl": sha256_file(data_dir / f"{split}.jsonl") for split in SPLITS},
            config=asdict(cfg),
        )
    return out_dir


def load_split(pack_dir: Path, split: str) -> np.memmap:
    """A read-only memory map of one split's tokens: (n_tokens,) of the manifest's dtype."""
    pack_dir = Path(pack_dir)
    manifest = require_manifest(pack_dir, "pack")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    path = pack_dir / f"{split}.bin"
    if not path.is_file():
        raise DataError(f"{path}: missing; rerun the `pack` stage")
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    size = path.stat().st_size
    if size % dtype.itemsize:
        raise DataError(f"{path}: {size} bytes is not a multiple of {dtype.itemsize} ({dtype.name}); "
                        "the file is truncated, rerun the `pack` stage")
    expected = manifest.get(f"{split}_tokens")
    if expected is not None and size // dtype.itemsize != expected:
        raise DataError(f"{path}: holds {size // dtype.itemsize} tokens but the manifest says {expected}; "
                        "rerun the `pack` stage")
    if size == 0:
        raise DataError(f"{path}: empty; rerun the `data` and `pack` stages")
    return np.memmap(path, dtype=dtype, mode="r")


def unigram_loss(pack_dir: Path, chunk_tokens: int = 1 << 24) -> float:
    """Cross-entropy (nats/token) of val under the add-one-smoothed unigram distribution of train.

    The loss of a model that ignores context: a trained LM's val loss should be well below it."""
    vocab_size = require_manifest(pack_dir, "pack")["vocab_size"]
    train, val = load_split(pack_dir, "train"), load_split(pack_dir, "val")
    counts = np.zeros(vocab_size, dtype=np.int64)
    for start in range(0, len(train), chunk_tokens):
        chunk = np.asarray(train[start:start + chunk_tokens])
        _check_ids(chunk, vocab_size, pack_dir)
        counts += np.bincount(chunk, minlength=vocab_size)
    log_probs = np.log(counts + 1.0) - np.log(counts.sum() + vocab_size)  # (vocab_size,)
    total = 0.0
    for start in range(0, len(val), chunk_tokens):
        chunk = np.asarray(val[start:start + chunk_tokens])
        _check_ids(chunk, vocab_size, pack_dir)
        total -= float(log_probs[chunk].sum())
    return total / len(val)


def _check_ids(tokens: np.ndarray, vocab_size: int, pack_dir: Path) -> None:
    if len(tokens) and int(tokens.max()) >= vocab_size:
        raise DataError(f"{pack_dir}: token id {int(tokens.max())} >= the manifest's vocab_size {vocab_size}")
