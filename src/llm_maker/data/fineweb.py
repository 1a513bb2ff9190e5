"""FineWeb-Edu: its parquet shards, downloaded from the Hugging Face Hub or read from a folder,
streamed row batch by row batch and filtered on the dataset's own quality columns.

    HuggingFaceFW/fineweb-edu (a dataset repo)     config          folder in the repo
      ~10B GPT-2 tokens, 14 shards of ~2 GB          sample-10BT     sample/10BT/
      ~100B tokens                                   sample-100BT    sample/100BT/
      one Common Crawl dump                          CC-MAIN-2024-10 data/CC-MAIN-2024-10/
      everything                                     default         data/

Every shard has the columns text, id, dump, url, date, file_path, language (strings),
language_score, score (float64), token_count, int_score (int64). FineWeb-Edu keeps rows whose
classifier score rounds to int_score >= 3; HuggingFaceFW/fineweb-edu-score-2 keeps >= 2, so a
lower threshold needs that repo.

Downloads go through `huggingface_hub` into `cache_dir/<owner>--<name>/` with the repo's own
layout. A shard whose size and SHA-256 match the hub's listing is recorded in an index file and
never fetched or hashed again, so a stopped download resumes at the first missing shard (and
huggingface_hub resumes a dropped connection inside a shard with HTTP Range requests). Offline,
a folder whose index shows every shard complete is used as is; otherwise the error gives the
exact `hf download` command to fetch the shards by hand.
"""
from __future__ import annotations

import importlib
import json
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Optional

from llm_maker.artifacts import atomic_write_json, sha256_file
from llm_maker.data.sources import PARQUET_BATCH_ROWS, Document
from llm_maker.errors import DataError
from llm_maker.recipe import FINEWEB_EDU_REPO, FINEWEB_EDU_SCORE_2_REPO, SourceConfig

DEFAULT_REPO, SCORE_2_REPO = FINEWEB_EDU_REPO, FINEWEB_EDU_SCORE_2_REPO  # named in the recipe, its default
DEFAULT_CACHE_DIR = "~/.cache/llm-maker/hub"
INDEX_FILE = ".llm-maker-files.json"


# FineWeb-Edu's exact schema, as its shards store it
COLUMNS = {"text": "string", "id": "string", "dump": "string", "url": "string", "date": "string",
           "file_path": "string", "language": "string", "language_score": "double",
           "token_count": "int64", "score": "double", "int_score": "int64"}

# filter (a field of the recipe's FineWebFilters) -> (column, keep rows where column OP value);
# a dropped row is counted under the first filter it fails, in this order
FILTERS = {
    "min_score": ("score", ">="),
    "min_int_score": ("int_score", ">="),
    "min_language_score": ("language_score", ">="),
    "min_token_count": ("token_count", ">="),
    "max_token_count": ("token_count", "<="),
}


class RemoteFile(NamedTuple):
    """One file of the hub's listing: its path in the repo, size and hashes."""

    path: str
    size: int
    sha256: Optional[str]  # LFS files (every parquet shard)
    blob_id: str  # git blob sha1: the hash of a small non-LFS file


# --------------------------------------------------------------------------------------
# Small pure helpers
# --------------------------------------------------------------------------------------

def active_filters(source: SourceConfig) -> list[tuple[str, str, str, Any]]:
    """(filter name, column, op, value) of every row filter the source sets (its rules are checked
    by the recipe: FineWebFilters.validate)."""
    active = source.filters.active() if source.filters is not None else {}
    return [(name, col, op, active[name]) for name, (col, op) in FILTERS.items() if name in active]


def config_folder(config: str) -> str:
    """The repo folder of a config: sample-10BT -> sample/10BT, CC-MAIN-2024-10 -> data/CC-MAIN-2024-10."""
    if config == "default":
        return "data"
    match = re.fullmatch(r"sample-(\d+BT)", config)
    return f"sample/{match.group(1)}" if match else f"data/{config}"


def download_root(source: SourceConfig) -> Path:
    return Path(source.cache_dir or DEFAULT_CACHE_DIR).expanduser() / source.repo_id.replace("/", "--")


def manual_command(source: SourceConfig) -> str:
    """The shell command that fetches the same shards by hand, into the folder this module reads."""
    return (f"hf download {source.repo_id} --repo-type dataset --revision {source.revision} "
            f"--include '{config_folder(source.config)}/*' --local-dir {download_root(source)}")


def listing_key(source: SourceConfig) -> str:
    return f"{source.repo_id}@{source.revision}:{config_folder(source.config)}"


# --------------------------------------------------------------------------------------
# Download
# --------------------------------------------------------------------------------------

def _network_errors() -> tuple[type[BaseException], ...]:
    """Exceptions meaning "the hub cannot be reached" (the HTTP client differs across huggingface_hub versions)."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    errors: list[type[BaseException]] = [OfflineModeIsEnabled, LocalEntryNotFoundError, ConnectionError, TimeoutError]
    for module in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(module).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _hub():
    try:
        import huggingface_hub
    except ImportError:
        raise DataError("a fineweb-edu source without `path` downloads with huggingface_hub: "
                        "pip install 'llm-maker[data]' (or set `path` to a folder of its parquet files)") from None
    return huggingface_hub


def list_remote_files(source: SourceConfig, endpoint: Optional[str] = None) -> list[RemoteFile]:
    """The parquet files of the source's config on the hub, sorted by path."""
    hub = _hub()
    from huggingface_hub.hf_api import RepoFile

    entries = hub.HfApi(endpoint=endpoint).list_repo_tree(
        source.repo_id, path_in_repo=config_folder(source.config), recursive=True, repo_type="dataset",
        revision=source.revision)
    files = [RemoteFile(e.path, e.size, e.lfs.sha256 if e.lfs else None, e.blob_id)
             for e in entries if isinstance(e, RepoFile) and e.path.endswith(".parquet")]
    return sorted(files)


def file_matches(path: Path, remote: RemoteFile) -> bool:
    """Size and content hash equal to the hub's (SHA-256 for LFS files, the git blob id otherwise)."""
    from huggingface_hub.utils.sha import git_hash, sha_fileobj

    if not path.is_file() or path.stat().st_size != remote.size:
        return False
    if remote.sha256 is not None:
        with open(path, "rb") as f:
            return sha_fileobj(f).hex() == remote.sha256
    return git_hash(path.read_bytes()) == remote.blob_id


def read_index(root: Path) -> dict[str, Any]:
    path = root / INDEX_FILE
    if not path.is_file():
        return {"listings": {}, "verified": {}}
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        return {"listings": dict(index["listings"]), "verified": dict(index["verified"])}
    except (ValueError, KeyError, TypeError):  # a damaged index only costs a re-hash
        return {"listings": {}, "verified": {}}


def is_verified(index: dict[str, Any], root: Path, remote: RemoteFile) -> bool:
    """The file was verified before and has not changed since (same size and mtime)."""
    entry = index["verified"].get(remote.path)
    path = root / remote.path
    if entry is None or not path.is_file():
        return False
    st = path.stat()
    return (entry.get("sha256") == remote.sha256 and entry.get("blob_id") == remote.blob_id
            and entry.get("size") == st.st_size == remote.size and entry.get("mtime_ns") == st.st_mtime_ns)


def _mark_verified(index: dict[str, Any], root: Path, remote: RemoteFile) -> None:
    st = (root / remote.path).stat()
    index["verified"][remote.path] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": remote.sha256,
                                      "blob_id": remote.blob_id}
    atomic_write_json(root / INDEX_FILE, index)


def _offline_files(source: SourceConfig, root: Path, index: dict[str, Any], cause: BaseException) -> list[RemoteFile]:
    """Offline: the files of the last listing if every one of them is complete, else a clear error."""
    listing = [RemoteFile(*f) for f in index["listings"].get(listing_key(source), [])]
    listing = listing[: source.max_files] if source.max_files else listing
    if listing and all(is_verified(index, root, f) for f in listing):
        print(f"[fineweb-edu] hub unreachable ({type(cause).__name__}); using the {len(listing)} complete "
              f"shards in {root}", file=sys.stderr)
        return listing
    raise DataError(
        f"cannot reach the Hugging Face Hub to list {source.repo_id} ({config_folder(source.config)}/): "
        f"{type(cause).__name__}: {cause}\n"
        f"Fetch the shards by hand on a machine with network access:\n  {manual_command(source)}\n"
        f"then rerun (or set `path: {download_root(source) / config_folder(source.config)}` in the recipe)."
    ) from None


def _listing(source: SourceConfig, root: Path, index: dict[str, Any], endpoint: Optional[str]) -> list[RemoteFile]:
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError

    try:
        files = list_remote_files(source, endpoint)
    except _network_errors() as e:
        return _offline_files(source, root, index, e)
    except RepositoryNotFoundError as e:
        raise DataError(f"dataset {source.repo_id} not found on the hub, or it needs a token "
                        f"(`hf auth login`): {e}") from None
    except EntryNotFoundError:
        raise DataError(f"{source.repo_id} has no folder {config_folder(source.config)}/ for config "
                        f"{source.config!r} at revision {source.revision}") from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status is not None and status >= 500:  # the hub is down: the same as offline
            return _offline_files(source, root, index, e)
        raise DataError(f"listing {source.repo_id} failed: {e}") from None
    if not files:
        raise DataError(f"{source.repo_id} has no parquet files under {config_folder(source.config)}/ "
                        f"(config {source.config!r}, revision {source.revision})")
    index["listings"][listing_key(source)] = [list(f) for f in files]
    return files[: source.max_files] if source.max_files else files


def download_shards(source: SourceConfig, endpoint: Optional[str] = None) -> list[Path]:
    """Fetch the source's shards into download_root(source), skipping verified ones; return their paths.

    `endpoint` is the hub's URL (None: huggingface_hub's default, or HF_ENDPOINT)."""
    hub = _hub()
    root = download_root(source)
    root.mkdir(parents=True, exist_ok=True)
    index = read_index(root)
    files = _listing(source, root, index, endpoint)
    done = 0
    for remote in files:
        if is_verified(index, root, remote):
            done += 1
            continue
        path = root / remote.path
        # a file already in place (e.g. fetched by hand) is hashed once instead of downloaded again
        if not file_matches(path, remote):
            print(f"[fineweb-edu] {remote.path} ({remote.size / 1e9:.2f} GB)", file=sys.stderr)
            try:
                hub.hf_hub_download(source.repo_id, remote.path, repo_type="dataset", revision=source.revision,
                                    local_dir=root, endpoint=endpoint)
            except _network_errors() as e:
                raise DataError(
                    f"download of {source.repo_id}/{remote.path} failed ({type(e).__name__}: {e}); {done} of "
                    f"{len(files)} shards are complete in {root} and are kept: rerun to resume, or fetch by hand:\n"
                    f"  {manual_command(source)}") from None
            if not file_matches(path, remote):
                path.unlink(missing_ok=True)  # never leave a wrong file that looks complete
                raise DataError(f"{path}: size or SHA-256 differs from the hub's listing of {remote.path} "
                                f"({remote.size} bytes, sha256 {remote.sha256}); deleted it, rerun to fetch it again")
        _mark_verified(index, root, remote)
        done += 1
    atomic_write_json(root / INDEX_FILE, index)
    return [root / f.path for f in files]


# --------------------------------------------------------------------------------------
# Reading: schema checks, then row batches filtered on the quality columns
# --------------------------------------------------------------------------------------

def shard_files(source: SourceConfig) -> list[Path]:
    """The parquet shards a fineweb-edu source reads: a local folder's, or the downloaded ones."""
    if source.path is None:
        return download_shards(source)
    root = Path(source.path)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*.parquet") if p.is_file())
    if not files:
        raise DataError(f"{root}: no *.parquet files in this fineweb-edu folder")
    return files


def check_shard(path: Path, source: SourceConfig) -> int:
    """Validate one shard from its footer alone (cheap): readable, rows > 0, the text column a
    string, every filtered column numeric. Returns its row count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        meta = pq.read_metadata(path)
        schema = meta.schema.to_arrow_schema()
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: unreadable parquet file, truncated or not parquet ({e})") from None
    if meta.num_rows == 0:
        raise DataError(f"{path}: an empty shard (0 rows); delete it or fetch it again")
    names = schema.names
    field = source.text_field
    if field not in names:
        raise DataError(f"{path}: no column {field!r}; columns are: {', '.join(names)}")
    if not (pa.types.is_string(schema.field(field).type) or pa.types.is_large_string(schema.field(field).type)):
        raise DataError(f"{path}: column {field!r} must hold strings, has type {schema.field(field).type}")
    for name, column, _, _ in active_filters(source):
        if column not in names:
            raise DataError(f"{path}: no column {column!r}, needed by {name}; columns are: {', '.join(names)}")
        col_type = schema.field(column).type
        if not (pa.types.is_integer(col_type) or pa.types.is_floating(col_type)):
            raise DataError(f"{path}: column {column!r} must be numeric for {name}, has type {col_type}")
    return meta.num_rows


def keep_mask(batch: Any, filters: list[tuple[str, str, str, Any]], dropped: Counter) -> Any:
    """A boolean numpy mask of the rows passing every filter; a dropped row is counted under the
    first filter it fails (a null value fails)."""
    import numpy as np
    import pyarrow.compute as pc

    keep = np.ones(batch.num_rows, dtype=bool)
    for name, column, op, value in filters:
        compare = pc.greater_equal if op == ">=" else pc.less_equal
        ok = pc.fill_null(compare(batch.column(column), value), False).to_numpy(zero_copy_only=False)
        dropped[name] += int(np.count_nonzero(keep & ~ok))
        keep &= ok
    return keep


def iter_fineweb(source: SourceConfig, dropped: Optional[Counter] = None) -> Iterator[Any]:
    """Documents ("<shard>:<row>", text) of the source's shards that pass its filters, in shard order.

    Every shard's footer is checked before the first row is read, so a bad shard fails before
    any work; memory holds one batch of PARQUET_BATCH_ROWS rows of the needed columns only."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    dropped = dropped if dropped is not None else Counter()
    files = shard_files(source)
    for path in files:
        check_shard(path, source)
    filters = active_filters(source)
    columns = [source.text_field] + sorted({column for _, column, _, _ in filters} - {source.text_field})
    base = Path(source.path) if source.path is not None else download_root(source)
    for path in files:
        name = path.name if base.is_file() else path.relative_to(base).as_posix()
        row = 0
        try:
            with pq.ParquetFile(path) as pf:
                for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
                    keep = keep_mask(batch, filters, dropped)
                    texts = batch.column(0).filter(pa.array(keep)).to_pylist()
                    for offset, text in zip(np.flatnonzero(keep).tolist(), texts, strict=False):
                        if text is not None:  # a null cell is an absent document, not an error
                            yield Document(f"{name}:{row + offset}", text)
                        else:
                            dropped["null_text"] += 1
                    row += batch.num_rows
        except (pa.ArrowException, OSError, UnicodeDecodeError) as e:  # a corrupt page past the footer check
            raise DataError(f"{path}: unreadable parquet data after row {row} ({e})") from None


def describe_files(source: SourceConfig) -> list[dict[str, Any]]:
    """Path, size and SHA-256 of each shard (downloaded shards: from the verified index, no re-hash)."""
    if source.path is not None:
        return [{"path": str(p), "bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in shard_files(source)]
    root = download_root(source)
    index = read_index(root)
    out = []
    for rel, entry in sorted(index["verified"].items()):
        if rel.startswith(config_folder(source.config) + "/"):
            out.append({"path": str(root / rel), "bytes": entry["size"], "sha256": entry["sha256"]})
    return out[: source.max_files] if source.max_files else out
