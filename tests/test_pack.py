"""pack/: token files that decode back to the documents, dtype choice, manifest, memmaps, baseline."""
import json
import math
import shutil

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer

from helpers import write_jsonl
from llm_maker.artifacts import read_manifest, sha256_file, write_manifest
from llm_maker.data.stage import prepare_data
from llm_maker.errors import DataError
from llm_maker.pack import packer
from llm_maker.pack.packer import choose_dtype, documents_to_tokens, pack_tokens
from llm_maker.pack.shards import load_split, unigram_loss
from llm_maker.recipe import DataConfig, PackConfig, SourceConfig
from llm_maker.tokenizer.tokenizer import EOS, Tokenizer


def split_texts(data_dir, split):
    lines = (data_dir / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["text"] for line in lines]


@pytest.mark.parametrize("split", ["train", "val"])
def test_tokens_decode_back_to_the_documents_joined_with_eos(pack_dir, data_dir, tokenizer_dir, split):
    tok = Tokenizer.load(tokenizer_dir)
    tokens = load_split(pack_dir, split)
    texts = split_texts(data_dir, split)
    assert tokens.dtype == np.dtype("<u2") and not tokens.flags.writeable
    assert tok.decode(tokens.tolist()) == "".join(t + EOS for t in texts)
    assert int((tokens == tok.eos_id).sum()) == len(texts) and tokens[-1] == tok.eos_id


def test_manifest_counts_match_the_files(pack_dir, data_dir, tokenizer_dir):
    m = read_manifest(pack_dir)
    train, val = split_texts(data_dir, "train"), split_texts(data_dir, "val")
    assert m["dtype"] == "uint16" and m["vocab_size"] == 512 and m["eos_id"] == 0
    assert m["train_tokens"] == len(load_split(pack_dir, "train")) == (pack_dir / "train.bin").stat().st_size // 2
    assert m["val_tokens"] == len(load_split(pack_dir, "val"))
    assert m["documents"] == {"train": len(train), "val": len(val)}
    assert m["tokenizer_hash"] == Tokenizer.load(tokenizer_dir).hash
    assert m["source_sha256"] == {"train.jsonl": sha256_file(data_dir / "train.jsonl"),
                                  "val.jsonl": sha256_file(data_dir / "val.jsonl")}
    text_bytes = sum(len(t.encode("utf-8")) for t in train + val)
    text_tokens = m["train_tokens"] + m["val_tokens"] - len(train) - len(val)
    assert m["bytes_per_token"] == pytest.approx(text_bytes / text_tokens, abs=1e-4)


def test_documents_to_tokens_appends_eos_after_each_document():
    out = documents_to_tokens([[5, 6], [], [7]], eos_id=0, dtype=np.dtype("<u2"))
    assert out.tolist() == [5, 6, 0, 0, 7, 0] and out.dtype == np.uint16
    with pytest.raises(DataError, match="token id 70000 does not fit pack dtype uint16"):
        documents_to_tokens([[70000]], eos_id=0, dtype=np.dtype("<u2"))


def test_choose_dtype():
    assert choose_dtype("auto", 512) == np.uint16
    assert choose_dtype("auto", 65536) == np.uint16  # ids 0..65535
    assert choose_dtype("auto", 65537) == np.uint32
    assert choose_dtype("uint32", 512) == np.uint32
    with pytest.raises(DataError, match=r"pack.dtype is uint16 but the tokenizer's vocab_size is 70000"):
        choose_dtype("uint16", 70000)


@pytest.fixture(scope="module")
def big_vocab_run(tmp_path_factory, tokenizer_dir):
    """A tokenizer with 66000 extra added tokens (vocab 66512) and documents that use the top ones."""
    root = tmp_path_factory.mktemp("bigvocab")
    hf = HFTokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    hf.add_tokens([f"<x{i}>" for i in range(66000)])
    tok = Tokenizer(hf)
    tok.save(root / "tokenizer")
    write_manifest(root / "tokenizer", "tokenizer", "big-vocab")
    texts = [f"document {i} says <x{65990 + i % 10}> and <x{i}>." for i in range(60)]
    src = write_jsonl(root / "c.jsonl", texts)
    data = prepare_data(DataConfig(sources=[SourceConfig(type="jsonl", path=str(src))], val_fraction=0.3),
                        root / "data")
    return root, data, root / "tokenizer", tok


def test_vocab_over_65536_packs_as_uint32_with_ids_intact(big_vocab_run):
    root, data, tok_dir, tok = big_vocab_run
    out = pack_tokens(PackConfig(), data, tok_dir, root / "pack")
    tokens = load_split(out, "train")
    assert read_manifest(out)["dtype"] == "uint32" and tokens.dtype == np.dtype("<u4")
    assert read_manifest(out)["vocab_size"] == tok.vocab_size == 66512
    assert int(tokens.max()) >= 512 + 65990  # an id that uint16 would have wrapped
    assert tok.decode(tokens.tolist()) == "".join(t + EOS for t in split_texts(data, "train"))


def test_uint16_with_a_larger_vocab_is_an_error_and_writes_nothing(big_vocab_run):
    root, data, tok_dir, _ = big_vocab_run
    with pytest.raises(DataError, match=r"pack.dtype is uint16 but the tokenizer's vocab_size is 66512 \(> 65536\)"):
        pack_tokens(PackConfig(dtype="uint16"), data, tok_dir, root / "pack16")
    assert not (root / "pack16").exists()


def test_pack_skips_when_unchanged_and_speed_settings_do_not_rerun(tmp_path, data_dir, tokenizer_dir, pack_dir):
    out = pack_tokens(PackConfig(workers=1), data_dir, tokenizer_dir, tmp_path / "pack")
    first = read_manifest(out)["created_unix"]
    pack_tokens(PackConfig(workers=4, batch_documents=7), data_dir, tokenizer_dir, out)
    assert read_manifest(out)["created_unix"] == first
    assert (out / "train.bin").read_bytes() == (pack_dir / "train.bin").read_bytes()
    pack_tokens(PackConfig(dtype="uint32"), data_dir, tokenizer_dir, out)
    assert read_manifest(out)["dtype"] == "uint32"
    assert load_split(out, "train").tolist() == load_split(pack_dir, "train").tolist()


@pytest.mark.slow  # a process pool
def test_small_batches_and_a_process_pool_give_identical_bytes(tmp_path, data_dir, tokenizer_dir, pack_dir,
                                                               monkeypatch):
    monkeypatch.setattr(packer, "POOL_MIN_BYTES", 0)  # use the pool even for this small split
    out = pack_tokens(PackConfig(workers=2, batch_documents=13), data_dir, tokenizer_dir, tmp_path / "pack")
    for split in ("train", "val"):
        assert (out / f"{split}.bin").read_bytes() == (pack_dir / f"{split}.bin").read_bytes()


def test_load_split_errors(tmp_path, pack_dir):
    broken = tmp_path / "pack"
    shutil.copytree(pack_dir, broken)
    with open(broken / "val.bin", "ab") as f:
        f.write(b"\x00")
    with pytest.raises(DataError, match=r"val.bin: \d+ bytes is not a multiple of 2 \(uint16\)"):
        load_split(broken, "val")
    (broken / "train.bin").write_bytes(b"\x00\x00" * 3)
    with pytest.raises(DataError, match=r"train.bin: holds 3 tokens but the manifest says \d+"):
        load_split(broken, "train")
    (broken / "train.bin").unlink()
    with pytest.raises(DataError, match=r"train.bin: missing; rerun the `pack` stage"):
        load_split(broken, "train")
    with pytest.raises(DataError, match=r"unknown split 'test'"):
        load_split(pack_dir, "test")


def fake_pack(path, train, val, vocab_size):
    path.mkdir()
    np.asarray(train, dtype="<u2").tofile(path / "train.bin")
    np.asarray(val, dtype="<u2").tofile(path / "val.bin")
    write_manifest(path, "pack", "fake", dtype="uint16", vocab_size=vocab_size, train_tokens=len(train),
                   val_tokens=len(val))
    return path


def test_unigram_loss_is_add_one_smoothed_cross_entropy(tmp_path, pack_dir):
    # train counts [2, 1, 1, 0] + 1 -> p = [3, 2, 2, 1] / 8; val = [0, 3]
    p = fake_pack(tmp_path / "p", [0, 0, 1, 2], [0, 3], vocab_size=4)
    assert unigram_loss(p) == pytest.approx(-(math.log(3 / 8) + math.log(1 / 8)) / 2)
    loss = unigram_loss(pack_dir)  # real prose, 512 tokens: between "knows nothing" and zero
    assert 3.0 < loss < math.log(512)


def test_a_document_mentioning_eos_gets_exactly_one_eos(tmp_path, tokenizer_dir):
    from llm_maker.pack.packer import pack_tokens
    from llm_maker.pack.shards import load_split
    from llm_maker.recipe import PackConfig
    from llm_maker.tokenizer.tokenizer import Tokenizer

    data = tmp_path / "data"
    data.mkdir()
    docs = ["this text mentions <|endoftext|> in the middle", "a second plain document"]
    for split in ("train", "val"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps({"id": str(i), "text": t}) + "\n"
                                                     for i, t in enumerate(docs)))
    (data / "manifest.json").write_text(json.dumps({"fingerprint": "x"}))
    out = pack_tokens(PackConfig(), data, tokenizer_dir, tmp_path / "pack")
    tok = Tokenizer.load(tokenizer_dir)
    tokens = np.asarray(load_split(out, "train"))
    assert int((tokens == tok.eos_id).sum()) == len(docs)
