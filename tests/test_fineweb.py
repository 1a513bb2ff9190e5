"""data/fineweb.py: FineWeb-Edu shards read from a folder or downloaded from a (fake, local) hub,
filtered on the dataset's columns, with a clear error for every bad shard and for no network.

The hub is a real HTTP server on 127.0.0.1 in the hub's URL layout (listing, HEAD, ranged GET):
huggingface_hub's own client does the downloading, nothing above the HTTP boundary is stubbed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional
from urllib.parse import unquote, urlparse

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import fineweb_rows, write_shard
from llm_maker.data import fineweb
from llm_maker.data.stage import iter_documents, prepare_data
from llm_maker.errors import DataError, RecipeError
from llm_maker.recipe import DataConfig, FineWebFilters, SourceConfig, recipe_from_dict

needs_hub = pytest.mark.skipif(importlib.util.find_spec("huggingface_hub") is None,
                               reason="huggingface_hub is not installed (pip install 'llm-maker[data]')")

COMMIT = "0123456789abcdef0123456789abcdef01234567"
def shard_bytes(table: pa.Table, tmp_path: Path, name: str) -> bytes:
    return write_shard(tmp_path / "src" / name, table).read_bytes()


class FakeHub:
    """Serve `files` ({repo path: bytes}) of dataset `repo_id` at http://127.0.0.1:PORT.

    `drop_first_get_after`: the first GET of each file sends only this many bytes of the body,
    then hangs up. `wrong_bytes`: paths served with one byte flipped (same size, other hash).
    `requests` records (method, path, Range header)."""

    def __init__(self, repo_id: str, files: dict[str, bytes], drop_first_get_after: Optional[int] = None,
                 wrong_bytes: tuple[str, ...] = ()):
        self.repo_id, self.files = repo_id, files
        self.drop_first_get_after, self.wrong_bytes = drop_first_get_after, wrong_bytes
        self.requests: list[tuple[str, str, Optional[str]]] = []
        self._dropped: set[str] = set()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                hub.handle(self, head=False)

            def do_HEAD(self):
                hub.handle(self, head=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def file_gets(self) -> list[tuple[str, Optional[str]]]:
        return [(p.rsplit("/", 1)[-1], r) for m, p, r in self.requests if m == "GET" and "/resolve/" in p]

    def listing(self, folder: str) -> list[dict]:
        return [{"type": "file", "path": path, "size": len(data),
                 "oid": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest(),
                 "lfs": {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}}
                for path, data in sorted(self.files.items()) if path.startswith(folder + "/")]

    @staticmethod
    def send(h, status: int, body: bytes, headers: dict, head: bool, length: Optional[int] = None) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body) if length is None else length))
        h.end_headers()
        if not head:
            h.wfile.write(body)

    def handle(self, h, head: bool) -> None:
        path = unquote(urlparse(h.path).path)
        self.requests.append(("HEAD" if head else "GET", path, h.headers.get("Range")))
        tree, resolve = f"/api/datasets/{self.repo_id}/tree/", f"/datasets/{self.repo_id}/resolve/"
        if path.startswith(tree):
            listing = self.listing(path[len(tree):].split("/", 1)[1])
            if not listing:
                return self.send(h, 404, b'{"error":"Entry not found"}', {"X-Error-Code": "EntryNotFound"}, head)
            return self.send(h, 200, json.dumps(listing).encode(), {"Content-Type": "application/json"}, head)
        name = path[len(resolve):].split("/", 1)[1] if path.startswith(resolve) else None
        if name not in self.files:
            return self.send(h, 404, b"not found", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT}, head)
        data = self.files[name]
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(data).hexdigest()}"', "Accept-Ranges": "bytes"}
        if name in self.wrong_bytes:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        start = int(h.headers["Range"].split("=")[1].split("-")[0]) if h.headers.get("Range") else 0
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        if not head and self.drop_first_get_after is not None and name not in self._dropped:
            self._dropped.add(name)  # promise the whole body, send part of it, hang up
            h.close_connection = True
            return self.send(h, 200, body[: self.drop_first_get_after], headers, head, length=len(body))
        self.send(h, 206 if start else 200, body, headers, head)


def hub_source(tmp_path: Path, **kw) -> SourceConfig:
    return SourceConfig(type="fineweb-edu", cache_dir=str(tmp_path / "cache"), **kw)


def local_source(folder: Path, **filters) -> SourceConfig:
    """A fineweb-edu source reading `folder`, with these row filters (FineWebFilters' fields)."""
    return SourceConfig(type="fineweb-edu", path=str(folder), filters=FineWebFilters(**filters) if filters else None)


@pytest.fixture
def three_shards(tmp_path, prose_texts):
    """Three shards of sample/10BT as bytes, rows with scores 2.6 .. 4.9."""
    files = {}
    for i in range(3):
        texts = prose_texts[i * 40:(i + 1) * 40]
        scores = [2.6 + (j % 10) * 0.25 for j in range(len(texts))]
        files[f"sample/10BT/{i:03d}_00000.parquet"] = shard_bytes(fineweb_rows(texts, scores), tmp_path, f"{i}.parquet")
    return files


# --------------------------------------------------------------------------------------
# Reading a local folder: the filters, their counts, the data stage
# --------------------------------------------------------------------------------------

def test_local_shards_are_filtered_on_the_datasets_columns(tmp_path, prose_texts):
    texts = prose_texts[:300]
    scores = [2.5 + (i % 6) * 0.5 for i in range(300)]  # 2.5 .. 5.0, int_score 2 .. 5
    lang = [0.5 if i % 7 == 0 else 0.97 for i in range(300)]
    tokens = [50 + i for i in range(300)]
    fw = tmp_path / "fw"
    write_shard(fw / "000_00000.parquet", fineweb_rows(texts[:150], scores[:150], lang[:150], tokens[:150]))
    write_shard(fw / "001_00000.parquet", fineweb_rows(texts[150:], scores[150:], lang[150:], tokens[150:]))
    source = local_source(tmp_path / "fw", min_int_score=4, min_language_score=0.9, max_token_count=320)
    dropped = Counter()
    docs = list(iter_documents(source, dropped))
    keep = [i for i in range(300) if round(scores[i]) >= 4 and lang[i] >= 0.9 and tokens[i] <= 320]
    assert [d.text for d in docs] == [texts[i] for i in keep]
    assert docs[-1].doc_id == f"001_00000.parquet:{keep[-1] - 150}"
    failed_score = [i for i in range(300) if round(scores[i]) < 4]
    failed_lang = [i for i in range(300) if i not in failed_score and lang[i] < 0.9]
    failed_len = [i for i in range(300) if i not in failed_score + failed_lang and tokens[i] > 320]
    assert dropped == Counter(min_int_score=len(failed_score), min_language_score=len(failed_lang),
                              max_token_count=len(failed_len))
    assert len(keep) + sum(dropped.values()) == 300


def test_data_stage_reads_fineweb_and_records_filters_and_hashes(tmp_path, prose_texts):
    shard = write_shard(tmp_path / "fw" / "000_00000.parquet",
                        fineweb_rows(prose_texts[:200], [3.0 + (i % 3) for i in range(200)]))
    cfg = DataConfig(sources=[local_source(tmp_path / "fw", min_score=3.5)],
                     val_fraction=0.1)
    out = prepare_data(cfg, tmp_path / "data")
    manifest = json.loads((out / "manifest.json").read_text())
    source = manifest["sources"][0]
    assert source["dropped_by_source"] == {"min_score": len(range(0, 200, 3))}
    assert source["documents_read"] == 200 - len(range(0, 200, 3)) == manifest["counts"]["read"]
    assert source["files"] == [{"path": str(shard), "bytes": shard.stat().st_size,
                                "sha256": hashlib.sha256(shard.read_bytes()).hexdigest()}]


def test_null_texts_and_null_scores_are_dropped_and_counted(tmp_path, prose_texts):
    table = fineweb_rows(prose_texts[:6], [3.5] * 6)
    table = table.set_column(0, "text", pa.array(prose_texts[:2] + [None] + prose_texts[3:6], pa.string()))
    table = table.set_column(9, "score", pa.array([3.5, None, 3.5, 3.5, 3.5, 3.5], pa.float64()))
    write_shard(tmp_path / "fw" / "a.parquet", table)
    dropped = Counter()
    docs = list(iter_documents(local_source(tmp_path / "fw", min_score=3.0), dropped))
    assert [d.doc_id for d in docs] == ["a.parquet:0", "a.parquet:3", "a.parquet:4", "a.parquet:5"]
    assert dropped == Counter(min_score=1, null_text=1)


def test_filters_that_drop_everything_say_so(tmp_path, prose_texts):
    write_shard(tmp_path / "fw" / "a.parquet", fineweb_rows(prose_texts[:20], [3.0] * 20))
    cfg = DataConfig(sources=[local_source(tmp_path / "fw", min_int_score=5)])
    with pytest.raises(DataError, match=r"no documents left from fineweb-edu:.*\(20 rows failed min_int_score, read 0"):
        prepare_data(cfg, tmp_path / "data")


# --------------------------------------------------------------------------------------
# Bad shards: a clear error naming the file, and no output that looks complete
# --------------------------------------------------------------------------------------

def _bad_shard(kind: str, folder: Path, prose_texts: list[str]) -> Path:
    good = fineweb_rows(prose_texts[:300], [3.2] * 300)
    path = folder / "001_00000.parquet"
    if kind == "truncated":
        data = write_shard(folder / "tmp.parquet", good).read_bytes()
        (folder / "tmp.parquet").unlink()
        path.write_bytes(data[: len(data) * 2 // 3])
    elif kind == "missing_text":
        write_shard(path, good.drop_columns(["text"]))
    elif kind == "text_not_string":
        write_shard(path, good.set_column(0, "text", pa.array(range(300), pa.int64())))
    elif kind == "score_not_numeric":
        write_shard(path, good.set_column(9, "score", pa.array(["high"] * 300)))
    elif kind == "empty":
        write_shard(path, good.slice(0, 0))
    elif kind == "zero_bytes":
        path.write_bytes(b"")
    return path


@pytest.mark.parametrize("kind, message", [
    ("truncated", r"001_00000\.parquet: unreadable parquet file, truncated or not parquet"),
    ("zero_bytes", r"001_00000\.parquet: unreadable parquet file"),
    ("missing_text", r"001_00000\.parquet: no column 'text'; columns are: id, dump, url, date"),
    ("text_not_string", r"001_00000\.parquet: column 'text' must hold strings, has type int64"),
    ("score_not_numeric", r"001_00000\.parquet: column 'score' must be numeric for min_score, has type string"),
    ("empty", r"001_00000\.parquet: an empty shard \(0 rows\)"),
])
def test_a_bad_shard_is_a_clear_error_and_leaves_earlier_data_intact(tmp_path, prose_texts, kind, message):
    folder = tmp_path / "fw"
    write_shard(folder / "000_00000.parquet", fineweb_rows(prose_texts[300:500], [3.6] * 200))
    source = local_source(folder, min_score=3.0)
    before = prepare_data(DataConfig(sources=[source], val_fraction=0.1), tmp_path / "data")
    snapshot = {p.name: p.read_bytes() for p in before.iterdir()}
    _bad_shard(kind, folder, prose_texts)
    with pytest.raises(DataError, match=message):
        prepare_data(DataConfig(sources=[source], val_fraction=0.1), tmp_path / "data")
    assert {p.name: p.read_bytes() for p in (tmp_path / "data").iterdir()} == snapshot
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "fw"]  # no temporary folder left


def test_an_empty_folder_is_an_error(tmp_path):
    (tmp_path / "fw").mkdir()
    with pytest.raises(DataError, match=r"fw: no \*\.parquet files in this fineweb-edu folder"):
        list(iter_documents(local_source(tmp_path / "fw")))


# --------------------------------------------------------------------------------------
# Download through huggingface_hub from a local hub
# --------------------------------------------------------------------------------------

@needs_hub
def test_download_verifies_skips_complete_files_and_refetches_a_missing_one(tmp_path, three_shards):
    source = hub_source(tmp_path, max_files=2)
    with FakeHub(fineweb.DEFAULT_REPO, three_shards) as hub:
        paths = fineweb.download_shards(source, endpoint=hub.endpoint)
        root = tmp_path / "cache" / "HuggingFaceFW--fineweb-edu"
        assert paths == [root / "sample/10BT/000_00000.parquet", root / "sample/10BT/001_00000.parquet"]
        assert [p.read_bytes() for p in paths] == [three_shards[f"sample/10BT/{i:03d}_00000.parquet"] for i in range(2)]
        assert [name for name, _ in hub.file_gets()] == ["000_00000.parquet", "001_00000.parquet"]
        index = json.loads((root / fineweb.INDEX_FILE).read_text())
        assert index["verified"]["sample/10BT/000_00000.parquet"]["sha256"] == hashlib.sha256(
            three_shards["sample/10BT/000_00000.parquet"]).hexdigest()

        hub.requests.clear()
        assert fineweb.download_shards(source, endpoint=hub.endpoint) == paths
        assert hub.file_gets() == [] and [m for m, _, _ in hub.requests] == ["GET"]  # the listing only

        paths[1].unlink()
        fineweb.download_shards(source, endpoint=hub.endpoint)
        assert [name for name, _ in hub.file_gets()] == ["001_00000.parquet"]
        assert paths[1].read_bytes() == three_shards["sample/10BT/001_00000.parquet"]


@needs_hub
def test_a_dropped_connection_resumes_with_a_range_request(tmp_path):
    """huggingface_hub writes 10 MiB chunks: a shard of ~12 MB dropped after the first chunk
    continues from byte 10 MiB instead of starting over."""
    import os

    from huggingface_hub.constants import DOWNLOAD_CHUNK_SIZE

    texts = [os.urandom(3000).hex() for _ in range(2000)]  # incompressible: ~12 MB of parquet
    table = fineweb_rows(texts, [3.5] * len(texts))
    path = tmp_path / "src.parquet"
    pq.write_table(table, path, compression="none")
    files = {"sample/10BT/000_00000.parquet": path.read_bytes()}
    assert len(files["sample/10BT/000_00000.parquet"]) > DOWNLOAD_CHUNK_SIZE + 1000
    with FakeHub(fineweb.DEFAULT_REPO, files, drop_first_get_after=DOWNLOAD_CHUNK_SIZE + 1000) as hub:
        paths = fineweb.download_shards(hub_source(tmp_path), endpoint=hub.endpoint)
    assert paths[0].read_bytes() == files["sample/10BT/000_00000.parquet"]
    assert hub.file_gets() == [("000_00000.parquet", None), ("000_00000.parquet", f"bytes={DOWNLOAD_CHUNK_SIZE}-")]


@needs_hub
def test_a_file_whose_hash_differs_is_deleted_and_reported(tmp_path, three_shards):
    bad = "sample/10BT/001_00000.parquet"
    with FakeHub(fineweb.DEFAULT_REPO, three_shards, wrong_bytes=(bad,)) as hub:
        with pytest.raises(DataError, match=r"001_00000\.parquet: size or SHA-256 differs from the hub's listing"):
            fineweb.download_shards(hub_source(tmp_path), endpoint=hub.endpoint)
    root = tmp_path / "cache" / "HuggingFaceFW--fineweb-edu"
    assert not (root / bad).exists() and (root / "sample/10BT/000_00000.parquet").is_file()
    assert list(json.loads((root / fineweb.INDEX_FILE).read_text())["verified"]) == ["sample/10BT/000_00000.parquet"]


@needs_hub
def test_the_data_stage_downloads_then_reads_the_shards(tmp_path, three_shards, monkeypatch):
    with FakeHub(fineweb.DEFAULT_REPO, three_shards) as hub:
        real = fineweb.download_shards  # the stage calls it without an endpoint: point it at the local hub
        monkeypatch.setattr(fineweb, "download_shards", lambda s, endpoint=None: real(s, endpoint=hub.endpoint))
        cfg = DataConfig(sources=[hub_source(tmp_path, filters=FineWebFilters(min_int_score=4))], val_fraction=0.1)
        out = prepare_data(cfg, tmp_path / "data")
    manifest = json.loads((out / "manifest.json").read_text())
    kept_per_shard = sum(1 for j in range(40) if round(2.6 + (j % 10) * 0.25) >= 4)
    assert manifest["counts"]["read"] == 3 * kept_per_shard
    assert [Path(f["path"]).name for f in manifest["sources"][0]["files"]] == [
        "000_00000.parquet", "001_00000.parquet", "002_00000.parquet"]


@needs_hub
def test_offline_without_shards_gives_the_exact_command(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    source = hub_source(tmp_path, config="sample-100BT")
    root = tmp_path / "cache" / "HuggingFaceFW--fineweb-edu"
    command = (f"hf download HuggingFaceFW/fineweb-edu --repo-type dataset --revision main "
               f"--include 'sample/100BT/*' --local-dir {root}")
    with pytest.raises(DataError) as e:
        fineweb.download_shards(source)
    assert "cannot reach the Hugging Face Hub to list HuggingFaceFW/fineweb-edu (sample/100BT/)" in str(e.value)
    assert command in str(e.value) and fineweb.manual_command(source) == command


@needs_hub
def test_unreachable_hub_is_the_same_clear_error(tmp_path, monkeypatch):
    import socket

    import huggingface_hub.utils._http as hub_http

    monkeypatch.setattr(hub_http.time, "sleep", lambda s: None)  # huggingface_hub retries with backoff
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DataError, match=r"cannot reach the Hugging Face Hub .*ConnectError.*\n.*\n  hf download"):
        fineweb.download_shards(hub_source(tmp_path), endpoint=f"http://127.0.0.1:{port}")


@needs_hub
def test_offline_with_complete_shards_uses_them(tmp_path, three_shards, monkeypatch):
    import huggingface_hub.constants

    source = hub_source(tmp_path)
    with FakeHub(fineweb.DEFAULT_REPO, three_shards) as hub:
        online = fineweb.download_shards(source, endpoint=hub.endpoint)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert fineweb.download_shards(source) == online
    online[2].write_bytes(b"changed")  # one shard no longer complete: offline cannot repair it
    with pytest.raises(DataError, match="hf download"):
        fineweb.download_shards(source)


@needs_hub
def test_an_unknown_config_folder_is_named(tmp_path, three_shards):
    with FakeHub(fineweb.DEFAULT_REPO, three_shards) as hub:
        with pytest.raises(DataError, match=r"has no folder sample/350BT/ for config 'sample-350BT'"):
            fineweb.download_shards(hub_source(tmp_path, config="sample-350BT"), endpoint=hub.endpoint)


# --------------------------------------------------------------------------------------
# Recipe checks
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("source, message", [
    ({"type": "fineweb-edu", "filters": {"min_int_score": 2}},
     r"`data.sources\[0\].filters.min_int_score` is 2, but HuggingFaceFW/fineweb-edu holds only rows with "
     r"int_score >= 3; set repo_id: HuggingFaceFW/fineweb-edu-score-2"),
    ({"type": "fineweb-edu", "config": "sample-10B"}, r"`data.sources\[0\].config` must be sample-NBT"),
    ({"type": "fineweb-edu", "filters": {"min_language_score": 1.5}},
     r"`data.sources\[0\].filters.min_language_score` must be in \[0, 1\]"),
    ({"type": "fineweb-edu", "filters": {"min_token_count": 500, "max_token_count": 100}},
     r"`data.sources\[0\].filters.min_token_count` 500 is above max_token_count 100"),
    ({"type": "builtin", "filters": {"min_score": 3.0}},
     r"`data.sources\[0\].filters.min_score` applies only to fineweb-edu sources"),
    ({"type": "builtin", "max_files": 2}, r"`data.sources\[0\].max_files` applies only to fineweb-edu sources"),
    ({"type": "fineweb-edu", "filters": {"min_scor": 3.0}}, r"unknown key `data.sources\[0\].filters.min_scor`"),
])
def test_recipe_rejects_impossible_fineweb_settings(source, message):
    with pytest.raises(RecipeError, match=message):
        recipe_from_dict({"data": {"sources": [source]}}, recipe_file="r.yaml")


def test_recipe_accepts_a_score_2_threshold_on_the_score_2_repo():
    r = recipe_from_dict({"data": {"sources": [{"type": "fineweb-edu", "repo_id": fineweb.SCORE_2_REPO,
                                                "filters": {"min_int_score": 2}, "config": "CC-MAIN-2024-10"}]}})
    assert fineweb.config_folder(r.data.sources[0].config) == "data/CC-MAIN-2024-10"
    assert fineweb.config_folder("sample-100BT") == "sample/100BT" and fineweb.config_folder("default") == "data"


def test_every_recipe_filter_has_a_column():
    assert list(fineweb.FILTERS) == [f.name for f in dataclasses.fields(FineWebFilters)]
