"""The teacher: who it is, whether it fits the student, and its distribution for the student's batches.

Identity: a teacher is named by its weights (sha256 of model.safetensors), its shape and its
tokenizer hash (`teacher_identity`): what a stage fingerprint and the top-k cache's name hold
instead of its path. A teacher trained with another tokenizer is refused before any compute.

Two ways to feed the loss (distill/loss.py):

  online   `OnlineTeacherBatches` wraps any batch source (PretrainBatches, SFTBatches) and runs
           the teacher, without gradients and in `teacher_precision`, on each micro-batch:
           (x, y) -> (x, y, teacher log-probs (B, T, V) at temperature T). The teacher lives in
           the batch source, never in the trained module, so DDP / FSDP2 never see it.
  cached   the teacher's top-k log-probs (at temperature T) for every block of the packed train
           split, written once beside the pack and memory-mapped:

             pack/teacher/<teacher-hash12>-k<k>-T<T>-L<seq_len>/
               build.json                     what the chunks are being written for
               train-ids-00000.npy, ...       (blocks, seq_len, k) uint16 (vocab <= 65536) or int32
               train-logp-00000.npy, ...      (blocks, seq_len, k) float16
               manifest.json                  written last: k, temperature, teacher hash, seq_len,
                                              tokenizer hash, pack fingerprint, blocks, chunks

           Block i is PretrainBatches' block i (tokens[i*L : i*L+L] as input), so a micro-batch
           looks its teacher up by its block ids (`CachedTeacherBatches`). Chunks of
           `chunk_blocks` blocks are written each atomically; an interrupted build continues at
           the first missing chunk, and a finished one is reused by every later student run.
           The k kept probabilities are renormalised over the kept ids by the loss; k >= V keeps
           them all (the cached loss is then the online one, up to float16 rounding of the log-probs).

The pack stage reads only the files its manifest lists and decides "up to date" from its
manifest alone, so pack/teacher/ does not disturb it; a rebuilt pack deletes pack/ and with it
the caches made for the old tokens.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F

from llm_maker.artifacts import atomic_path, atomic_write_json, fingerprint, read_json, sha256_file
from llm_maker.devices import inference_dtype
from llm_maker.errors import CheckpointError, DataError, RecipeError
from llm_maker.layout import WEIGHTS
from llm_maker.model.llama import LlamaModel
from llm_maker.train.batches import PretrainBatches
from llm_maker.train.checkpoint import load_model_dir, read_model_config

TEACHER_DIR = "teacher"  # the top-k caches' folder inside pack/
CHUNK_BLOCKS = 256  # blocks per cache chunk: one chunk is the work lost to an interruption
BUILD_FILE, MANIFEST_FILE = "build.json", "manifest.json"


# ----------------------------------------------------------------------------------------
# Who the teacher is, and whether it fits the student
# ----------------------------------------------------------------------------------------

def teacher_identity(teacher_dir: str | Path) -> dict[str, Any]:
    """{"dir", "hash", "tokenizer_hash", "vocab_size", "seq_len"}: the hash is of its weights'
    bytes, its shape and its tokenizer, so a copy elsewhere is the same teacher and a retrained one is not."""
    teacher_dir = Path(teacher_dir)
    config = read_model_config(teacher_dir)  # a CheckpointError naming the dir when it is not a model
    weights = teacher_dir / WEIGHTS
    if not weights.is_file():
        raise RecipeError(f"{weights}: the teacher's weights file is missing")
    model = config.get("model") or {}
    return {"dir": str(teacher_dir), "tokenizer_hash": config.get("tokenizer_hash"),
            "hash": fingerprint(sha256_file(weights), model, config.get("tokenizer_hash")),
            "vocab_size": model.get("vocab_size"), "seq_len": model.get("seq_len")}


def check_teacher(teacher_dir: str | Path, tokenizer_hash: str, seq_len: int, key: str) -> None:
    """Refuse, before any compute, a teacher with another tokenizer than the student's (both hashes
    named) or a shorter context than the student's blocks. `key` is the recipe key (distill.teacher)."""
    try:
        config = read_model_config(teacher_dir)
    except CheckpointError as e:
        raise RecipeError(f"`{key}`: {e}") from None
    theirs = config.get("tokenizer_hash")
    if theirs != tokenizer_hash:
        raise RecipeError(f"`{key}`: the teacher {teacher_dir} was trained with tokenizer {theirs}, but the "
                          f"student's tokenizer is {tokenizer_hash}; a teacher must share the student's tokenizer")
    teacher_len = (config.get("model") or {}).get("seq_len", 0)
    if teacher_len < seq_len:
        raise RecipeError(f"`{key}`: the teacher {teacher_dir} has seq_len {teacher_len}, shorter than the "
                          f"student's {seq_len}")


def load_teacher(teacher_dir: str | Path, device: torch.device, precision: str, key: str) -> LlamaModel:
    """The frozen teacher on `device` in `precision` (devices.inference_dtype: bf16/fp16 where the
    device gains, fp32 otherwise); `key` names the recipe's teacher_precision in errors."""
    dtype = inference_dtype(precision, device, key)
    model, _, _ = load_model_dir(teacher_dir, device=device, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    return model


@torch.no_grad()
def teacher_log_probs(teacher: LlamaModel, x: torch.Tensor, temperature: float, vocab_size: int) -> torch.Tensor:
    """log softmax(teacher logits / T) over the student's `vocab_size` ids, fp32 (B, T, V). A teacher
    with a larger (padded) vocabulary is cut to the student's; a smaller one gives the rest no mass."""
    logits = teacher(x).float()  # (B, T, V_teacher)
    v = logits.size(-1)
    if v > vocab_size:
        logits = logits[..., :vocab_size]
    elif v < vocab_size:
        logits = F.pad(logits, (0, vocab_size - v), value=float("-inf"))
    return F.log_softmax(logits / temperature, dim=-1)


# ----------------------------------------------------------------------------------------
# Online: the teacher on the same micro-batch
# ----------------------------------------------------------------------------------------

class OnlineTeacherBatches:
    """A batch source with the teacher's log-probs: micro_batch(index) is (x, y, teacher_logp) with
    (x, y) the wrapped source's; still a pure function of the index (the teacher is deterministic).
    Validation batches are the wrapped source's (x, y): the validation loss is plain cross-entropy.
    `log_metrics` gives the teacher's forward throughput since the last logged row."""

    def __init__(self, base: Any, teacher: LlamaModel, temperature: float, vocab_size: int):
        self.base, self.teacher = base, teacher
        self.temperature, self.vocab_size = temperature, vocab_size
        self.device = next(teacher.parameters()).device
        self.tokens_per_micro_batch = base.tokens_per_micro_batch
        self._tokens, self._seconds = 0, 0.0

    def micro_batch(self, index: int) -> tuple[torch.Tensor, ...]:
        x, y = self.base.micro_batch(index)
        start = time.perf_counter()
        logp = teacher_log_probs(self.teacher, x.to(self.device), self.temperature, self.vocab_size)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the student needs it next anyway: time it truly
        self._seconds += time.perf_counter() - start
        self._tokens += x.numel()
        return x, y, logp

    def val_batches(self, *args, **kwargs) -> Iterator:
        return self.base.val_batches(*args, **kwargs)

    def epoch_of(self, index: int) -> float:
        return self.base.epoch_of(index)

    def log_metrics(self) -> dict[str, Any]:
        tps = self._tokens / self._seconds if self._seconds > 0 else None
        self._tokens, self._seconds = 0, 0.0
        return {"teacher_tokens_per_s": None if tps is None else round(tps, 1)}


# ----------------------------------------------------------------------------------------
# Cached: the teacher's top-k per packed block, beside the pack
# ----------------------------------------------------------------------------------------

def topk_cache_dir(pack_dir: str | Path, teacher_hash: str, k: int, temperature: float, seq_len: int) -> Path:
    return Path(pack_dir) / TEACHER_DIR / f"{teacher_hash[:12]}-k{k}-T{temperature:g}-L{seq_len}"


def _chunk_files(cache_dir: Path, chunk: int) -> tuple[Path, Path]:
    return cache_dir / f"train-ids-{chunk:05d}.npy", cache_dir / f"train-logp-{chunk:05d}.npy"


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def ids_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.int32)


def build_topk_cache(teacher: LlamaModel, tokens: Any, cache_dir: str | Path, fields: dict[str, Any],
                     vocab_size: int, batch_size: int = 8, chunk_blocks: int = CHUNK_BLOCKS,
                     on_chunk: Optional[Callable[[int], None]] = None) -> int:
    """Write the teacher's top-k log-probs for every block of `tokens` into `cache_dir`; returns how
    many chunks it computed (0: the finished cache was there). `fields` (k, temperature, seq_len,
    teacher_hash, tokenizer_hash, pack_fingerprint) must match a finished cache's manifest for it
    to be reused; chunks written for other fields are removed first. `on_chunk(c)` runs after
    chunk c is on disk."""
    cache_dir = Path(cache_dir)
    k, seq_len, temperature = int(fields["k"]), int(fields["seq_len"]), float(fields["temperature"])
    n_blocks = (len(tokens) - 1) // seq_len
    plan = {**fields, "blocks": n_blocks, "chunk_blocks": chunk_blocks, "vocab_size": vocab_size,
            "kept": min(k, vocab_size), "ids_dtype": ids_dtype(vocab_size).name, "logp_dtype": "float16"}
    plan = json.loads(json.dumps(plan))  # as it reads back from JSON
    finished = read_json(cache_dir / MANIFEST_FILE)
    if finished is not None and {k: v for k, v in finished.items() if k != "chunks"} == plan:
        return 0
    if read_json(cache_dir / BUILD_FILE) != plan:  # another build's chunks, or none: start clean
        shutil.rmtree(cache_dir, ignore_errors=True)
        atomic_write_json(cache_dir / BUILD_FILE, plan)
    (cache_dir / MANIFEST_FILE).unlink(missing_ok=True)
    device = next(teacher.parameters()).device
    kept, id_type = plan["kept"], ids_dtype(vocab_size)
    computed = 0
    n_chunks = -(-n_blocks // chunk_blocks)
    for chunk in range(n_chunks):
        ids_file, logp_file = _chunk_files(cache_dir, chunk)
        if ids_file.is_file() and logp_file.is_file():  # each written atomically: complete
            continue
        first, last = chunk * chunk_blocks, min(n_blocks, (chunk + 1) * chunk_blocks)
        ids = np.empty((last - first, seq_len, kept), dtype=id_type)
        logp = np.empty((last - first, seq_len, kept), dtype=np.float16)
        for start in range(first, last, batch_size):
            blocks = range(start, min(last, start + batch_size))
            x = torch.from_numpy(np.stack([np.asarray(tokens[b * seq_len: b * seq_len + seq_len], dtype=np.int64)
                                           for b in blocks])).to(device)  # (b, L)
            top = teacher_log_probs(teacher, x, temperature, vocab_size).topk(kept, dim=-1)  # (b, L, kept)
            rows = slice(start - first, start - first + len(blocks))
            ids[rows] = top.indices.cpu().numpy().astype(id_type)
            logp[rows] = top.values.cpu().numpy().astype(np.float16)
        _save_npy(logp_file, logp)
        _save_npy(ids_file, ids)  # last: a chunk is complete when both files are there
        computed += 1
        if on_chunk is not None:
            on_chunk(chunk)
    atomic_write_json(cache_dir / MANIFEST_FILE, {**plan, "chunks": n_chunks})
    return computed


class TopKCache:
    """A finished top-k cache, memory-mapped: `lookup(block_ids)` -> (logp, ids), each (B, L, k)."""

    def __init__(self, cache_dir: str | Path):
        self.dir = Path(cache_dir)
        manifest = read_json(self.dir / MANIFEST_FILE)
        if manifest is None:
            raise DataError(f"{self.dir}: no {MANIFEST_FILE}; the teacher's top-k cache is not finished")
        self.manifest = manifest
        self.blocks, self.chunk_blocks = manifest["blocks"], manifest["chunk_blocks"]
        self.seq_len = manifest["seq_len"]
        self._maps: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _chunk(self, chunk: int) -> tuple[np.ndarray, np.ndarray]:
        if chunk not in self._maps:
            ids_file, logp_file = _chunk_files(self.dir, chunk)
            try:
                self._maps[chunk] = (np.load(ids_file, mmap_mode="r"), np.load(logp_file, mmap_mode="r"))
            except (OSError, ValueError) as e:
                raise DataError(f"{ids_file.parent}: chunk {chunk} of the teacher's top-k cache cannot be read "
                                f"({e}); delete {self.dir} to rebuild it") from None
        return self._maps[chunk]

    def lookup(self, block_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        ids, logp = [], []
        for b in block_ids:
            chunk_ids, chunk_logp = self._chunk(int(b) // self.chunk_blocks)
            row = int(b) % self.chunk_blocks
            ids.append(np.asarray(chunk_ids[row], dtype=np.int64))
            logp.append(np.asarray(chunk_logp[row], dtype=np.float32))
        return torch.from_numpy(np.stack(logp)), torch.from_numpy(np.stack(ids))


class CachedTeacherBatches:
    """PretrainBatches with the cached teacher: micro_batch(index) is (x, y, teacher_logp (B, L, k),
    teacher_ids (B, L, k)), looked up by the micro-batch's block ids. No teacher runs: its tokens/s is 0."""

    def __init__(self, base: PretrainBatches, cache: TopKCache):
        if cache.blocks != base.n_blocks or cache.seq_len != base.seq_len:
            raise DataError(f"{cache.dir}: the cache holds {cache.blocks} blocks of seq_len {cache.seq_len}, but the "
                            f"train split has {base.n_blocks} of {base.seq_len}; delete {cache.dir} to rebuild it")
        self.base, self.cache = base, cache
        self.tokens_per_micro_batch = base.tokens_per_micro_batch

    def micro_batch(self, index: int) -> tuple[torch.Tensor, ...]:
        x, y = self.base.micro_batch(index)
        logp, ids = self.cache.lookup(self.base.block_ids(index))
        return x, y, logp, ids

    def val_batches(self, *args, **kwargs) -> Iterator:
        return self.base.val_batches(*args, **kwargs)

    def epoch_of(self, index: int) -> float:
        return self.base.epoch_of(index)

    def log_metrics(self) -> dict[str, Any]:
        return {"teacher_tokens_per_s": 0}
