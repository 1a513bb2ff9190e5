"""pack/ at scale: bounded shards cut at document boundaries, per-shard manifest entries, a
multi-shard split read as one array, bounded read-ahead, and packing that resumes after an
exception or a kill -9 without losing or repeating a document."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from llm_maker.artifacts import read_manifest, sha256_file
from llm_maker.errors import DataError
from llm_maker.pack import packer
from llm_maker.pack.packer import pack_tokens
from llm_maker.pack.shards import LENGTH_EDGES, ShardedTokens, length_histogram, load_split
from llm_maker.recipe import PackConfig
from llm_maker.tokenizer.tokenizer import Tokenizer
from llm_maker.train.batches import PretrainBatches

SHARD = 5000  # tokens: the ~150K-token test corpus becomes ~30 shards


def split_lengths(data_dir: Path, tokenizer_dir: Path, split: str) -> list[int]:
    tok = Tokenizer.load(tokenizer_dir)
    texts = [json.loads(line)["text"] for line in (data_dir / f"{split}.jsonl").read_text().splitlines()]
    return [len(ids) + 1 for ids in tok.encode_batch(texts)]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, data_dir, tokenizer_dir):
    return pack_tokens(PackConfig(workers=1, shard_tokens=SHARD, batch_documents=50), data_dir, tokenizer_dir,
                       tmp_path_factory.mktemp("sharded") / "pack")


def test_shards_are_bounded_cut_between_documents_and_listed_with_hashes(sharded, pack_dir, data_dir,
                                                                         tokenizer_dir):
    m = read_manifest(sharded)
    eos = m["eos_id"]
    for split in ("train", "val"):
        entries = m["shards"][split]
        assert [e["file"] for e in entries] == [f"{split}-{i:05d}.bin" for i in range(len(entries))]
        assert len(entries) >= m[f"{split}_tokens"] / SHARD
        whole = np.fromfile(pack_dir / f"{split}.bin", dtype="<u2")
        parts = [np.fromfile(sharded / e["file"], dtype="<u2") for e in entries]
        assert np.array_equal(np.concatenate(parts), whole)  # the same stream, cut into pieces
        lengths = split_lengths(data_dir, tokenizer_dir, split)
        ends, doc = [], 0
        for e, part in zip(entries, parts, strict=False):
            assert len(part) == e["tokens"] <= SHARD and part[-1] == eos
            assert e["sha256"] == sha256_file(sharded / e["file"])
            doc += e["documents"]
            ends.append(doc)
            # the next document would not have fit: shards are as full as whole documents allow
            if doc < len(lengths):
                assert e["tokens"] + lengths[doc] > SHARD
        assert ends[-1] == m["documents"][split] == len(lengths)
        assert sum(e["tokens"] for e in entries) == m[f"{split}_tokens"]


def test_a_sharded_split_reads_like_one_array(sharded, pack_dir):
    whole = np.fromfile(pack_dir / "train.bin", dtype="<u2")
    tokens = load_split(sharded, "train")
    assert isinstance(tokens, ShardedTokens) and len(tokens) == len(whole) and tokens.dtype == np.dtype("<u2")
    rng = np.random.default_rng(0)
    for a, b in rng.integers(0, len(whole), size=(200, 2)):
        a, b = sorted((int(a), int(b)))
        assert np.array_equal(tokens[a:b], whole[a:b])
    for i in (0, 4999, 5000, len(whole) - 1, -1, -len(whole)):
        assert tokens[i] == whole[i]
    assert np.array_equal(tokens[10:20000:7], whole[10:20000:7]) and len(tokens[30:10]) == 0
    assert np.array_equal(np.asarray(tokens), whole)
    with pytest.raises(IndexError):
        tokens[len(whole)]
    # the trainer's batches are the same from shards as from one file
    one, many = (PretrainBatches(t, 64, 8, seed=3, val_tokens=load_split(p, "val"))
                 for t, p in ((load_split(pack_dir, "train"), pack_dir), (tokens, sharded)))
    for index in (0, 1, 57):
        for x, y in zip(one.micro_batch(index), many.micro_batch(index), strict=False):
            assert np.array_equal(x.numpy(), y.numpy())
    assert [v[0].tolist() for v in one.val_batches(3)] == [v[0].tolist() for v in many.val_batches(3)]


def test_a_document_longer_than_a_shard_gets_its_own_shard(tmp_path, data_dir, tokenizer_dir):
    small = max(split_lengths(data_dir, tokenizer_dir, "val")) - 1  # the longest val document overflows
    out = pack_tokens(PackConfig(workers=1, shard_tokens=small), data_dir, tokenizer_dir, tmp_path / "pack")
    entries = read_manifest(out)["shards"]["val"]
    big = [e for e in entries if e["tokens"] > small]
    assert len(big) == 1 and big[0]["documents"] == 1
    assert all(e["tokens"] <= small for e in entries if e is not big[0])


def test_manifest_keeps_a_length_histogram_of_the_documents(sharded, data_dir, tokenizer_dir):
    m = read_manifest(sharded)
    assert m["doc_length"]["edges"] == LENGTH_EDGES.tolist()
    for split in ("train", "val"):
        text_tokens = np.array(split_lengths(data_dir, tokenizer_dir, split)) - 1
        assert m["doc_length"][split]["histogram"] == length_histogram(text_tokens).tolist()
        assert m["doc_length"][split]["max"] == int(text_tokens.max())
    assert length_histogram(np.array([0, 1, 2, 3, 5, 1000]))[:5].tolist() == [1, 1, 1, 1, 0]


def test_a_truncated_shard_is_named_by_load_split(tmp_path, sharded):
    import shutil

    broken = tmp_path / "pack"
    shutil.copytree(sharded, broken)
    with open(broken / "train-00003.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(DataError, match=r"train-00003\.bin: holds 50 tokens but the manifest says \d+"):
        load_split(broken, "train")


def test_the_pool_reads_at_most_two_batches_per_worker_ahead(tokenizer_dir, prose_texts):
    tok = Tokenizer.load(tokenizer_dir)
    pulled = []

    def batches():
        for i in range(12):
            pulled.append(i)
            yield prose_texts[i * 10:(i + 1) * 10]

    out = []
    for tokens, _lengths, _text_bytes in packer.encoded_batches(tok, batches(), np.dtype("<u2"), 2,
                                                              tokenizer_dir / "tokenizer.json"):
        out.append(tokens)
        assert len(pulled) <= len(out) + 2 * 2  # never more than 4 batches in flight
    expected = [packer.encode_to_tokens(tok, prose_texts[i * 10:(i + 1) * 10], np.dtype("<u2")) for i in range(12)]
    assert all(np.array_equal(a, b) for a, b in zip(out, expected, strict=False)) and len(out) == 12


# --------------------------------------------------------------------------------------
# Resume
# --------------------------------------------------------------------------------------

def _same_pack(a: Path, b: Path) -> None:
    ma, mb = read_manifest(a), read_manifest(b)
    for key in ("shards", "train_tokens", "val_tokens", "documents", "text_bytes", "bytes_per_token", "doc_length"):
        assert ma[key] == mb[key], key
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())


def test_an_exception_mid_pack_resumes_without_repeating_or_losing_documents(tmp_path, data_dir, tokenizer_dir,
                                                                             sharded, monkeypatch):
    real, calls, failed = packer.encode_batch, [], []

    def failing(tok, texts, dtype):
        calls.append(len(texts))
        if len(calls) == 9 and not failed:
            failed.append(True)
            raise RuntimeError("injected failure")
        return real(tok, texts, dtype)

    monkeypatch.setattr(packer, "encode_batch", failing)
    cfg = PackConfig(workers=1, shard_tokens=SHARD, batch_documents=50)
    with pytest.raises(RuntimeError, match="injected failure"):
        pack_tokens(cfg, data_dir, tokenizer_dir, tmp_path / "pack")
    partial = tmp_path / ".pack.partial"
    progress = json.loads((partial / "progress.json").read_text())
    done = progress["splits"]["train"]["shards"]
    assert done and not (tmp_path / "pack").exists()
    assert sorted(p.name for p in partial.iterdir()) == sorted(["progress.json"] + [e["file"] for e in done])
    done_docs = sum(e["documents"] for e in done)

    calls.clear()
    out = pack_tokens(cfg, data_dir, tokenizer_dir, tmp_path / "pack")
    _same_pack(out, sharded)
    total = sum(read_manifest(sharded)["documents"].values())
    assert sum(calls) == total - done_docs  # each document encoded once over both runs
    assert not partial.exists() and not (out / "progress.json").exists()


KILL_SCRIPT = """
import sys, time
from llm_maker.pack import packer
from llm_maker.recipe import PackConfig
real = packer.encode_batch
def slow(tok, texts, dtype):
    time.sleep(0.15)
    return real(tok, texts, dtype)
packer.encode_batch = slow
packer.pack_tokens(PackConfig(workers=1, shard_tokens={shard}, batch_documents=50), sys.argv[1], sys.argv[2],
                   sys.argv[3])
"""


def test_a_killed_pack_resumes_to_the_same_bytes(tmp_path, data_dir, tokenizer_dir, sharded):
    out = tmp_path / "pack"
    child = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT.format(shard=SHARD), str(data_dir),
                              str(tokenizer_dir), str(out)], env={**os.environ, "PYTHONPATH": "src"})
    progress = tmp_path / ".pack.partial" / "progress.json"
    deadline = time.time() + 60
    while time.time() < deadline:
        if progress.is_file() and len(json.loads(progress.read_text())["splits"]["train"]["shards"]) >= 3:
            break
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL and not out.exists()
    listed = json.loads(progress.read_text())["splits"]["train"]["shards"]
    assert 3 <= len(listed) < len(read_manifest(sharded)["shards"]["train"])
    # no shard is left looking complete unless it is: a final name is listed, whole and hashed
    for path in (tmp_path / ".pack.partial").glob("*.bin"):
        entry = next(e for e in listed if e["file"] == path.name)
        assert path.stat().st_size == 2 * entry["tokens"] and sha256_file(path) == entry["sha256"]
    resumed = pack_tokens(PackConfig(workers=1, shard_tokens=SHARD, batch_documents=50), data_dir, tokenizer_dir, out)
    _same_pack(resumed, sharded)
    for e in read_manifest(resumed)["shards"]["train"]:
        assert (resumed / e["file"]).read_bytes() == (sharded / e["file"]).read_bytes()


def test_a_partial_pack_of_another_config_is_discarded(tmp_path, data_dir, tokenizer_dir, monkeypatch):
    real, calls = packer.encode_batch, []

    def failing(tok, texts, dtype):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("injected failure")
        return real(tok, texts, dtype)

    monkeypatch.setattr(packer, "encode_batch", failing)
    with pytest.raises(RuntimeError):
        pack_tokens(PackConfig(workers=1, shard_tokens=SHARD, batch_documents=50), data_dir, tokenizer_dir,
                    tmp_path / "pack")
    monkeypatch.setattr(packer, "encode_batch", real)
    out = pack_tokens(PackConfig(workers=1, shard_tokens=2 * SHARD, batch_documents=50), data_dir, tokenizer_dir,
                      tmp_path / "pack")  # another shard size: nothing of the old partial may be reused
    m = read_manifest(out)
    assert all(e["tokens"] > SHARD for e in m["shards"]["train"][:-1])
    assert sum(m["documents"].values()) == sum(len((Path(data_dir) / f"{s}.jsonl").read_text().splitlines())
                                               for s in ("train", "val"))
