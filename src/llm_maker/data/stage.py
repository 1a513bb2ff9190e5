"""The data stage: read every source, select and split, write train.jsonl / val.jsonl.

    DATA_DIR/
      train.jsonl    {"id": ..., "text": ...} per line, in source order
      val.jsonl
      manifest.json  counts (kept, dropped by reason, per split), sources with file hashes and the
                     rows each source's own filters dropped (fineweb-edu: by score, language, length)

The outputs are written into a temporary folder beside DATA_DIR that replaces it only once
every source has been read and checked, so a failure leaves an earlier DATA_DIR untouched.
"""
from __future__ import annotations

import hashlib
import itertools
import json
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator, Optional

from llm_maker.artifacts import (
    atomic_dir,
    is_up_to_date,
    iter_jsonl_rows,
    sha256_file,
    stage_fingerprint,
    write_manifest,
)
from llm_maker.data.builtin import builtin_signature
from llm_maker.data.fineweb import describe_files, iter_fineweb
from llm_maker.data.select import SelectionCounts, select_documents
from llm_maker.data.sources import READERS, Document, source_files, source_label
from llm_maker.errors import DataError
from llm_maker.layout import SPLITS
from llm_maker.recipe import DataConfig, SourceConfig


def iter_documents(source: SourceConfig, dropped: Optional[Counter] = None) -> Iterator[Document]:
    """The documents of one source in a fixed order, at most `source.max_documents` of them.

    `dropped` counts rows a reader skipped and why (fineweb-edu's column filters)."""
    if source.type == "fineweb-edu":
        docs = iter_fineweb(source, dropped)
    else:
        reader = READERS.get(source.type)
        if reader is None:
            raise DataError(f"unknown data source type {source.type!r}; expected one of "
                            f"{', '.join([*READERS, 'fineweb-edu'])}")
        docs = reader(source)
    if source.max_documents is not None:
        docs = itertools.islice(docs, source.max_documents)
    return docs


def source_signature(cfg: DataConfig) -> list[dict[str, Any]]:
    """A cheap stand-in for the sources' contents (paths, sizes, mtimes; Python for builtin).

    Part of the data stage's fingerprint: touching or replacing a source file reruns the stage."""
    signature = []
    for source in cfg.sources:
        if source.type == "builtin":
            signature.append({"type": "builtin", **builtin_signature()})
            continue
        if source.type == "fineweb-edu" and source.path is None:  # a download: named by repo, config, revision
            signature.append({"type": source.type, "repo_id": source.repo_id, "config": source.config,
                              "revision": source.revision, "max_files": source.max_files})
            continue
        try:
            files = source_files(source)
        except DataError:  # a missing source is reported when the stage runs, not here
            files = []
        signature.append({
            "type": source.type,
            "path": source.path,
            "files": [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files],
        })
    return signature


def _describe_source(source: SourceConfig, content_sha256: str, documents: int,
                     dropped: Counter) -> dict[str, Any]:
    """The manifest's record of one source: its files and their SHA-256 (builtin: its Python), and
    the rows its reader dropped by reason."""
    entry: dict[str, Any] = {"type": source.type, "documents_read": documents, "content_sha256": content_sha256,
                             "dropped_by_source": dict(sorted(dropped.items()))}
    if source.type == "builtin":
        entry.update(builtin_signature())
    elif source.type == "fineweb-edu":
        entry.update(path=source.path, repo_id=source.repo_id, config=source.config, revision=source.revision,
                     files=describe_files(source))
    else:
        entry["path"] = source.path
        entry["files"] = [{"path": str(p), "bytes": p.stat().st_size, "sha256": sha256_file(p)}
                          for p in source_files(source)]
    return entry


def _read_sources(cfg: DataConfig, described: list[dict[str, Any]]) -> Iterator[Document]:
    """All documents of all sources in recipe order; appends each source's record when it ends."""
    for source in cfg.sources:
        h, n, dropped = hashlib.sha256(), 0, Counter()
        for doc in iter_documents(source, dropped):
            h.update(doc.text.encode("utf-8"))
            h.update(b"\0")
            n += 1
            yield doc
        described.append(_describe_source(source, h.hexdigest(), n, dropped))


def _check_counts(cfg: DataConfig, counts: SelectionCounts, described: list[dict[str, Any]]) -> None:
    labels = ", ".join(source_label(s) for s in cfg.sources)
    by_source = Counter()
    for entry in described:
        by_source.update(entry.get("dropped_by_source", {}))
    filtered = "".join(f"{n} rows failed {reason}, " for reason, n in sorted(by_source.items()))
    dropped = (f"{filtered}read {counts.read}, dropped {counts.too_short} shorter than data.min_chars={cfg.min_chars}, "
               f"{counts.not_selected} outside data.fraction={cfg.fraction}, {counts.duplicate} duplicates")
    if counts.kept == 0:
        raise DataError(f"no documents left from {labels} ({dropped})")
    for split in SPLITS:
        if getattr(counts, f"{split}_docs") == 0:
            raise DataError(
                f"the {split} split is empty: {counts.kept} documents kept from {labels} with "
                f"data.val_fraction={cfg.val_fraction}; add documents or change data.val_fraction"
            )


def prepare_data(cfg: DataConfig, out_dir: Path, force: bool = False) -> Path:
    """Write out_dir/{train,val}.jsonl and manifest.json; skipped when sources and config are unchanged."""
    out_dir = Path(out_dir)
    fp = stage_fingerprint(cfg, extra=source_signature(cfg))
    if not force and is_up_to_date(out_dir, fp):
        return out_dir
    counts = SelectionCounts()
    described: list[dict[str, Any]] = []
    with atomic_dir(out_dir) as tmp:
        with open(tmp / "train.jsonl", "w", encoding="utf-8") as train, \
                open(tmp / "val.jsonl", "w", encoding="utf-8") as val:
            files = {"train": train, "val": val}
            for split, doc in select_documents(_read_sources(cfg, described), cfg, counts):
                files[split].write(json.dumps({"id": doc.doc_id, "text": doc.text}, ensure_ascii=False) + "\n")
        _check_counts(cfg, counts, described)  # raising here discards tmp and keeps the old out_dir
        write_manifest(tmp, "data", fp, counts=counts.as_dict(), sources=described, config=asdict(cfg))
    return out_dir


def iter_split(data_dir: Path, split: str) -> Iterator[Document]:
    """The documents of one split of a data stage's output, in file order."""
    path = Path(data_dir) / f"{split}.jsonl"
    if not path.is_file():
        raise DataError(f"{path}: missing; run the `data` stage first")
    for where, record in iter_jsonl_rows(path, "data split"):
        try:
            yield Document(record["id"], record["text"])
        except (KeyError, TypeError):
            raise DataError(f"{where}: not an {{\"id\", \"text\"}} record; rerun the `data` stage") from None


def iter_split_batches(data_dir: Path, split: str, batch_documents: int) -> Iterator[list[Document]]:
    """The documents of one split in lists of at most `batch_documents`."""
    batch: list[Document] = []
    for doc in iter_split(data_dir, split):
        batch.append(doc)
        if len(batch) == batch_documents:
            yield batch
            batch = []
    if batch:
        yield batch
