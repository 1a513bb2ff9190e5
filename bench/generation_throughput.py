"""Generation tokens/s, same run: llm-maker with its KV cache, llm-maker without a cache (the
whole sequence recomputed every token), and transformers' `generate` on the same model
exported with `llm-maker export --format hf` (with and without its cache); then the server's
continuous-batching engine (serve/batching.py) with 1, 2, 4 and 8 jobs decoding together.

All greedy, no stop token, the same prompt; the greedy tokens of every path are checked equal
first (same model, same answer). Rounds alternate between the paths so machine noise hits all
alike; figures are medians.

    python bench/generation_throughput.py [--model-dir runs/demo/sft/final] [--new 128] [--rounds 5]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from llm_maker.serve.batching import Batch
from llm_maker.serve.engine import ChatEngine, Job, SamplingParams
from llm_maker.serve.generate import generate
from llm_maker.train.checkpoint import load_model_dir


@torch.inference_mode()
def no_cache_greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    for _ in range(n):
        ids = torch.cat([ids, model(ids)[:, -1:].argmax(-1)], dim=1)  # the whole sequence, every token
    return ids[0, len(prompt):].tolist()


def ours_cached(model, prompt, n):
    return list(generate(model, prompt, n))


def hf_generate(hf, use_cache: bool):
    @torch.inference_mode()
    def run(model, prompt, n):
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          use_cache=use_cache, eos_token_id=None, pad_token_id=0)
        return out[0, len(prompt):].tolist()
    return run


class _QuietJob(Job):
    """A job whose streamed events are kept, not sent to an event loop."""

    def __init__(self, ids: list[int], params: SamplingParams):
        super().__init__(ids, params, loop=None)
        self.pieces: list[str] = []

    def emit(self, kind: str, value) -> None:
        if kind == "text":
            self.pieces.append(value)


def engine_batch_tokens_per_s(engine: ChatEngine, batch: int, prompt: list[int], n: int) -> tuple[float, list[str]]:
    """The server's continuous-batching engine with `batch` jobs (prompts differing in their last
    token) decoding `n` greedy tokens each: (decode tokens/s after the prefills, each reply)."""
    b = Batch(engine, batch)
    jobs = [_QuietJob(prompt[:-1] + [prompt[-1] + i], SamplingParams(max_tokens=n, temperature=0.0))
            for i in range(batch)]
    for job in jobs:
        b.admit(job)
    t0 = time.perf_counter()
    while len(b):
        b.step()
    return batch * (n - 1) / (time.perf_counter() - t0), ["".join(j.pieces) for j in jobs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", default="runs/demo/sft/final")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default="bench/results/generation_throughput.json")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (1: decode steps are too small to share, and extra threads "
                         "spin-wait badly on a busy machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import transformers
    from transformers import AutoModelForCausalLM

    from llm_maker.export.hf import export_to_temp

    model, tok, _ = load_model_dir(args.model_dir)
    model.eval()
    prompt = (tok.encode(" ".join(["The list type is a mutable sequence of objects."] * 20)))[:args.prompt_len]
    work = tempfile.TemporaryDirectory(prefix="llm-maker-bench-")
    hf_dir = export_to_temp(args.model_dir, work.name)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="sdpa").eval()
    paths = {"llm-maker, KV cache": ours_cached, "llm-maker, no cache": no_cache_greedy,
             "transformers generate, cache": hf_generate(hf, True),
             "transformers generate, no cache": hf_generate(hf, False)}
    reference = ours_cached(model, prompt, args.new)
    for name, fn in paths.items():  # the same model must give the same greedy answer on every path
        assert fn(model, prompt, args.new) == reference, f"{name} disagrees with the KV-cache path"

    times = {name: [] for name in paths}
    for _ in range(args.rounds):
        for name, fn in paths.items():
            t0 = time.perf_counter()
            fn(model, prompt, args.new)
            times[name].append(time.perf_counter() - t0)
    tok_s = {name: args.new / statistics.median(t) for name, t in times.items()}
    # The server's batching engine: 8 jobs together must give the replies each gives alone.
    engine = ChatEngine.load(args.model_dir, device="cpu")
    together = engine_batch_tokens_per_s(engine, 8, prompt, args.new)[1]
    alone = [engine_batch_tokens_per_s(engine, 1, prompt[:-1] + [prompt[-1] + i], args.new)[1][0] for i in range(8)]
    assert together == alone, "a batched job's reply differs from its reply alone"
    batched = {b: statistics.median(engine_batch_tokens_per_s(engine, b, prompt, args.new)[0]
                                    for _ in range(args.rounds)) for b in (1, 2, 4, 8)}

    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
              "torch": torch.__version__, "transformers": transformers.__version__, "model_dir": args.model_dir,
              "parameters": model.num_parameters(), "prompt_tokens": len(prompt), "new_tokens": args.new,
              "rounds": args.rounds, "tokens_per_s": {k: round(v, 1) for k, v in tok_s.items()},
              "kv_cache_speedup": round(tok_s["llm-maker, KV cache"] / tok_s["llm-maker, no cache"], 2),
              "vs_transformers_cached": round(tok_s["llm-maker, KV cache"] / tok_s["transformers generate, cache"], 2),
              "engine_batch_tokens_per_s": {str(b): round(v, 1) for b, v in batched.items()},
              "batch8_over_batch1": round(batched[8] / batched[1], 2)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for name, v in tok_s.items():
        print(f"{name:34s} {v:10,.1f} tokens/s")
    print(f"KV cache speedup {result['kv_cache_speedup']}x; "
          f"vs transformers (cached) {result['vs_transformers_cached']}x")
    print("server engine, tokens/s by batch size:", result["engine_batch_tokens_per_s"])
    work.cleanup()


if __name__ == "__main__":
    main()
