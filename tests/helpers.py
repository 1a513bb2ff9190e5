"""Builders the test modules share: real prose, a tiny tokenizer, tiny models, tiny trained runs.

Plain functions, not fixtures, so a test can call them with the exact sizes and seeds it needs;
the session-scoped stage directories built from the same prose live in `conftest.py`. No test
module imports from another: what two of them share belongs here.
"""
from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path
from pydoc_data.topics import topics
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from llm_maker.model.llama import LlamaConfig, LlamaModel
from llm_maker.tokenizer.tokenizer import train_bpe

# --------------------------------------------------------------------------------------
# Text and files
# --------------------------------------------------------------------------------------

UNICODE_TEXT = "Un café très naïve à Zürich; 日本語のテキスト; emoji 🙂 end.\n"


def prose_paragraphs(min_chars: int = 80) -> list[str]:
    """Paragraphs of CPython's pydoc topics: ~1500 real English paragraphs, ~416K chars, fixed order."""
    return [p.strip() for name in sorted(topics) for p in topics[name].split("\n\n") if len(p.strip()) >= min_chars]


def training_text(n_chars: int = 24_000) -> list[str]:
    """A few KB of real prose (the stdlib's pydoc topics) plus some multi-byte characters."""
    docs, total = [], 0
    for key in sorted(topics):
        docs.append(topics[key])
        total += len(topics[key])
        if total >= n_chars:
            break
    return docs + [UNICODE_TEXT] * 3


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({field: t}) + "\n" for t in texts), encoding="utf-8")
    return path


# FineWeb-Edu's exact parquet schema, for tests of the parquet and fineweb-edu sources.
FINEWEB_SCHEMA = pa.schema([
    ("text", pa.string()), ("id", pa.string()), ("dump", pa.string()), ("url", pa.string()),
    ("date", pa.string()), ("file_path", pa.string()), ("language", pa.string()),
    ("language_score", pa.float64()), ("token_count", pa.int64()), ("score", pa.float64()),
    ("int_score", pa.int64()),
])


def fineweb_rows(texts: list[str], scores: Optional[list[float]] = None, language_scores: Optional[list[float]] = None,
                 token_counts: Optional[list[int]] = None) -> pa.Table:
    """A table with FineWeb-Edu's exact schema; int_score is round(score) as in the dataset."""
    n = len(texts)
    scores = scores or [3.1] * n
    return pa.table({
        "text": texts,
        "id": [f"<urn:uuid:{i:08d}-0000-0000-0000-000000000000>" for i in range(n)],
        "dump": ["CC-MAIN-2024-10"] * n,
        "url": [f"https://example.org/{i}" for i in range(n)],
        "date": ["2024-02-21T12:00:00Z"] * n,
        "file_path": ["s3://commoncrawl/crawl-data/CC-MAIN-2024-10/x.warc.gz"] * n,
        "language": ["en"] * n,
        "language_score": language_scores or [0.95] * n,
        "token_count": token_counts or [max(1, len(t.split())) for t in texts],
        "score": scores,
        "int_score": [int(round(s)) for s in scores],
    }, schema=FINEWEB_SCHEMA)


def write_shard(path: Path, table: pa.Table, row_group_size: int = 64) -> Path:
    """`table` as a parquet shard at `path` (parents created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


# --------------------------------------------------------------------------------------
# Tokenizer and models
# --------------------------------------------------------------------------------------

def make_tokenizer(vocab_size: int = 400):
    """A byte-level BPE trained on `training_text()` (about a second)."""
    return train_bpe(iter(training_text()), vocab_size=vocab_size, min_frequency=2)


TINY_DIMS = dict(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=64, seq_len=64)


def tiny_config(vocab_size: int, **dims) -> LlamaConfig:
    """`TINY_DIMS` with any field overridden; the rest are LlamaConfig's defaults."""
    return LlamaConfig(**{"vocab_size": vocab_size, **TINY_DIMS, **dims})


def tiny_model(vocab_size: int, seed: int = 0, **dims) -> LlamaModel:
    """The one tiny-model factory: `tiny_config(vocab_size, **dims)` initialised after manual_seed(seed)."""
    torch.manual_seed(seed)
    return LlamaModel(tiny_config(vocab_size, **dims))


def random_model(vocab_size: int, seed: int = 0, std: float = 0.2, **dims) -> LlamaModel:
    """A random tiny model with weights far larger than the training init, so attention
    matters and greedy choices are not near-ties."""
    model = tiny_model(vocab_size, seed, **{"tie_embeddings": False, **dims})
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, std)
    return model.eval()


def table_model(vocab_size: int, table: dict[int, list[float] | torch.Tensor],
                default: list[float] | torch.Tensor, **dims) -> LlamaModel:
    """A real LlamaModel whose next-token logits depend only on the last token:
    `table[last]` if present, else `default` (each a length-V vector).

    Built by weights, not by overriding forward, so it saves and loads like any model: the
    attention/MLP outputs are zeroed (the residual stream is the embedding), each token embeds
    to a one-hot "slot", and the untied head maps slot s to its logits row."""
    keys = sorted(table)
    cfg = tiny_config(vocab_size, tie_embeddings=False, **{"d_model": 8 * math.ceil((len(keys) + 1) / 8), **dims})
    model = LlamaModel(cfg)
    d = cfg.d_model
    with torch.no_grad():
        for layer in model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.embed_tokens.weight.zero_()
        model.embed_tokens.weight[:, 0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[:, 0] = torch.as_tensor(default, dtype=torch.float32) / math.sqrt(d)
        for slot, key in enumerate(keys, start=1):
            model.embed_tokens.weight[key] = 0.0
            model.embed_tokens.weight[key, slot] = 1.0
            model.lm_head.weight[:, slot] = torch.as_tensor(table[key], dtype=torch.float32) / math.sqrt(d)
    return model.eval()


def one_hot_logits(vocab_size: int, **values: float) -> torch.Tensor:
    """A logits vector: 0 everywhere except the given ids (keys like t5=2.0)."""
    v = torch.zeros(vocab_size)
    for key, value in values.items():
        v[int(key[1:])] = value
    return v


def successor_model(vocab_size: int, successor: dict[int, int], default: int) -> LlamaModel:
    """Greedy decoding follows `successor[last]`, else `default`, with a wide margin."""
    def hot(t: int) -> torch.Tensor:
        return one_hot_logits(vocab_size, **{f"t{t}": 10.0})

    return table_model(vocab_size, {k: hot(v) for k, v in successor.items()}, hot(default))


# --------------------------------------------------------------------------------------
# Tiny trained models (a few dozen steps on real prose)
# --------------------------------------------------------------------------------------

def prose_tokens(tok, texts) -> np.ndarray:
    """The documents' ids, <|endoftext|> after each (what the pack stage writes)."""
    return np.array([i for ids in tok.encode_batch(texts) for i in ids + [tok.eos_id]], dtype=np.int64)


def train_tiny(tokens, tok, tie: bool, steps: int = 30, seed: int = 0) -> LlamaModel:
    """A GQA model trained a few dozen AdamW steps on real prose (not a random init)."""
    from llm_maker.train.loss import CausalLMLoss

    model = tiny_model(tok.vocab_size, seed, d_model=64, d_mlp=160, tie_embeddings=tie, rope_theta=5000.0,
                       norm_eps=1e-5)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        starts = rng.integers(0, len(tokens) - 65, 8)
        block = torch.from_numpy(np.stack([tokens[s:s + 65] for s in starts]))
        CausalLMLoss(model)(block[:, :-1], block[:, 1:]).backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


# --------------------------------------------------------------------------------------
# Serving: a scripted chat model and a live server (need the serve extra: imported lazily)
# --------------------------------------------------------------------------------------

REPLY = " The class of a module"  # what the scripted model answers, whatever it is asked


def scripted_model(tok, reply: str, seq_len: int = 64, stop: bool = True) -> LlamaModel:
    """A model that answers `reply` then <|im_end|> after the chat template's assistant header
    (next token depends only on the last one, so the reply's tokens must be distinct)."""
    from llm_maker.sft.templates import prompt_ids

    header_last = prompt_ids(tok, [], "chatml")[-1]
    ids = tok.encode(reply)
    assert len(set(ids)) == len(ids) and header_last not in ids
    chain = [header_last] + ids + ([tok.im_end_id] if stop else [])

    def hot(t: int) -> torch.Tensor:
        return one_hot_logits(tok.vocab_size, **{f"t{t}": 12.0})

    table = {a: hot(b) for a, b in zip(chain, chain[1:], strict=False)}
    return table_model(tok.vocab_size, table, hot(ids[-1] if not stop else tok.im_end_id), seq_len=seq_len)


def save_chat_model(model, tok, path, name: str = "test"):
    """Save `model` as an SFT model dir with the chatml template; returns its loaded ChatEngine."""
    from llm_maker.serve.engine import ChatEngine
    from llm_maker.train.checkpoint import save_model_dir

    save_model_dir(path, model, tok, {"stage": "sft", "chat_template": "chatml", "recipe": name})
    return ChatEngine.load(path, device="cpu", precision="fp32")  # exact: replies are compared with fp32 `generate`


@contextmanager
def running_server(app) -> Iterator[str]:
    """Serve `app` with uvicorn on a free 127.0.0.1 port in a thread; yields the base URL."""
    import socket
    import threading
    import time

    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()
