"""Shard files: written as they fill, recorded once complete, read back as one token array.

A split's token stream is cut into shards of at most `shard_tokens` tokens, always between two
documents (a single document longer than a shard gets a shard of its own). A shard is written to
`NAME.tmp`, fsynced, renamed to its final name and only then appended to `progress.json`
together with the number of documents it holds; so after a crash the progress file lists exactly
the complete shards, and packing resumes by skipping that many documents of the split. Files
not in the progress file (a `.tmp`, or a shard renamed just before the crash) are deleted.

A split that fits in one shard is renamed to `{split}.bin` at the end, the single-file layout of
small corpora; larger ones keep `{split}-00000.bin`, `{split}-00001.bin`, ...
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from llm_maker.artifacts import atomic_write_json, require_manifest
from llm_maker.errors import DataError
from llm_maker.layout import SPLITS

PROGRESS = "progress.json"
# document length bins (tokens): 0, then 4 per octave up to 2^28; the last bin is open-ended
LENGTH_EDGES = np.unique(np.concatenate([[0], np.round(2.0 ** (np.arange(0, 4 * 28 + 1) / 4))])).astype(np.int64)


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.bin"


def length_histogram(lengths: np.ndarray) -> np.ndarray:
    """Counts of document lengths per LENGTH_EDGES bin: bin i holds edges[i] <= n < edges[i+1]."""
    idx = np.searchsorted(LENGTH_EDGES, lengths, side="right") - 1
    return np.bincount(idx, minlength=len(LENGTH_EDGES)).astype(np.int64)


class SplitWriter:
    """Append encoded documents of one split; cut shards at document boundaries; record each
    finished shard through `on_shard(entry)` (which persists the progress)."""

    def __init__(self, work: Path, split: str, dtype: np.dtype, shard_tokens: int, first_index: int,
                 on_shard: Any):
        self.work, self.split, self.dtype, self.shard_tokens = Path(work), split, dtype, shard_tokens
        self.index, self.on_shard = first_index, on_shard
        self._file: Optional[Any] = None
        self._reset()

    def _reset(self) -> None:
        self.tokens = self.documents = self.text_bytes = self.max_length = 0
        self.hist = np.zeros(len(LENGTH_EDGES), dtype=np.int64)
        self.sha = hashlib.sha256()

    def _tmp_path(self) -> Path:
        return self.work / (shard_name(self.split, self.index) + ".tmp")

    def add(self, tokens: np.ndarray, lengths: np.ndarray, text_bytes: np.ndarray) -> None:
        """tokens: (sum(lengths),) the batch's ids with EOS after each document; lengths and
        text_bytes: (n_docs,) tokens (EOS included) and UTF-8 bytes of each document."""
        ends = np.cumsum(lengths)  # (n_docs,) end offset of each document in `tokens`
        first = 0
        while first < len(lengths):
            base = int(ends[first - 1]) if first else 0
            room = self.shard_tokens - self.tokens
            fit = int(np.searchsorted(ends[first:] - base, room, side="right"))  # whole documents that fit
            if fit == 0:
                if self.tokens:
                    self._close()
                    continue
                fit = 1  # a document longer than a whole shard: a shard of its own
            stop = first + fit
            self._write(tokens[base:int(ends[stop - 1])], lengths[first:stop], text_bytes[first:stop])
            first = stop
            if first < len(lengths) or self.tokens >= self.shard_tokens:
                self._close()  # the next document does not fit, or the shard is full

    def _write(self, tokens: np.ndarray, lengths: np.ndarray, text_bytes: np.ndarray) -> None:
        if self._file is None:
            self._file = open(self._tmp_path(), "wb")
        data = np.ascontiguousarray(tokens, dtype=self.dtype).tobytes()
        self._file.write(data)
        self.sha.update(data)
        self.tokens += len(tokens)
        self.documents += len(lengths)
        self.text_bytes += int(text_bytes.sum())
        self.max_length = max(self.max_length, int(lengths.max()) - 1)
        self.hist += length_histogram(lengths - 1)  # text tokens, without the EOS

    def _close(self) -> None:
        if self._file is None:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        name = shard_name(self.split, self.index)
        os.replace(self._tmp_path(), self.work / name)
        self.on_shard({"file": name, "tokens": self.tokens, "documents": self.documents,
                       "text_bytes": self.text_bytes, "sha256": self.sha.hexdigest(),
                       "max_doc_tokens": self.max_length, "length_histogram": self.hist.tolist()})
        self.index += 1
        self._reset()

    def finish(self) -> None:
        self._close()

    def abort(self) -> None:
        """Close and delete the unfinished shard (an error or an interrupt mid-shard)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._tmp_path().unlink(missing_ok=True)


# --------------------------------------------------------------------------------------
# The progress file of an unfinished pack
# --------------------------------------------------------------------------------------

def read_progress(work: Path, fingerprint: str, itemsize: int) -> dict[str, Any]:
    """The complete shards of an interrupted pack with this fingerprint (else a fresh start),
    after deleting every file the progress does not list. A listed shard that is missing or of
    the wrong size voids the progress: everything starts over."""
    fresh = {"fingerprint": fingerprint, "splits": {}}
    progress = fresh
    if (work / PROGRESS).is_file():
        try:
            saved = json.loads((work / PROGRESS).read_text(encoding="utf-8"))
            if saved.get("fingerprint") == fingerprint:
                progress = saved
        except ValueError:
            pass
    entries = [e for s in progress["splits"].values() for e in s["shards"]]
    if any(not (work / e["file"]).is_file() or (work / e["file"]).stat().st_size != e["tokens"] * itemsize
           for e in entries):
        progress, entries = fresh, []
    listed = {PROGRESS} | {e["file"] for e in entries}
    for p in (work.iterdir() if work.is_dir() else []):
        if p.name not in listed:
            p.unlink()
    return progress


def write_progress(work: Path, progress: dict[str, Any]) -> None:
    atomic_write_json(work / PROGRESS, progress)


# --------------------------------------------------------------------------------------
# Reading: one memmap, or several behind one array-like
# --------------------------------------------------------------------------------------

class ShardedTokens:
    """The tokens of a split spread over several shard memmaps, indexed like one 1-D array:
    len(), t[i], t[a:b] (a numpy array; a copy only where the slice spans two shards)."""

    def __init__(self, maps: Sequence[np.memmap]):
        self.maps = list(maps)
        self.offsets = np.cumsum([0] + [len(m) for m in self.maps])  # (n_shards + 1,)
        self.dtype = self.maps[0].dtype
        self.ndim = 1

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def _locate(self, i: int) -> tuple[int, int]:
        shard = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return shard, i - int(self.offsets[shard])

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                return self[start:stop][::step]
            if stop <= start:
                return np.empty(0, dtype=self.dtype)
            first, off = self._locate(start)
            last, end = self._locate(stop - 1)
            if first == last:
                return self.maps[first][off:end + 1]
            pieces = [self.maps[first][off:]] + self.maps[first + 1:last] + [self.maps[last][:end + 1]]
            return np.concatenate(pieces)
        i = int(key)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {key} is out of bounds for {len(self)} tokens")
        shard, off = self._locate(i)
        return self.maps[shard][off]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = np.concatenate(self.maps)
        return out.astype(dtype) if dtype is not None else out

    def tolist(self) -> list[int]:
        return np.asarray(self).tolist()


def open_shard(path: Path, dtype: np.dtype, expected_tokens: Optional[int]) -> np.memmap:
    """A read-only memmap of one shard file, checked against the manifest's token count."""
    if not path.is_file():
        raise DataError(f"{path}: missing; rerun the `pack` stage")
    size = path.stat().st_size
    if size % dtype.itemsize:
        raise DataError(f"{path}: {size} bytes is not a multiple of {dtype.itemsize} ({dtype.name}); "
                        "the file is truncated, rerun the `pack` stage")
    if expected_tokens is not None and size // dtype.itemsize != expected_tokens:
        raise DataError(f"{path}: holds {size // dtype.itemsize} tokens but the manifest says {expected_tokens}; "
                        "rerun the `pack` stage")
    if size == 0:
        raise DataError(f"{path}: empty; rerun the `data` and `pack` stages")
    return np.memmap(path, dtype=dtype, mode="r")


def load_split(pack_dir: Path, split: str) -> np.memmap | ShardedTokens:
    """The tokens of one split: (n_tokens,) of the manifest's dtype, read-only. A split of one
    shard is a plain memmap; several shards are a ShardedTokens that indexes like one array."""
    pack_dir = Path(pack_dir)
    manifest = require_manifest(pack_dir, "pack")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    entries = manifest.get("shards", {}).get(split)
    if entries is None:  # a manifest without shard lists: one {split}.bin
        entries = [{"file": f"{split}.bin", "tokens": manifest.get(f"{split}_tokens")}]
    maps = [open_shard(pack_dir / e["file"], dtype, e["tokens"]) for e in entries]
    if not maps:
        raise DataError(f"{pack_dir}: the {split} split has no shards; rerun the `data` and `pack` stages")
    expected = manifest.get(f"{split}_tokens")
    total = sum(len(m) for m in maps)
    if expected is not None and total != expected:
        raise DataError(f"{pack_dir}: the {split} shards hold {total} tokens but the manifest says {expected}; "
                        "rerun the `pack` stage")
    return maps[0] if len(maps) == 1 else ShardedTokens(maps)


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
