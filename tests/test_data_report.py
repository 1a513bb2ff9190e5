"""data/report.py: the data report the pack stage writes (counts, drops and why, tokens, bytes per
token, a document length histogram PNG), from the two manifests alone."""
from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest

from helpers import fineweb_rows, write_shard
from llm_maker.artifacts import read_manifest
from llm_maker.cli import main
from llm_maker.data.report import build_data_report, histogram_quantile, write_data_report
from llm_maker.data.stage import prepare_data
from llm_maker.pack.packer import pack_tokens
from llm_maker.pack.shards import LENGTH_EDGES, load_split
from llm_maker.recipe import DataConfig, FineWebFilters, PackConfig, SourceConfig


@pytest.fixture(scope="module")
def fineweb_run(tmp_path_factory, prose_texts, tokenizer_dir):
    """A run on two FineWeb-Edu shards with filters, 5 exact duplicates and 3 blank documents."""
    root = tmp_path_factory.mktemp("report") / "run"
    texts = prose_texts[:900] + prose_texts[:5] + ["   "] * 3
    scores = [2.6 + (i % 8) * 0.3 for i in range(len(texts))]
    lang = [0.4 if i % 11 == 0 else 0.96 for i in range(len(texts))]
    half = len(texts) // 2
    write_shard(root.parent / "fw" / "000_00000.parquet", fineweb_rows(texts[:half], scores[:half], lang[:half]))
    write_shard(root.parent / "fw" / "001_00000.parquet", fineweb_rows(texts[half:], scores[half:], lang[half:]))
    source = SourceConfig(type="fineweb-edu", path=str(root.parent / "fw"),
                          filters=FineWebFilters(min_int_score=3, min_language_score=0.5))
    data = prepare_data(DataConfig(sources=[source], val_fraction=0.1, min_chars=2), root / "data")
    shutil.copytree(tokenizer_dir, root / "tokenizer")
    pack_tokens(PackConfig(workers=1, shard_tokens=30_000), data, root / "tokenizer", root / "pack")
    return root, texts, scores, lang


def test_pack_writes_the_report_with_every_drop_and_its_reason(fineweb_run):
    root, texts, scores, lang = fineweb_run
    report = json.loads((root / "pack" / "data_report.json").read_text())
    n_score = sum(1 for s in scores if round(s) < 3)
    n_lang = sum(1 for s, ls in zip(scores, lang, strict=False) if round(s) >= 3 and ls < 0.5)
    passed = [i for i in range(len(texts)) if round(scores[i]) >= 3 and lang[i] >= 0.5]
    blanks = sum(1 for i in passed if not texts[i].strip())
    dupes = len(passed) - blanks - len({texts[i] for i in passed if texts[i].strip()})
    assert report["rows_seen"] == len(texts)
    assert report["sources"][0]["dropped_by_source"] == {"min_int_score": n_score, "min_language_score": n_lang}
    assert report["sources"][0]["files"] == 2
    assert report["dropped"]["source filter min_int_score"] == n_score
    assert report["dropped"]["shorter than data.min_chars"] == blanks == 3
    assert report["dropped"]["exact duplicate of a kept document"] == dupes > 0
    kept = report["documents_kept"]["train"] + report["documents_kept"]["val"]
    assert kept == len(passed) - blanks - dupes
    pack = read_manifest(root / "pack")
    assert report["tokens"] == {"train": pack["train_tokens"], "val": pack["val_tokens"]}
    assert report["shards"]["train"] == len(pack["shards"]["train"]) > 1
    assert report["bytes_per_token"] == pack["bytes_per_token"]


def test_length_figures_agree_with_the_tokens(fineweb_run):
    root, *_ = fineweb_run
    report = json.loads((root / "pack" / "data_report.json").read_text())
    tokens = np.asarray(load_split(root / "pack", "train"))
    eos = read_manifest(root / "pack")["eos_id"]
    ends = np.flatnonzero(tokens == eos)
    lengths = np.diff(np.concatenate([[-1], ends])) - 1  # text tokens of each document
    d = report["doc_length_tokens"]["train"]
    assert d["mean"] == pytest.approx(lengths.mean(), abs=0.05) and d["max"] == lengths.max()
    median_bin = np.searchsorted(LENGTH_EDGES, np.median(lengths), side="right") - 1
    assert d["median_at_least"] == LENGTH_EDGES[median_bin]
    png = (root / "pack" / "doc_lengths.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    md = (root / "pack" / "data_report.md").read_text()
    assert "![document lengths](doc_lengths.png)" in md and "| dropped: source filter min_int_score |" in md


def test_histogram_quantile():
    edges = [0, 1, 2, 4, 8]
    assert histogram_quantile(edges, [0, 0, 5, 5, 0], 0.5) == 2
    assert histogram_quantile(edges, [0, 0, 5, 5, 0], 0.6) == 4
    assert histogram_quantile(edges, [0, 0, 0, 0, 0], 0.5) is None


def test_cli_rewrites_the_report_and_works_without_matplotlib(fineweb_run, tmp_path, capsys, monkeypatch):
    root, *_ = fineweb_run
    assert main(["data-report", str(root), "--out", str(tmp_path / "r")]) == 0
    assert "# Data report" in capsys.readouterr().out
    assert json.loads((tmp_path / "r" / "data_report.json").read_text()) == json.loads(
        (root / "pack" / "data_report.json").read_text())
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails
    write_data_report(read_manifest(root / "data"), read_manifest(root / "pack"), tmp_path / "noplot")
    assert "(no length plot: matplotlib is not installed)" in (tmp_path / "noplot" / "data_report.md").read_text()
    assert not (tmp_path / "noplot" / "doc_lengths.png").exists()


def test_report_of_a_legacy_run_without_histograms_still_builds(fineweb_run, tmp_path):
    root, *_ = fineweb_run
    pack = read_manifest(root / "pack")
    for key in ("doc_length", "shards"):
        pack.pop(key)
    report = build_data_report(read_manifest(root / "data"), pack)
    assert report["doc_length_tokens"]["train"]["median_at_least"] is None and report["tokens"]["train"] > 0
    write_data_report(read_manifest(root / "data"), pack, tmp_path)
    assert "(no length plot: the pack manifest has no length histogram" in (tmp_path / "data_report.md").read_text()
