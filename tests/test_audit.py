"""audit/: token n-gram overlap between a run's training tokens and evaluation sets.

A run is built on real prose with evaluation text planted in known training documents (and one
planted in a validation document, which training never saw); the audit must flag exactly the
planted items, say where it found them, and be blind to chunking and to hash collisions."""
from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest

from helpers import write_jsonl
from llm_maker.artifacts import read_manifest
from llm_maker.audit import ngrams as ngrams_module
from llm_maker.audit.contamination import audit_run, read_eval_set
from llm_maker.audit.ngrams import ngram_hashes
from llm_maker.cli import main
from llm_maker.data.select import hash_key, split_of
from llm_maker.data.stage import prepare_data
from llm_maker.errors import DataError
from llm_maker.pack.packer import pack_tokens
from llm_maker.recipe import DataConfig, PackConfig, SourceConfig
from llm_maker.tokenizer.tokenizer import Tokenizer

KEY = "audit-test"


def nonsense(rng: random.Random, n_words: int) -> str:
    """Random letter strings: text that cannot share 13 tokens with the corpus or with other items
    by chance (the 512-token test vocabulary spells such words letter by letter)."""
    return " ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8)))
                    for _ in range(n_words))


def host_doc(prose: list[str], start: int, planted: str, want: str) -> str:
    """A training document with `planted` inside, chosen to land in split `want`."""
    for i in range(start, start + 200):
        doc = f"{prose[i]} {planted} {prose[i + 1]}"
        if split_of(doc, hash_key(KEY), 0.1) == want:
            return doc
    raise AssertionError("no host document for the wanted split")


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory, prose_texts, tokenizer_dir):
    rng = random.Random(7)
    root = tmp_path_factory.mktemp("audit") / "run"
    mc = [
        {"context": nonsense(rng, 12), "choices": [nonsense(rng, 6), nonsense(rng, 6)], "label": 1},  # 0 planted
        {"context": nonsense(rng, 12), "choices": [nonsense(rng, 6), nonsense(rng, 6)], "label": 0},  # 1 clean
        {"context": nonsense(rng, 12), "choices": [nonsense(rng, 20), nonsense(rng, 6)], "label": 1},  # 2 distractor
        {"context": nonsense(rng, 12), "choices": [nonsense(rng, 6), nonsense(rng, 6)], "label": 0},  # 3 < 13 tokens
        {"context": nonsense(rng, 12), "choices": [nonsense(rng, 6), nonsense(rng, 6)], "label": 0},  # 4 in val
        {"context": "Why?", "choices": ["No.", "Yes."], "label": 0},  # 5 too short to score
        {"context": nonsense(rng, 12), "choices": [nonsense(rng, 6), nonsense(rng, 6)], "label": 1},  # 6 in SFT data
    ]
    gold = [f"{r['context']} {r['choices'][r['label']]}" for r in mc]
    heldout = [[{"role": "user", "content": nonsense(rng, 8)}, {"role": "assistant", "content": nonsense(rng, 16)}]
               for _ in range(3)]
    docs = list(prose_texts[:600])
    docs.append(host_doc(prose_texts, 600, gold[0], "train"))
    docs.append(host_doc(prose_texts, 800, mc[2]["choices"][0], "train"))
    tok = Tokenizer.load(tokenizer_dir)
    words = gold[3].split()
    short = max(k for k in range(1, len(words)) if len(tok.encode(" ".join(words[:k]))) <= 10)
    docs.append(host_doc(prose_texts, 1000, " ".join(words[:short]), "train"))  # fewer than 13 tokens
    docs.append(host_doc(prose_texts, 1200, gold[4], "val"))
    docs.append(host_doc(prose_texts, 1400, heldout[1][1]["content"], "train"))
    corpus = write_jsonl(root.parent / "corpus.jsonl", docs)
    data = prepare_data(DataConfig(sources=[SourceConfig(type="jsonl", path=str(corpus))], selection_key=KEY,
                                   val_fraction=0.1), root / "data")
    shutil.copytree(tokenizer_dir, root / "tokenizer")
    pack_tokens(PackConfig(workers=1, shard_tokens=20_000), data, root / "tokenizer", root / "pack")
    sft = root / "sft" / "data"
    sft.mkdir(parents=True)
    (sft / "heldout.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in heldout))
    (sft / "train.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "Say it."},
                                                             {"role": "assistant", "content": gold[6]}]}) + "\n")
    eval_set = write_jsonl(root.parent / "mc.jsonl", [])
    eval_set.write_text("".join(json.dumps(r) + "\n" for r in mc))
    train_texts = [json.loads(line)["text"] for line in (data / "train.jsonl").read_text().splitlines()]
    return root, eval_set, mc, gold, heldout, train_texts


def test_the_audit_finds_exactly_the_planted_overlaps(planted_run):
    root, eval_set, mc, gold, heldout, train_texts = planted_run
    report = audit_run(root, [eval_set])
    mc_report, held_report = report["sets"]
    assert [s["name"] for s in report["sets"]] == ["mc.jsonl", "sft-heldout"]
    assert mc_report["overlapping_items"] == [0, 2, 6]
    assert (mc_report["items"], mc_report["items_scored"], mc_report["items_too_short"]) == (7, 6, 1)
    assert mc_report["fraction_with_overlap"] == pytest.approx(3 / 6)
    assert held_report["overlapping_items"] == [1] and held_report["fraction_with_overlap"] == pytest.approx(1 / 3)
    worst = {w["item"]: w for w in mc_report["worst"]}
    assert worst[0]["found_in"]["source"] == "pretrain" and worst[6]["found_in"]["source"] == "sft"
    host = next(i for i, t in enumerate(train_texts) if gold[0] in t)
    assert worst[0]["found_in"]["document"] == host  # the line of data/train.jsonl it came from
    assert worst[0]["matched_text"].strip() in gold[0]
    assert worst[2]["overlap"] < worst[0]["overlap"]  # only the distractor's n-grams matched
    pack = read_manifest(root / "pack")
    assert report["training_tokens"]["pretrain"] == pack["train_tokens"] and len(pack["shards"]["train"]) == 3


def test_chunking_and_hash_collisions_do_not_change_the_result(planted_run, monkeypatch):
    root, eval_set, *_ = planted_run
    reference = audit_run(root, [eval_set])
    assert audit_run(root, [eval_set], chunk_tokens=97) == reference  # n-grams across chunk edges are kept
    monkeypatch.setattr(ngrams_module, "MULTIPLIER", np.uint64(1))  # hash = sum of ids: collisions everywhere
    collided = audit_run(root, [eval_set])
    assert [s["overlapping_items"] for s in collided["sets"]] == [[0, 2, 6], [1]]


def test_a_shorter_ngram_catches_the_short_overlap(planted_run):
    root, eval_set, *_ = planted_run
    report = audit_run(root, [eval_set], n=3, sft_heldout=False, include_sft_train=False)
    assert {0, 2, 3}.issubset(report["sets"][0]["overlapping_items"])  # the short plant is > 3 tokens
    assert 6 not in audit_run(root, [eval_set], include_sft_train=False)["sets"][0]["overlapping_items"]


def test_cli_writes_the_report_and_can_fail_a_build(planted_run, tmp_path, capsys):
    root, eval_set, *_ = planted_run
    assert main(["audit", str(root), "--eval-sets", str(eval_set), "--out", str(tmp_path / "a"),
                 "--fail-above", "0.9"]) == 0
    report = json.loads((tmp_path / "a" / "contamination.json").read_text())
    assert report["sets"][0]["items_with_overlap"] == 3
    assert "| mc.jsonl | 7 | 6 | 3 | 50.00% |" in (tmp_path / "a" / "contamination.md").read_text()
    assert main(["audit", str(root), "--eval-sets", str(eval_set), "--out", str(tmp_path / "b"),
                 "--fail-above", "0.1"]) == 1
    assert "50.00%" in capsys.readouterr().out


def test_ngram_hashes_are_equal_exactly_for_equal_ngrams():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50, size=5000)
    h = ngram_hashes(ids, 4)
    assert h.dtype == np.uint64 and len(h) == 4997 and len(ngram_hashes(ids[:3], 4)) == 0
    grams = {}
    for i in range(len(h)):
        grams.setdefault(tuple(ids[i:i + 4]), set()).add(int(h[i]))
    assert all(len(v) == 1 for v in grams.values())  # the same n-gram always hashes the same
    assert len({next(iter(v)) for v in grams.values()}) == len(grams)  # and distinct ones differ here


def test_cloze_and_text_rows_are_items(tmp_path):
    path = tmp_path / "set.jsonl"
    path.write_text('{"context": "Use len to count the items in a", "continuation": " list"}\n{"text": "Plain."}\n')
    assert [i.segments for i in read_eval_set(path)] == [["Use len to count the items in a list"], ["Plain."]]


@pytest.mark.parametrize("row, message", [
    ('{"context": "a", "choices": ["b"], "label": 3}', r"bad\.jsonl:2: 'label' must be an index into the 1 choices"),
    ('{"question": "a"}', r"bad\.jsonl:2: expected a multiple-choice row \(context, choices, label\)"),
    ('{"context": 1, "choices": []', r"bad\.jsonl:2: not valid JSON"),
])
def test_a_malformed_eval_row_names_file_and_line(tmp_path, row, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n' + row + "\n")
    with pytest.raises(DataError, match=message):
        read_eval_set(path)
