"""Artifacts connect stages: atomic writes, content hashes and small JSON manifests.

Every stage writes a directory holding its outputs and a `manifest.json` with its inputs,
config, hashes and versions. The manifest is written last, so its presence means the stage
finished; its `fingerprint` (a hash of the stage config and input fingerprints) tells the
pipeline whether the stage can be skipped.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Iterator, Optional

from llm_maker import __version__
from llm_maker.errors import DataError, LLMMakerError

MANIFEST = "manifest.json"
METRICS = "metrics.csv"  # a training stage's log: one row per logged step (train/trainer.py writes it)


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, fsync it, then rename over `path`. The file
    gets the user's umask like any other (mkstemp alone makes it owner-only: 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` for a writer that wants a filename; rename on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success rename it to `path` in one step.

    A crash leaves only a `.tmp-*` directory, which readers ignore, never a partial `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".tmp-{path.name}-"))
    tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes it owner-only; a run dir is for sharing
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts (configs, upstream fingerprints)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def versions() -> dict[str, str]:
    """Installed versions, read from package metadata (importing torch just for this costs ~2 s)."""
    found = {"llm_maker": __version__, "python": platform.python_version()}
    for name in ("torch", "numpy", "tokenizers"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def write_manifest(stage_dir: str | Path, stage: str, fingerprint_: str, **fields: Any) -> dict[str, Any]:
    """Write `stage_dir/manifest.json` atomically; call it last, once all outputs exist."""
    manifest = {
        "stage": stage,
        "fingerprint": fingerprint_,
        "created_unix": time.time(),
        "versions": versions(),
        **fields,
    }
    atomic_write_json(Path(stage_dir) / MANIFEST, manifest)
    return manifest


def read_json(path: str | Path) -> Optional[Any]:
    """The parsed JSON file, or None if there is no such file."""
    path = Path(path)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def read_manifest(stage_dir: str | Path) -> Optional[dict[str, Any]]:
    return read_json(Path(stage_dir) / MANIFEST)


def require_manifest(stage_dir: str | Path, stage: str) -> dict[str, Any]:
    """Read an upstream stage's manifest, or fail naming the missing stage."""
    m = read_manifest(stage_dir)
    if m is None:
        raise LLMMakerError(f"{stage_dir}: no {MANIFEST}; run the `{stage}` stage first")
    return m


def stage_fingerprint(config: Any, *upstream_dirs: str | Path, extra: Any = None) -> str:
    """Fingerprint of a stage: its config (a dataclass or dict), the fingerprints of the
    upstream stages it reads, and any extra inputs (e.g. source file signatures).

    The pipeline skips a stage whose manifest already carries this fingerprint."""
    return inputs_fingerprint(fingerprint_inputs(config, *upstream_dirs, extra=extra))


def fingerprint_inputs(config: Any, *upstream_dirs: str | Path, extra: Any = None) -> dict[str, Any]:
    """What `stage_fingerprint` hashes, as plain JSON: {"config", "upstream": {stage folder:
    fingerprint}, "extra"}. Training stages keep it in their checkpoints, so that a refused resume
    can say what changed (`changed_keys`)."""
    cfg = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config
    upstream = {Path(d).name: (read_manifest(d) or {}).get("fingerprint") for d in upstream_dirs}
    return json.loads(json.dumps({"config": cfg, "upstream": upstream, "extra": extra}, default=str))


def inputs_fingerprint(inputs: dict[str, Any]) -> str:
    return fingerprint(inputs["config"], list(inputs["upstream"].values()), inputs["extra"])


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """`key: old -> new` for every leaf that differs between two JSON values (dotted keys)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [line for k in sorted(set(old) | set(new), key=str)
                for line in changed_keys(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def is_up_to_date(stage_dir: str | Path, fingerprint_: str) -> bool:
    m = read_manifest(stage_dir)
    return m is not None and m.get("fingerprint") == fingerprint_


def iter_jsonl_lines(path: str | Path, what: str = "file") -> Iterator[tuple[int, bytes]]:
    """(line number, raw line) for each non-blank line of a .jsonl file; a missing file is a
    DataError. Callers that check records their own way parse the bytes; `iter_jsonl_rows` parses JSON."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {what} not found")
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield lineno, line


def iter_jsonl_rows(path: str | Path, what: str = "file") -> Iterator[tuple[str, Any]]:
    """(`path:line`, parsed row) for each non-blank line of a .jsonl file; a missing file or a
    malformed line is a DataError naming the file and line."""
    for lineno, line in iter_jsonl_lines(path, what):
        try:
            yield f"{path}:{lineno}", json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid JSON: {e}") from None
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_metrics(stage_dir: str | Path) -> list[dict[str, str]]:
    """The rows of stage_dir/metrics.csv as strings (empty if there is none)."""
    path = Path(stage_dir) / METRICS
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def as_float(value: Any) -> Optional[float]:
    """A metrics cell as a float; None for an empty or non-numeric cell."""
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None
