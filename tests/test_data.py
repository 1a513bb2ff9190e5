"""data/: every source format and its errors, the built-in corpus, keyed selection, the stage."""
import json
import os
import random
import re

import pyarrow.parquet as pq
import pytest

from helpers import fineweb_rows, write_jsonl
from llm_maker.artifacts import read_manifest, sha256_file
from llm_maker.data.builtin import builtin_documents, docstrings_of_source
from llm_maker.data.select import SelectionCounts, hash_key, select_documents, select_hash, split_of, unit_hash
from llm_maker.data.sources import Document
from llm_maker.data.stage import iter_documents, prepare_data, source_signature
from llm_maker.errors import DataError
from llm_maker.recipe import DataConfig, SourceConfig


def read(source_type, path, **kw):
    return list(iter_documents(SourceConfig(type=source_type, path=str(path), **kw)))


# --------------------------------------------------------------------------------------
# text
# --------------------------------------------------------------------------------------

def test_text_folder_reads_txt_and_md_recursively_in_sorted_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "two.md").write_text("# Two\nsecond", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first — ünïcode", encoding="utf-8")
    (tmp_path / "c.rst").write_text("not read", encoding="utf-8")
    docs = read("text", tmp_path)
    assert docs == [Document("a.txt", "first — ünïcode"), Document("b/two.md", "# Two\nsecond")]
    assert read("text", tmp_path / "a.txt") == [Document("a.txt", "first — ünïcode")]


def test_text_file_that_is_not_utf8_names_the_file_and_byte_offset(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"hello\xffworld")
    with pytest.raises(DataError, match=r"bad\.txt: not UTF-8 text: byte 0xff at byte offset 5"):
        read("text", tmp_path)


def test_text_folder_without_text_files_is_an_error(tmp_path):
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataError, match=r"no \*\.txt or \*\.md files in this folder"):
        read("text", tmp_path)


# --------------------------------------------------------------------------------------
# jsonl
# --------------------------------------------------------------------------------------

def test_jsonl_reads_the_text_field_and_skips_blank_lines(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"body": "one", "n": 1}\n\n{"body": "two\\nlines"}\n', encoding="utf-8")
    assert read("jsonl", path, text_field="body") == [Document("c.jsonl:1", "one"), Document("c.jsonl:3", "two\nlines")]


@pytest.mark.parametrize("line, message", [
    ('{"txt": "x"}', r"c\.jsonl:2: missing field 'text' \(fields: txt\)"),
    ('{"text": 5}', r"c\.jsonl:2: field 'text' must be a string, got int"),
    ('{"text": "x"', r"c\.jsonl:2: malformed JSON"),
    ('["text"]', r"c\.jsonl:2: expected a JSON object with a 'text' field, got list"),
])
def test_jsonl_errors_name_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=message):
        read("jsonl", path)


def test_source_max_documents_caps_one_source(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [f"doc {i}" for i in range(10)])
    assert [d.text for d in read("jsonl", path, max_documents=3)] == ["doc 0", "doc 1", "doc 2"]


# --------------------------------------------------------------------------------------
# parquet
# --------------------------------------------------------------------------------------

FINEWEB_COLUMNS = ["text", "id", "dump", "url", "date", "file_path", "language", "language_score",
                   "token_count", "score", "int_score"]


def fineweb_table(texts):
    return fineweb_rows(texts)


def test_parquet_with_fineweb_edu_columns_reads_text_in_batches(tmp_path, prose_texts):
    texts = prose_texts[:2500]  # > 2 batches of 1024 rows, several row groups
    table = fineweb_table(texts)
    assert table.column_names == FINEWEB_COLUMNS
    pq.write_table(table, tmp_path / "000_00000.parquet", row_group_size=700)
    docs = read("parquet", tmp_path)
    assert [d.text for d in docs] == texts
    assert docs[1234].doc_id == "000_00000.parquet:1234"


def test_parquet_missing_column_lists_the_columns(tmp_path):
    pq.write_table(fineweb_table(["a", "b"]), tmp_path / "f.parquet")
    with pytest.raises(DataError, match=r"f\.parquet: no column 'content'; columns are: text, id, dump, url"):
        read("parquet", tmp_path / "f.parquet", text_field="content")


def test_parquet_non_string_column_is_an_error(tmp_path):
    pq.write_table(fineweb_table(["a", "b"]), tmp_path / "f.parquet")
    with pytest.raises(DataError, match=r"f\.parquet: column 'score' must hold strings, has type double"):
        read("parquet", tmp_path / "f.parquet", text_field="score")


@pytest.mark.parametrize("keep", [0.5, 0.97])
def test_truncated_parquet_is_a_data_error_naming_the_file(tmp_path, prose_texts, keep):
    good = tmp_path / "good.parquet"
    pq.write_table(fineweb_table(prose_texts[:500]), good, row_group_size=100)
    data = good.read_bytes()
    (tmp_path / "cut.parquet").write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(DataError, match=r"cut\.parquet: unreadable Parquet"):
        read("parquet", tmp_path / "cut.parquet")


def test_corrupt_parquet_pages_are_a_data_error_naming_the_file(tmp_path, prose_texts):
    good = tmp_path / "good.parquet"
    pq.write_table(fineweb_table(prose_texts[:500]), good, row_group_size=100, compression="none",
                   use_dictionary=False)
    data = bytearray(good.read_bytes())
    at = data.find(prose_texts[250][:40].encode())  # inside a text-column page of a middle row group
    assert at > 0
    data[at: at + 64] = b"\xab" * 64  # footer intact, a data page garbled
    (tmp_path / "bad.parquet").write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"bad\.parquet: unreadable Parquet data after row \d+"):
        read("parquet", tmp_path / "bad.parquet")


# --------------------------------------------------------------------------------------
# builtin
# --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def builtin_docs():
    return list(builtin_documents())


def test_builtin_corpus_is_over_1_5m_chars_of_english_prose(builtin_docs):
    text = " ".join(t for _, t in builtin_docs)
    assert len(text) > 1_500_000
    words = [w.lower() for w in re.findall(r"[A-Za-z]+", text)]
    common = {"the", "of", "and", "to", "a", "is", "in", "that", "it", "for", "be", "this", "or", "an", "are"}
    assert sum(w in common for w in words) / len(words) > 0.2  # English prose: ~25%; code: far less
    assert 0.04 < words.count("the") / len(words) < 0.1


def test_builtin_corpus_ids_are_unique_stable_and_skip_tests(builtin_docs):
    ids = [i for i, _ in builtin_docs]
    assert len(ids) == len(set(ids)) > 2000
    assert ids[0].startswith("pydoc:") and "pydoc:if" in ids
    assert "stdlib:json/decoder.py:JSONDecoder.raw_decode" in ids
    assert not [i for i in ids if re.search(r"(^|/)(test|tests|idle_test|lib2to3|site-packages)/", i.split(":")[1])]
    again = iter(builtin_documents())
    assert [next(again)[0] for _ in range(200)] == ids[:200]  # deterministic order


def test_docstrings_of_source_names_nested_and_conditional_definitions():
    src = b'''"""Module doc."""
class A:
    """Class doc."""
    def f(self):
        """Method doc."""
if True:
    def g():
        """Conditional doc."""
'''
    found = [(d.doc_id, d.qualified_name, d.text) for d in docstrings_of_source(src, "pkg/m.py", "pkg.m")]
    assert found == [
        ("stdlib:pkg/m.py:<module>", "pkg.m", "Module doc."),
        ("stdlib:pkg/m.py:A", "pkg.m.A", "Class doc."),
        ("stdlib:pkg/m.py:A.f", "pkg.m.A.f", "Method doc."),
        ("stdlib:pkg/m.py:g", "pkg.m.g", "Conditional doc."),
    ]


# --------------------------------------------------------------------------------------
# selection and split
# --------------------------------------------------------------------------------------

DOCS = [Document(str(i), f"document number {i} " + "x" * (i % 7)) for i in range(3000)]


def selected(docs, **kw):
    return {d.text: split for split, d in select_documents(docs, DataConfig(**kw))}


def test_unit_hash_is_keyed_deterministic_and_in_unit_interval():
    k1, k2 = hash_key("alpha"), hash_key("beta")
    hs = [unit_hash(d.text, k1, b"p") for d in DOCS]
    assert all(0.0 <= h < 1.0 for h in hs)
    assert hs == [unit_hash(d.text, k1, b"p") for d in DOCS]
    assert hs != [unit_hash(d.text, k2, b"p") for d in DOCS]
    assert abs(sum(hs) / len(hs) - 0.5) < 0.03  # uniform
    assert len(hash_key("k" * 100)) == 64  # long keys are hashed down to BLAKE2b's limit


def test_same_key_same_split_regardless_of_order_and_other_key_differs():
    a = selected(DOCS, selection_key="alpha", val_fraction=0.1)
    shuffled = DOCS[:]
    random.Random(0).shuffle(shuffled)
    assert selected(shuffled, selection_key="alpha", val_fraction=0.1) == a
    assert selected(DOCS, selection_key="beta", val_fraction=0.1) != a
    val = sum(s == "val" for s in a.values()) / len(a)
    assert 0.08 < val < 0.12  # 3000 docs: binomial sd ~0.0055


def test_larger_selection_is_a_superset_of_a_smaller_one():
    small, large = selected(DOCS, fraction=0.3), selected(DOCS, fraction=0.6)
    assert set(small) < set(large) and 0.25 < len(small) / len(DOCS) < 0.35
    capped_50 = selected(DOCS, fraction=0.6, max_documents=50)
    capped_100 = selected(DOCS, fraction=0.6, max_documents=100)
    assert len(capped_50) == 50 and len(capped_100) == 100 and set(capped_50) < set(capped_100) < set(large)
    key = hash_key("llm-maker")
    lowest = sorted(large, key=lambda t: select_hash(t, key))[:50]
    assert set(capped_50) == set(lowest)
    assert all(split_of(t, key, 0.05) == s for t, s in capped_50.items())  # split independent of the cap


def test_selection_keeps_input_order_and_counts_drops():
    docs = [Document("a", "alpha text"), Document("b", "  "), Document("c", "beta text"),
            Document("d", "alpha text"), Document("e", "gamma text")]
    counts = SelectionCounts()
    out = list(select_documents(docs, DataConfig(min_chars=3, val_fraction=0.5), counts))
    assert [d.doc_id for _, d in out] == ["a", "c", "e"]
    assert (counts.read, counts.too_short, counts.duplicate, counts.kept) == (5, 1, 1, 3)
    counts = SelectionCounts()
    out = list(select_documents(docs, DataConfig(min_chars=3, max_documents=2), counts))
    assert [d.doc_id for _, d in out] == sorted(d.doc_id for _, d in out)  # input order, not hash order
    assert (counts.kept, counts.over_max_documents) == (2, 1)


# --------------------------------------------------------------------------------------
# the stage
# --------------------------------------------------------------------------------------

def jsonl_config(path, **kw):
    return DataConfig(sources=[SourceConfig(type="jsonl", path=str(path))], **{"val_fraction": 0.1, **kw})


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_prepare_data_writes_splits_and_manifest(data_dir, prose_texts, prose_jsonl):
    train, val = read_jsonl(data_dir / "train.jsonl"), read_jsonl(data_dir / "val.jsonl")
    m = read_manifest(data_dir)
    c = m["counts"]
    assert (c["train_docs"], c["val_docs"]) == (len(train), len(val))
    assert c["kept"] + c["duplicate"] + c["too_short"] + c["not_selected"] == c["read"] == len(prose_texts)
    assert c["train_chars"] == sum(len(r["text"]) for r in train)
    assert 0.07 < len(val) / c["kept"] < 0.13
    assert {r["text"] for r in train + val} == set(prose_texts)  # every distinct paragraph, once
    assert train[0] == {"id": "prose.jsonl:1", "text": prose_texts[0]} or val[0]["id"] == "prose.jsonl:1"
    (src,) = m["sources"]
    assert src["files"] == [{"path": str(prose_jsonl), "bytes": prose_jsonl.stat().st_size,
                             "sha256": sha256_file(prose_jsonl)}]


def test_prepare_data_skips_when_unchanged_and_reruns_when_a_source_changes(tmp_path, prose_texts):
    src = write_jsonl(tmp_path / "c.jsonl", prose_texts[:300])
    cfg, out = jsonl_config(src), tmp_path / "data"
    prepare_data(cfg, out)
    first = read_manifest(out)["created_unix"]
    prepare_data(cfg, out)
    assert read_manifest(out)["created_unix"] == first  # skipped
    sig = source_signature(cfg)
    write_jsonl(src, prose_texts[:200])
    os.utime(src, ns=(1, 1))  # a new mtime even on a coarse-clock filesystem
    assert source_signature(cfg) != sig
    prepare_data(cfg, out)
    assert read_manifest(out)["counts"]["read"] == 200
    prepare_data(cfg, out, force=True)
    assert read_manifest(out)["created_unix"] > first


def test_empty_corpus_is_an_error_and_leaves_earlier_data_intact(tmp_path, prose_texts):
    src = write_jsonl(tmp_path / "c.jsonl", prose_texts[:300])
    out = prepare_data(jsonl_config(src), tmp_path / "data")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(DataError, match=rf"no documents left from jsonl:{re.escape(str(src))} \(read 300, "
                                        r"dropped 300 shorter than data.min_chars=100000"):
        prepare_data(jsonl_config(src, min_chars=100_000), out)
    with pytest.raises(DataError, match=r"the val split is empty: 3 documents kept .* data.val_fraction=0.001"):
        prepare_data(jsonl_config(src, max_documents=3, val_fraction=0.001), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


def test_a_bad_line_in_a_later_source_leaves_earlier_data_intact(tmp_path, prose_texts):
    good = write_jsonl(tmp_path / "good.jsonl", prose_texts[:300])
    out = prepare_data(jsonl_config(good), tmp_path / "data")
    before = (out / "train.jsonl").read_bytes()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": null}\n', encoding="utf-8")
    cfg = DataConfig(sources=[SourceConfig(type="jsonl", path=str(good)), SourceConfig(type="jsonl", path=str(bad))],
                     val_fraction=0.1)
    with pytest.raises(DataError, match=r"bad\.jsonl:2: field 'text' must be a string, got NoneType"):
        prepare_data(cfg, out)
    assert (out / "train.jsonl").read_bytes() == before
