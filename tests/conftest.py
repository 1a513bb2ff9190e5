"""Shared fixtures: a small real-prose corpus and the first three stages built on it once.

The session-scoped directories (`data_dir`, `tokenizer_dir`, `pack_dir`) are shared by every
test that asks for them: treat them as read-only (copy them with `shutil.copytree` to change
anything). They take about a second to build on 2 cores.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import pyarrow as pa

import pytest

from llm_maker.recipe import DataConfig, PackConfig, SourceConfig, TokenizerConfig


def prose_paragraphs(min_chars: int = 80) -> list[str]:
    """Paragraphs of CPython's pydoc topics: ~1500 real English paragraphs, ~416K chars, fixed order."""
    from pydoc_data.topics import topics

    return [p.strip() for name in sorted(topics) for p in topics[name].split("\n\n") if len(p.strip()) >= min_chars]


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({field: t}) + "\n" for t in texts), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def prose_texts() -> list[str]:
    return prose_paragraphs()


@pytest.fixture(scope="session")
def prose_jsonl(tmp_path_factory, prose_texts) -> Path:
    """A .jsonl file with one {"text": paragraph} per line."""
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "prose.jsonl", prose_texts)


@pytest.fixture(scope="session")
def data_config(prose_jsonl) -> DataConfig:
    return DataConfig(sources=[SourceConfig(type="jsonl", path=str(prose_jsonl))], val_fraction=0.1)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, data_config) -> Path:
    """A finished data stage (train.jsonl, val.jsonl, manifest.json) over `prose_jsonl`."""
    from llm_maker.data.stage import prepare_data

    return prepare_data(data_config, tmp_path_factory.mktemp("run") / "data")


@pytest.fixture(scope="session")
def tokenizer_dir(data_dir) -> Path:
    """A 512-token byte-level BPE trained on `data_dir`'s train split."""
    from llm_maker.tokenizer.stage import build_tokenizer

    return build_tokenizer(TokenizerConfig(vocab_size=512), data_dir, data_dir.parent / "tokenizer")


@pytest.fixture(scope="session")
def pack_dir(data_dir, tokenizer_dir) -> Path:
    """`data_dir` encoded with `tokenizer_dir` into train.bin / val.bin (uint16)."""
    from llm_maker.pack.packer import pack_tokens

    return pack_tokens(PackConfig(workers=1), data_dir, tokenizer_dir, data_dir.parent / "pack")


# FineWeb-Edu's exact parquet schema, for tests of the parquet and fineweb-edu sources.
FINEWEB_SCHEMA = pa.schema([
    ("text", pa.string()), ("id", pa.string()), ("dump", pa.string()), ("url", pa.string()),
    ("date", pa.string()), ("file_path", pa.string()), ("language", pa.string()),
    ("language_score", pa.float64()), ("token_count", pa.int64()), ("score", pa.float64()),
    ("int_score", pa.int64()),
])


def fineweb_rows(texts: list[str], scores: Optional[list[float]] = None, language_scores: Optional[list[float]] = None,
                 token_counts: Optional[list[int]] = None) -> pa.Table:
    """A table with FineWeb-Edu's exact schema; int_score is round(score) as in the dataset."""
    n = len(texts)
    scores = scores or [3.1] * n
    return pa.table({
        "text": texts,
        "id": [f"<urn:uuid:{i:08d}-0000-0000-0000-000000000000>" for i in range(n)],
        "dump": ["CC-MAIN-2024-10"] * n,
        "url": [f"https://example.org/{i}" for i in range(n)],
        "date": ["2024-02-21T12:00:00Z"] * n,
        "file_path": ["s3://commoncrawl/crawl-data/CC-MAIN-2024-10/x.warc.gz"] * n,
        "language": ["en"] * n,
        "language_score": language_scores or [0.95] * n,
        "token_count": token_counts or [max(1, len(t.split())) for t in texts],
        "score": scores,
        "int_score": [int(round(s)) for s in scores],
    }, schema=FINEWEB_SCHEMA)
