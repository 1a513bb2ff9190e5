"""Load on the server: N concurrent streaming clients on loopback, bounded in count and time.

`llm-maker serve`'s app runs in-process under uvicorn on a free 127.0.0.1 port. Each of N
clients sends R requests one after another, each a different prompt answered greedily, and
checks the streamed text against the model's own answer computed beforehand (so a crossed
stream or a dropped chunk is an error, not a number). Reports requests/s, streamed tokens/s
and time to first token (median, p90, max) for each server batch size in `--max-batch`, run one
after another on the same model in one process (1 = one request at a time, the baseline);
nothing leaves the machine.

    python bench/server_load.py [--model-dir runs/demo/sft/final] [--clients 8] [--requests 3] [--max-tokens 32]
                                [--max-batch 1,8]
"""
from __future__ import annotations

import argparse
import http.client
import json
import platform
import socket
import statistics
import threading
import time
from pathlib import Path
from typing import Optional

import torch
import uvicorn

from llm_maker.serve.engine import ChatEngine
from llm_maker.serve.generate import generate
from llm_maker.serve.server import ServeSettings, create_app
from llm_maker.sft.templates import prompt_ids, stop_token_ids

TOPICS = ["lists", "tuples", "dictionaries", "sets", "classes", "modules", "exceptions", "generators", "files",
          "threads", "strings", "numbers", "decorators", "iterators", "functions", "imports"]
TIMEOUT_S = 120.0  # per request: the load is bounded in time as well as in count


def expected_answer(engine: ChatEngine, messages: list[dict], max_tokens: int) -> str:
    ids = prompt_ids(engine.tokenizer, messages, engine.template)
    gen = generate(engine.model, ids, max_tokens, stop_ids=stop_token_ids(engine.tokenizer, engine.template))
    return engine.tokenizer.decode([t for t in gen if t not in engine.special_ids])


def stream_once(port: int, messages: list[dict], max_tokens: int) -> tuple[str, Optional[float], float, int]:
    """(text, seconds to first content or None, total seconds, content chunks) of one streamed request."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT_S)
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:200]!r}")
    text, first, chunks = "", None, 0
    while line := r.fp.readline():
        line = line.strip()
        if not line.startswith(b"data: "):
            continue
        if line == b"data: [DONE]":
            break
        event = json.loads(line[6:])
        if "error" in event:
            raise RuntimeError(event["error"]["message"])
        delta = event["choices"][0]["delta"].get("content") if event["choices"] else None
        if delta:
            first = first if first is not None else time.perf_counter() - t0
            text += delta
            chunks += 1
    conn.close()
    return text, first, time.perf_counter() - t0, chunks  # first: None for an empty reply


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", default="runs/demo/sft/final")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=3, help="per client, one after another")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=lambda v: [int(x) for x in v.split(",")], default=[1, 8],
                    help="server batch sizes to compare, one after another in this run (default 1,8)")
    ap.add_argument("--out", default="bench/results/server_load.json")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (1: decode steps are too small to share, and extra threads "
                         "spin-wait badly on a busy machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    engine = ChatEngine.load(args.model_dir, device="cpu")
    jobs = [(c, r, [{"role": "user", "content": f"Tell me about Python {TOPICS[(c * args.requests + r) % len(TOPICS)]}"
                                                 f" (question {c}.{r})."}])
            for c in range(args.clients) for r in range(args.requests)]
    expected = {(c, r): expected_answer(engine, m, args.max_tokens) for c, r, m in jobs}

    runs = [run_load(engine, b, jobs, expected, args) for b in args.max_batch]
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
              "model_dir": args.model_dir, "parameters": engine.model.num_parameters(), "clients": args.clients,
              "requests": len(jobs), "max_tokens": args.max_tokens, "runs": runs}
    if len(runs) > 1:
        first = runs[0]["requests_per_s"]
        result["requests_per_s_vs_first"] = {str(r["max_batch"]): round(r["requests_per_s"] / first, 2) for r in runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    errors = [e for r in runs for e in r["errors"]]
    if errors:
        raise SystemExit(f"{len(errors)} errors")


def run_load(engine: ChatEngine, max_batch: int, jobs: list, expected: dict, args) -> dict:
    """Serve `engine` with `max_batch`, run every client to the end, and summarise."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    app = create_app(engine, ServeSettings(max_batch=max_batch, max_waiting=args.clients * 2))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)

    results, errors = {}, []

    def client(c: int) -> None:
        for r in range(args.requests):
            messages = next(m for cc, rr, m in jobs if (cc, rr) == (c, r))
            try:
                results[(c, r)] = stream_once(port, messages, args.max_tokens)
                if results[(c, r)][0] != expected[(c, r)]:
                    errors.append(f"client {c} request {r}: got another answer (crossed or broken stream)")
            except Exception as e:  # counted, never hidden
                errors.append(f"client {c} request {r}: {type(e).__name__}: {e}")

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT_S * args.requests)
    wall = time.perf_counter() - t0
    peak = app.state.worker.peak_batch
    server.should_exit = True
    thread.join(10)
    sock.close()

    ttft = sorted(v[1] for v in results.values() if v[1] is not None)
    chunks = sum(v[3] for v in results.values())
    return {"max_batch": max_batch, "peak_batch": peak, "errors": errors, "completed": len(results),
            "empty_replies": sum(v[1] is None for v in results.values()),  # stopped at once: no first token
            "wall_s": round(wall, 2), "requests_per_s": round(len(results) / wall, 2),
            "streamed_chunks_per_s": round(chunks / wall, 1),
            "ttft_s": {"median": round(statistics.median(ttft), 3), "p90": round(ttft[int(0.9 * (len(ttft) - 1))], 3),
                       "max": round(ttft[-1], 3)} if ttft else None,
            "latency_s_median": round(statistics.median(v[2] for v in results.values()), 3) if results else None}


if __name__ == "__main__":
    main()
