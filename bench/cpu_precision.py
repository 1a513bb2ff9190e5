"""bf16 against fp32 for pretraining on this CPU: one training step of llm-maker's trainer
(`train_step`, the recipe's AdamW, clipping, autocast) in each precision, in alternating rounds of
one run so both see the same machine load, for the demo shape and a 12m-class shape. Prints
tokens/s of each and the ratio, then trains the demo shape from the same seed in both precisions
for `--curve-steps` steps on one fixed batch stream and prints how far the two loss curves drift.

    python bench/cpu_precision.py                   # ~3 minutes on 2 cores
    python bench/cpu_precision.py --rounds 3 --curve-steps 0
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from llm_maker.devices import device_caps, resolve_precision
from llm_maker.model.llama import LlamaModel
from llm_maker.model.presets import resolve_model_config
from llm_maker.recipe import TrainConfig
from llm_maker.train.loss import CausalLMLoss
from llm_maker.train.trainer import make_optimizer, train_step

SHAPES = {  # name -> (preset, vocab, seq_len, micro-batch)
    "demo (tiny, seq 256)": ("tiny", 4096, 256, 16),
    "12m-class (seq 512)": ("12m", 16384, 512, 8),
}


class Stream:
    """Fresh random tokens per micro-batch index: the trainer's batch protocol, no data loading."""

    def __init__(self, vocab: int, seq_len: int, batch: int):
        self.vocab, self.seq_len, self.batch = vocab, seq_len, batch
        self.tokens_per_micro_batch = seq_len * batch

    def micro_batch(self, index: int):
        g = torch.Generator().manual_seed(index)
        # A learnable stream: each token is the previous one + 1 (mod a small range) most of the time.
        start = torch.randint(0, 64, (self.batch, 1), generator=g)
        ids = (start + torch.arange(self.seq_len + 1)) % 64
        noise = torch.randint(0, self.vocab, ids.shape, generator=g)
        ids = torch.where(torch.rand(ids.shape, generator=g) < 0.1, noise, ids)
        return ids[:, :-1], ids[:, 1:]


def setup(preset: str, vocab: int, seq_len: int, precision: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = resolve_model_config(argparse.Namespace(preset=preset, seq_len=seq_len), vocab_size=vocab)
    model = LlamaModel(cfg).train()
    tc = TrainConfig(lr=3e-3, precision=precision, device="cpu")
    return model, CausalLMLoss(model), make_optimizer(model, tc, torch.device("cpu")), tc


def time_steps(parts, stream: Stream, steps: int, first: int) -> float:
    model, module, optimizer, tc = parts
    amp = resolve_precision(tc.precision, torch.device("cpu"))
    acc = torch.zeros(())
    t0 = time.perf_counter()
    for s in range(first, first + steps):
        train_step(module, model, optimizer, stream, [s], tc, torch.device("cpu"), amp, acc)
    return steps * stream.tokens_per_micro_batch / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per round and precision")
    ap.add_argument("--curve-steps", type=int, default=200)
    ap.add_argument("--out", default="bench/results/cpu_precision.json")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {device_caps(torch.device('cpu')).name}, "
          f"{platform.processor() or platform.machine()}")
    record = {"torch": torch.__version__, "threads": torch.get_num_threads(),
              "cpu": device_caps(torch.device("cpu")).name, "shapes": {}}
    for name, (preset, vocab, seq_len, batch) in SHAPES.items():
        stream = Stream(vocab, seq_len, batch)
        parts = {p: setup(preset, vocab, seq_len, p) for p in ("fp32", "bf16")}
        for p in parts:
            time_steps(parts[p], stream, 2, 0)  # warm-up: allocator, oneDNN kernels
        tps = {"fp32": [], "bf16": []}
        for r in range(args.rounds):
            for p in (("fp32", "bf16") if r % 2 == 0 else ("bf16", "fp32")):  # alternate who goes first
                tps[p].append(time_steps(parts[p], stream, args.steps, 2 + r * args.steps))
        med = {p: sorted(v)[len(v) // 2] for p, v in tps.items()}
        ratio = med["bf16"] / med["fp32"]
        record["shapes"][name] = {"tokens_per_s": med, "ratio_bf16_over_fp32": round(ratio, 3), "rounds": tps}
        print(f"{name:24s} fp32 {med['fp32']:9,.0f} tok/s   bf16 {med['bf16']:9,.0f} tok/s   bf16/fp32 {ratio:.2f}x")

    if args.curve_steps:
        preset, vocab, seq_len, batch = SHAPES["demo (tiny, seq 256)"]
        stream = Stream(vocab, seq_len, batch)
        curves = {}
        for p in ("fp32", "bf16"):
            model, module, optimizer, tc = setup(preset, vocab, seq_len, p)
            amp = resolve_precision(p, torch.device("cpu"))
            curve = []
            for s in range(args.curve_steps):
                acc = torch.zeros(())
                train_step(module, model, optimizer, stream, [s], tc, torch.device("cpu"), amp, acc)
                curve.append(float(acc))
            curves[p] = curve
        drift = [abs(a - b) for a, b in zip(curves["fp32"], curves["bf16"], strict=False)]
        last = sum(drift[-20:]) / len(drift[-20:])
        record["curve"] = {"steps": args.curve_steps, "max_abs_diff": max(drift), "mean_abs_diff_last_20": last,
                           "fp32_last": curves["fp32"][-1], "bf16_last": curves["bf16"][-1]}
        print(f"demo loss curves over {args.curve_steps} steps: max |fp32 - bf16| {max(drift):.4f}, "
              f"mean over the last 20 steps {last:.4f} (final fp32 {curves['fp32'][-1]:.4f}, "
              f"bf16 {curves['bf16'][-1]:.4f})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
