"""Shared fixtures: a small real-prose corpus and the first three stages built on it once.

The session-scoped directories (`data_dir`, `tokenizer_dir`, `pack_dir`) are shared by every
test that asks for them: treat them as read-only (copy them with `shutil.copytree` to change
anything). They take about a second to build on 2 cores.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from helpers import prose_paragraphs, write_jsonl
from llm_maker.recipe import DataConfig, PackConfig, SourceConfig, TokenizerConfig


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
