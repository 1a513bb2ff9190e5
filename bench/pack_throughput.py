"""Packing throughput: llm-maker's packer against a plain single-process loop, same text, one run.

    .venv/bin/python bench/pack_throughput.py                 # >= 200 MB of parquet, ~15 min on 2 cores
    .venv/bin/python bench/pack_throughput.py --parquet-mb 20 # a quick look

1. Writes FineWeb-Edu-schema parquet shards (snappy, as the dataset ships) of at least
   --parquet-mb MB into a temporary folder: documents of 2-12 paragraphs of the built-in corpus
   drawn at random, so they are distinct, with random scores. Nothing is kept afterwards.
2. Runs the data stage on them (a fineweb-edu source with filters: {min_int_score: 3}) and trains a
   4,096-token BPE (the demo's size) on a sample.
3. Packs data/{train,val}.jsonl three ways, each in a fresh subprocess:
     llm-maker pack_tokens, workers=2 (a process pool, each worker single-threaded)
     llm-maker pack_tokens, workers=1 (one process; `tokenizers` batch-encodes on its own threads)
     a plain loop: for each line, json.loads, tokenizer.encode, append EOS, write (one core)
   and checks that all three wrote the same token stream.
Measured per run: wall seconds, CPU seconds (the subprocess and its workers), MB of text per
second, MB per CPU-second, and peak resident memory of the whole process tree (sampled from
/proc every 50 ms). Results go to bench/results/pack_throughput.json.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

PYTHON = sys.executable

OURS = """
import sys
from llm_maker.pack import packer
from llm_maker.pack.packer import pack_tokens
from llm_maker.recipe import PackConfig
packer.POOL_MIN_BYTES = 0  # the pool whenever workers > 1
pack_tokens(PackConfig(workers=int(sys.argv[4]), shard_tokens=16_000_000), sys.argv[1], sys.argv[2], sys.argv[3])
"""

DATA = """
import sys
from llm_maker.data.stage import prepare_data
from llm_maker.recipe import DataConfig, FineWebFilters, SourceConfig
FINEWEB = SourceConfig(type="fineweb-edu", path=sys.argv[1], filters=FineWebFilters(min_int_score=3))
prepare_data(DataConfig(sources=[FINEWEB],
                        val_fraction=0.01), sys.argv[2])
"""

PLAIN = """
import json, sys
import numpy as np
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[2] + "/tokenizer.json")
eos = tok.token_to_id("<|endoftext|>")
with open(sys.argv[3], "wb") as out:
    for split in ("train", "val"):
        with open(sys.argv[1] + f"/{split}.jsonl", encoding="utf-8") as f:
            for line in f:
                ids = tok.encode(json.loads(line)["text"], add_special_tokens=False).ids
                ids.append(eos)
                out.write(np.asarray(ids, dtype=np.uint16).tobytes())
"""


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of a process and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        stack.extend(children.get(p, []))
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def run_measured(args: list[str], env: dict) -> dict:
    """Run a subprocess; wall and CPU seconds, peak tree RSS."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, env=env)
    peak, done = [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], tree_rss_bytes(proc.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    rc = proc.wait()
    done.set()
    sampler.join()
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if rc != 0:
        raise SystemExit(f"{args[:3]} failed with exit code {rc}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "peak_rss_mb": round(peak[0] / 1e6, 1)}


def make_corpus(folder: Path, target_mb: float, seed: int) -> dict:
    """FineWeb-Edu-schema shards of random built-in paragraphs until the files reach target_mb."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llm_maker.data.builtin import builtin_documents
    from llm_maker.data.fineweb import COLUMNS

    rng = random.Random(seed)
    paragraphs = [p.strip() for _, t in builtin_documents() for p in t.split("\n\n") if len(p.strip()) > 40]
    types = {"string": pa.string(), "double": pa.float64(), "int64": pa.int64()}
    schema = pa.schema([(name, types[kind]) for name, kind in COLUMNS.items()])
    folder.mkdir(parents=True, exist_ok=True)
    total_bytes = rows = text_bytes = shard = 0
    while total_bytes < target_mb * 1e6:
        texts = ["\n\n".join(rng.sample(paragraphs, rng.randint(2, 12))) for _ in range(20_000)]
        scores = [round(rng.uniform(2.5, 5.0), 3) for _ in texts]
        n = len(texts)
        table = pa.table({
            "text": texts, "id": [f"<urn:uuid:{rows + i:012d}>" for i in range(n)], "dump": ["CC-MAIN-2024-10"] * n,
            "url": [f"https://example.org/{rows + i}" for i in range(n)], "date": ["2024-02-21T12:00:00Z"] * n,
            "file_path": ["s3://commoncrawl/x.warc.gz"] * n, "language": ["en"] * n,
            "language_score": [0.95] * n, "token_count": [len(t) // 4 for t in texts], "score": scores,
            "int_score": [int(round(s)) for s in scores]}, schema=schema)
        path = folder / f"{shard:03d}_00000.parquet"
        pq.write_table(table, path, row_group_size=2000)  # snappy, the default
        total_bytes += path.stat().st_size
        text_bytes += sum(len(t.encode()) for t in texts)
        rows += n
        shard += 1
    return {"parquet_mb": round(total_bytes / 1e6, 1), "shards": shard, "rows": rows,
            "text_mb": round(text_bytes / 1e6, 1)}


def stream_sha(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parquet-mb", type=float, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "pack_throughput.json"))
    args = ap.parse_args()

    from llm_maker.artifacts import atomic_write_json, read_manifest, write_manifest
    from llm_maker.tokenizer.tokenizer import train_bpe

    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TOKENIZERS_PARALLELISM": "true"}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="pack-bench-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        corpus = make_corpus(tmp / "fineweb", args.parquet_mb, args.seed)
        print(f"corpus: {corpus} in {time.perf_counter() - t0:.0f}s", flush=True)

        data_run = run_measured([PYTHON, "-c", DATA, str(tmp / "fineweb"), str(tmp / "run" / "data")], env)
        data = read_manifest(tmp / "run" / "data")
        print(f"data stage: {data_run}, {data['counts']}", flush=True)

        sample = []
        with open(tmp / "run" / "data" / "train.jsonl", encoding="utf-8") as f:
            for line, _ in zip(f, range(3000), strict=False):
                sample.append(json.loads(line)["text"])
        tok = train_bpe(iter(sample), vocab_size=4096)
        tok.save(tmp / "run" / "tokenizer")
        write_manifest(tmp / "run" / "tokenizer", "tokenizer", "bench")

        runs, streams = {}, {}

        def ours(name: str, workers: int, data_dir: Path, out: Path) -> dict:
            runs[name] = run_measured([PYTHON, "-c", OURS, str(data_dir), str(tmp / "run" / "tokenizer"), str(out),
                                       str(workers)], env)
            m = read_manifest(out)
            runs[name].update(cores=2, text_mb=round(sum(m["text_bytes"].values()) / 1e6, 1))
            print(name, runs[name], flush=True)
            return m

        # plain loop between the two runs of ours, so that a change in machine load hits both sides
        m = ours("llm-maker, workers=2 (process pool)", 2, tmp / "run" / "data", tmp / "pack2")
        streams["workers=2"] = stream_sha([tmp / "pack2" / e["file"] for s in ("train", "val") for e in m["shards"][s]])
        name = "plain loop (one process, encode per document)"
        runs[name] = run_measured([PYTHON, "-c", PLAIN, str(tmp / "run" / "data"), str(tmp / "run" / "tokenizer"),
                                   str(tmp / "plain.bin")], {**env, "TOKENIZERS_PARALLELISM": "false"})
        runs[name].update(cores=1, text_mb=runs["llm-maker, workers=2 (process pool)"]["text_mb"])
        streams["plain"] = stream_sha([tmp / "plain.bin"])
        print(name, runs[name], flush=True)
        m = ours("llm-maker, workers=1 (Rust threads)", 1, tmp / "run" / "data", tmp / "pack1")
        streams["workers=1"] = stream_sha([tmp / "pack1" / e["file"] for s in ("train", "val") for e in m["shards"][s]])
        text_mb = runs[name]["text_mb"]

        # memory does not grow with the corpus: the same packer on a tenth of the documents
        small = tmp / "small" / "data"
        small.mkdir(parents=True)
        with open(tmp / "run" / "data" / "train.jsonl", "rb") as f:
            lines = f.readlines()
        (small / "train.jsonl").write_bytes(b"".join(lines[: len(lines) // 10]))
        (small / "val.jsonl").write_bytes((tmp / "run" / "data" / "val.jsonl").read_bytes())
        write_manifest(small, "data", "bench-small")
        ours("llm-maker, workers=2, a tenth of the text", 2, small, tmp / "pack-small")

    assert len(set(streams.values())) == 1, f"the runs wrote different tokens: {streams}"
    for r in runs.values():
        r["mb_per_s"] = round(r["text_mb"] / r["wall_s"], 2)
        r["mb_per_s_per_core"] = round(r["text_mb"] / r["wall_s"] / r["cores"], 2)
        r["mb_per_cpu_s"] = round(r["text_mb"] / r["cpu_s"], 2)
    result = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "python": platform.python_version(), "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "corpus": corpus, "packed_text_mb": round(text_mb, 1), "tokens": m["train_tokens"] + m["val_tokens"],
        "bytes_per_token": m["bytes_per_token"], "shards": {s: len(m["shards"][s]) for s in ("train", "val")},
        "data_stage": {**data_run, "parquet_mb_per_s": round(corpus["parquet_mb"] / data_run["wall_s"], 2),
                       "counts": data["counts"]},
        "same_tokens": True, "runs": runs,
    }
    atomic_write_json(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
