"""Which documents to keep and which split each goes to, decided by keyed hashes of the text.

A keyed BLAKE2b hash of a document's text, read as a number in [0, 1), is a coin flip that
every machine agrees on: the same key picks the same subset and the same train/val split no
matter the order or the sharding of the corpus, and a larger `fraction` or `max_documents`
keeps a superset of a smaller one (a document is kept iff its hash is below a threshold, or
among the lowest hashes). Two `person` strings separate the "select" and "split" coins, so
being selected says nothing about landing in val.
"""
from __future__ import annotations

import hashlib
import heapq
from dataclasses import asdict, dataclass
from typing import Iterable, Iterator, Optional

from llm_maker.data.sources import Document
from llm_maker.recipe import DataConfig

SELECT_PERSON = b"llm-maker:select"  # BLAKE2b personalisation: at most 16 bytes
SPLIT_PERSON = b"llm-maker:split"
HASH_BYTES = 8


def hash_key(selection_key: str) -> bytes:
    """The BLAKE2b key for `data.selection_key` (keys over 64 bytes are hashed down to 64)."""
    key = selection_key.encode("utf-8")
    return key if len(key) <= 64 else hashlib.blake2b(key).digest()


def unit_hash(text: str, key: bytes, person: bytes) -> float:
    """A keyed hash of `text` mapped uniformly into [0, 1)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=HASH_BYTES, key=key, person=person).digest()
    return int.from_bytes(digest, "big") / 2.0 ** (8 * HASH_BYTES)


def select_hash(text: str, key: bytes) -> float:
    return unit_hash(text, key, SELECT_PERSON)


def split_of(text: str, key: bytes, val_fraction: float) -> str:
    return "val" if unit_hash(text, key, SPLIT_PERSON) < val_fraction else "train"


def content_digest(text: str) -> bytes:
    """An unkeyed 128-bit digest used only to recognise exact duplicates."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


@dataclass
class SelectionCounts:
    """What happened to every document read: one of the drop reasons, or kept in a split."""

    read: int = 0
    too_short: int = 0  # shorter than min_chars after stripping
    not_selected: int = 0  # select-hash >= fraction
    duplicate: int = 0  # the same text as a document already kept
    over_max_documents: int = 0  # selected, but not among the max_documents lowest hashes
    train_docs: int = 0
    val_docs: int = 0
    train_chars: int = 0
    val_chars: int = 0

    @property
    def kept(self) -> int:
        return self.train_docs + self.val_docs

    def as_dict(self) -> dict:
        return {**asdict(self), "kept": self.kept}


def select_documents(docs: Iterable[Document], cfg: DataConfig,
                     counts: Optional[SelectionCounts] = None) -> Iterator[tuple[str, Document]]:
    """Yield (split, document) for every kept document, in input order; fill `counts`.

    Without `cfg.max_documents` this streams (memory: one 16-byte digest per kept document);
    with it, the max_documents lowest-hash candidates are held in a heap until the input ends.
    """
    counts = counts if counts is not None else SelectionCounts()
    key = hash_key(cfg.selection_key)
    seen: set[bytes] = set()
    heap: list[tuple[float, int, Document]] = []  # max-heap on hash via negation: (-h, -index, doc)

    def emit(doc: Document) -> tuple[str, Document]:
        split = split_of(doc.text, key, cfg.val_fraction)
        if split == "val":
            counts.val_docs += 1
            counts.val_chars += len(doc.text)
        else:
            counts.train_docs += 1
            counts.train_chars += len(doc.text)
        return split, doc

    for index, doc in enumerate(docs):
        counts.read += 1
        if len(doc.text.strip()) < cfg.min_chars:
            counts.too_short += 1
            continue
        h = select_hash(doc.text, key)
        if h >= cfg.fraction:
            counts.not_selected += 1
            continue
        digest = content_digest(doc.text)
        if digest in seen:
            counts.duplicate += 1
            continue
        seen.add(digest)
        if cfg.max_documents is None:
            yield emit(doc)
        elif len(heap) < cfg.max_documents:
            heapq.heappush(heap, (-h, -index, doc))
        elif -heap[0][0] > h:  # lower than the highest hash kept so far: replace it
            heapq.heapreplace(heap, (-h, -index, doc))
            counts.over_max_documents += 1
        else:
            counts.over_max_documents += 1
    for _, _neg_index, doc in sorted(heap, key=lambda item: -item[1]):  # back to input order
        yield emit(doc)
