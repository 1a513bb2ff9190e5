"""Token n-grams found in a training stream, by hashing: the pure part of the contamination audit.

The evaluation side is small (thousands of items), the training side is huge (billions of
tokens), so only the evaluation n-grams are held in memory: a sorted array of 64-bit hashes
with, for each, the item and position it came from. The training tokens stream past in chunks;
every chunk's n-gram hashes (a rolling polynomial over uint64, vectorised with numpy) are looked
up with one `searchsorted`, and every hash hit is confirmed by comparing the tokens themselves,
so a hash collision can never report an overlap that is not there.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # odd: the polynomial hash mod 2^64 keeps every token's bits


def ngram_hashes(ids: np.ndarray, n: int) -> np.ndarray:
    """(max(len(ids) - n + 1, 0),) uint64 hashes of every n-gram of `ids`, in order."""
    count = len(ids) - n + 1
    if count <= 0:
        return np.empty(0, dtype=np.uint64)
    x = np.asarray(ids, dtype=np.uint64) + np.uint64(1)  # so that id 0 still moves the hash
    h = np.zeros(count, dtype=np.uint64)
    for j in range(n):  # h = sum_j x[i + j] * M^(n-1-j)  (mod 2^64; numpy wraps uint64 silently)
        h = h * MULTIPLIER + x[j:j + count]
    return h


@dataclass
class Match:
    """The first training occurrence found of one evaluation n-gram."""

    source: str  # which training stream ("pretrain", "sft")
    offset: int  # token offset of the n-gram in that stream
    document: int  # index of the document holding it (its EOS count before the offset)


@dataclass
class EvalNgrams:
    """The n-grams of every evaluation item: entry e is n-gram `positions[e]` of segment
    `segments[e]`, which belongs to item `items[e]`; entries are sorted by hash."""

    n: int
    segment_tokens: list[np.ndarray]  # (len,) token ids of each segment
    segment_item: np.ndarray  # (n_segments,) item of each segment
    hashes: np.ndarray  # (n_entries,) uint64, sorted
    segments: np.ndarray  # (n_entries,) int64
    positions: np.ndarray  # (n_entries,) int64
    matches: dict[int, Match] = field(default_factory=dict)  # entry -> its first training occurrence
    done: Optional[np.ndarray] = None  # (n_entries,) True at the first entry of a hash all of whose entries matched

    def __post_init__(self) -> None:
        self.done = np.zeros(len(self.hashes), dtype=bool)

    @classmethod
    def build(cls, segment_tokens: Sequence[np.ndarray], segment_item: Sequence[int], n: int) -> "EvalNgrams":
        per = [ngram_hashes(t, n) for t in segment_tokens]
        hashes = np.concatenate(per) if per else np.empty(0, np.uint64)
        segments = (np.concatenate([np.full(len(h), s, np.int64) for s, h in enumerate(per)]) if per
                    else np.empty(0, np.int64))
        positions = np.concatenate([np.arange(len(h), dtype=np.int64) for h in per]) if per else np.empty(0, np.int64)
        order = np.argsort(hashes, kind="stable")
        return cls(n, [np.asarray(t, np.int64) for t in segment_tokens], np.asarray(segment_item, np.int64),
                   hashes[order], segments[order], positions[order])

    def entry_tokens(self, e: int) -> np.ndarray:
        return self.segment_tokens[self.segments[e]][self.positions[e]:self.positions[e] + self.n]

    def scan(self, chunk: np.ndarray, source: str, offset: int, eos_id: Optional[int], docs_before: int) -> None:
        """Record the evaluation n-grams that occur in `chunk` (training tokens starting at stream
        offset `offset`, after `docs_before` complete documents). Consecutive chunks must overlap
        by n - 1 tokens so that no n-gram is missed at a boundary."""
        if len(self.hashes) == 0:
            return
        h = ngram_hashes(chunk, self.n)
        idx = np.minimum(np.searchsorted(self.hashes, h), len(self.hashes) - 1)
        # training positions whose hash is an eval hash not yet fully matched (a common n-gram
        # repeated a million times costs one vectorised test per chunk, not a million checks)
        hit_pos = np.flatnonzero((self.hashes[idx] == h) & ~self.done[idx])
        if len(hit_pos) == 0:
            return
        chunk = np.asarray(chunk, dtype=np.int64)
        window = np.arange(self.n)
        for value in np.unique(h[hit_pos]):
            lo, hi = np.searchsorted(self.hashes, value, "left"), np.searchsorted(self.hashes, value, "right")
            open_entries = [e for e in range(lo, hi) if e not in self.matches]
            if not open_entries:
                continue
            pos = hit_pos[h[hit_pos] == value]
            grams = chunk[pos[:, None] + window]  # (k, n) the training n-grams with this hash
            for e in open_entries:
                equal = np.flatnonzero((grams == self.entry_tokens(e)).all(axis=1))
                if len(equal):  # confirmed token by token: not a collision
                    p = int(pos[equal[0]])
                    docs = docs_before + (int(np.count_nonzero(chunk[:p] == eos_id)) if eos_id is not None else 0)
                    self.matches[e] = Match(source, offset + p, docs)
            if all(e in self.matches for e in range(lo, hi)):
                self.done[lo] = True

    def item_overlap(self, n_items: int) -> tuple[np.ndarray, np.ndarray]:
        """(n-grams, matched n-grams) per item: (n_items,) int64 each."""
        items = self.segment_item[self.segments]
        total = np.bincount(items, minlength=n_items)
        matched = np.zeros(n_items, dtype=np.int64)
        for e in self.matches:
            matched[items[e]] += 1
        return total, matched
