"""Read the documents of one local corpus source: plain text, JSON Lines, Parquet or the built-in
corpus (FineWeb-Edu's reader is data/fineweb.py; data/stage.py:iter_documents picks the reader).

Every reader streams (one file, one line or one Parquet batch at a time) so a corpus larger
than RAM can be read, and every malformed input raises a DataError naming the file (and the
line, byte offset or column) instead of a bare library exception.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, NamedTuple

from llm_maker.artifacts import iter_jsonl_lines
from llm_maker.data.builtin import builtin_documents
from llm_maker.errors import DataError
from llm_maker.recipe import SourceConfig

TEXT_SUFFIXES = (".txt", ".md")
PARQUET_BATCH_ROWS = 1024  # rows per Parquet batch, for every Parquet reader: bounds memory to ~1024 documents


class Document(NamedTuple):
    doc_id: str  # stable: "<file relative to the source>:<line or row>", "pydoc:if", ...
    text: str


def source_label(source: SourceConfig) -> str:
    """A short name for messages: `builtin`, `jsonl:/data/x.jsonl`,
    `fineweb-edu:HuggingFaceFW/fineweb-edu/sample-10BT`."""
    if source.type == "fineweb-edu" and source.path is None:
        return f"fineweb-edu:{source.repo_id}/{source.config}"
    return source.type if source.type == "builtin" else f"{source.type}:{source.path}"


def source_files(source: SourceConfig) -> list[Path]:
    """The files a file-based source reads, sorted; a DataError if there are none."""
    suffixes = {"text": TEXT_SUFFIXES, "jsonl": (".jsonl",), "parquet": (".parquet",),
                "fineweb-edu": (".parquet",)}.get(source.type)
    if suffixes is None:
        raise DataError(f"data source type {source.type!r} has no files; expected text, jsonl or parquet")
    if source.path is None:
        raise DataError(f"data source {source.type}: `path` is required")
    root = Path(source.path)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise DataError(f"{root}: {source.type} source path does not exist")
    files = sorted(p for p in root.rglob("*") if p.suffix in suffixes and p.is_file())
    if not files:
        raise DataError(f"{root}: no {' or '.join('*' + s for s in suffixes)} files in this folder")
    return files


def _relative_name(path: Path, source: SourceConfig) -> str:
    root = Path(source.path)
    return path.name if root.is_file() else path.relative_to(root).as_posix()


def decode_utf8(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{where}: not UTF-8 text: byte 0x{data[e.start]:02x} at byte offset {e.start} ({e.reason})"
        ) from None


def iter_text(source: SourceConfig) -> Iterator[Document]:
    """One document per .txt/.md file."""
    for path in source_files(source):
        yield Document(_relative_name(path, source), decode_utf8(path.read_bytes(), str(path)))


def parse_jsonl_line(line: bytes, text_field: str, where: str) -> str:
    """The `text_field` string of one JSON Lines record; `where` is "file:line" for errors."""
    try:
        record = json.loads(decode_utf8(line, where))
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with a {text_field!r} field, got {type(record).__name__}")
    if text_field not in record:
        raise DataError(f"{where}: missing field {text_field!r} (fields: {', '.join(sorted(record)) or 'none'})")
    text = record[text_field]
    if not isinstance(text, str):
        raise DataError(f"{where}: field {text_field!r} must be a string, got {type(text).__name__}")
    return text


def iter_jsonl(source: SourceConfig) -> Iterator[Document]:
    """One document per non-blank line of each .jsonl file."""
    for path in source_files(source):
        name = _relative_name(path, source)
        for lineno, line in iter_jsonl_lines(path, "jsonl source file"):
            yield Document(f"{name}:{lineno}", parse_jsonl_line(line, source.text_field, f"{path}:{lineno}"))


def iter_parquet(source: SourceConfig) -> Iterator[Document]:
    """One document per row of each .parquet file, reading only the text column in batches."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    field = source.text_field
    for path in source_files(source):
        name = _relative_name(path, source)
        try:
            pf = pq.ParquetFile(path)
            columns = pf.schema_arrow.names
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path}: unreadable Parquet file ({e})") from None
        if field not in columns:
            raise DataError(f"{path}: no column {field!r}; columns are: {', '.join(columns)}")
        col_type = pf.schema_arrow.field(field).type
        if not (pa.types.is_string(col_type) or pa.types.is_large_string(col_type)):
            raise DataError(f"{path}: column {field!r} must hold strings, has type {col_type}")
        row = 0
        try:
            for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[field]):
                for text in batch.column(0).to_pylist():
                    if text is not None:  # a null cell is an absent document, not an error
                        yield Document(f"{name}:{row}", text)
                    row += 1
        except (pa.ArrowException, OSError, UnicodeDecodeError) as e:  # a truncated or corrupt row group
            raise DataError(f"{path}: unreadable Parquet data after row {row} ({e})") from None


def iter_builtin(source: SourceConfig) -> Iterator[Document]:
    for doc_id, text in builtin_documents():
        yield Document(doc_id, text)


READERS = {"builtin": iter_builtin, "text": iter_text, "jsonl": iter_jsonl, "parquet": iter_parquet}
