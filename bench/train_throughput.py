"""Training throughput: llm-maker's trainer step beside a plain transformers loop, in one run.

Both sides train the same shape (a preset) on the same batch and sequence length with the same
speed recipe: bf16 autocast (on GPUs; fp32 on CPU unless --precision bf16), fused AdamW on
CUDA, torch.compile, SDPA attention, clipping at 1.0. llm-maker's side is `train_step` from
the trainer itself, with the recipe's switches (chunked loss, Muon); the transformers side is
the loop most people write: `LlamaForCausalLM(...)(input_ids, labels).loss`, backward, clip,
step. Prints tokens/s, MFU and peak memory of both and their ratio, and writes a JSON record.

    python bench/train_throughput.py --preset 124m          # one H100: the issue's targets
    python bench/train_throughput.py --preset 135m
    python bench/train_throughput.py --preset 166m
    python bench/train_throughput.py --device cpu --preset tiny --steps 3 --warmup 2
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import resource
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Optional

import torch

from llm_maker.devices import resolve_device, resolve_precision
from llm_maker.model.llama import LlamaModel
from llm_maker.model.presets import resolve_model_config
from llm_maker.recipe import TrainConfig
from llm_maker.train.loss import CausalLMLoss
from llm_maker.train.mfu import device_peak_tflops, mfu
from llm_maker.train.trainer import make_optimizer, train_step

# The shapes: model preset, sequence length, micro-batch (tokens per step = batch x seq)
# and the loss chunk (the 100K vocabulary's logits are the memory peak of the 166m).
BENCH_PRESETS = {
    "tiny": dict(model="tiny", vocab_size=4096, seq_len=256, batch=8, loss_chunk=0),
    "124m": dict(model="124m", vocab_size=None, seq_len=1024, batch=32, loss_chunk=0),
    "135m": dict(model="135m", vocab_size=None, seq_len=2048, batch=16, loss_chunk=0),
    "166m": dict(model="166m", vocab_size=None, seq_len=1024, batch=16, loss_chunk=8192),
}


class FixedBatch:
    """The trainer's batch source protocol, serving one pre-made batch (no data loading cost)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y
        self.tokens_per_micro_batch = x.numel()

    def micro_batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x, self.y


def hf_model(cfg) -> torch.nn.Module:
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(HFConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_mlp,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings, attn_implementation="sdpa", use_cache=False))


def ours_step(cfg, tc: TrainConfig, device, x, y) -> tuple[Callable[[], None], torch.nn.Module]:
    """llm-maker: the model and optimizer as run_training sets them up, stepped by train_step."""
    model = LlamaModel(cfg).to(device)
    model.train()
    optimizer = make_optimizer(model, tc, device)
    module = CausalLMLoss(model, tc.loss_chunk_size)
    module = torch.compile(module) if tc.compile else module
    amp = resolve_precision(tc.precision, device)
    batches, loss_acc = FixedBatch(x, y), torch.zeros((), device=device)
    return lambda: train_step(module, model, optimizer, batches, [0], tc, device, amp, loss_acc), model


def hf_step(cfg, tc: TrainConfig, device, x, y) -> tuple[Callable[[], None], torch.nn.Module]:
    """transformers: a plain loop; same AdamW groups (decay on matrices), clipping and autocast."""
    model = hf_model(cfg).to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": tc.weight_decay},
                                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=tc.lr, betas=(tc.beta1, tc.beta2), fused=device.type == "cuda")
    module = torch.compile(model) if tc.compile else model
    amp = resolve_precision(tc.precision, device)

    def step() -> None:
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = module(input_ids=x, labels=y, shift_labels=y).loss  # y is already shifted
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the process's peak RSS so far


def measure(name: str, build, cfg, tc: TrainConfig, device, x, y, warmup: int, steps: int,
            check_syncs: bool = False) -> dict:
    """Build one side, warm it up (compilation happens here), then time `steps` steps. With
    `check_syncs` on CUDA, any host-device sync inside the timed steps raises."""
    torch._dynamo.reset()  # drop the other side's compiled graphs (and what they hold on to)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    step, model = build(cfg, tc, device, x, y)
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    _sync(device)
    warm_s = time.perf_counter() - t0
    if check_syncs and device.type == "cuda":
        torch.cuda.set_sync_debug_mode("error")
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if check_syncs and device.type == "cuda":
        torch.cuda.set_sync_debug_mode("default")
    _sync(device)
    seconds = (time.perf_counter() - t0) / steps
    n_params = sum(p.numel() for p in model.parameters())
    result = {"name": name, "parameters": n_params, "step_s": seconds, "tokens_per_s": x.numel() / seconds,
              "warmup_s": warm_s, "peak_mem_mb": peak_memory_mb(device)}
    del step, model
    return result


def main(argv: Optional[list[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(BENCH_PRESETS), default="124m")
    ap.add_argument("--device", default="auto", help="auto | cuda | cpu")
    ap.add_argument("--batch", type=int, help="micro-batch size (default: the preset's)")
    ap.add_argument("--seq", type=int, help="sequence length (default: the preset's)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per side")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (torch.compile compiles here)")
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--loss-chunk", type=int, help="llm-maker's train.loss_chunk_size (default: the preset's)")
    ap.add_argument("--optimizer", default="adamw", choices=["adamw", "muon"], help="llm-maker's side only")
    ap.add_argument("--only", choices=["llm-maker", "transformers"], help="run one side (e.g. for peak RSS on CPU)")
    ap.add_argument("--check-syncs", action="store_true",
                    help="CUDA: fail if llm-maker's step waits for the GPU (torch.cuda.set_sync_debug_mode)")
    ap.add_argument("--threads", type=int, help="CPU intra-op threads (default: torch's)")
    ap.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: train/mfu.py's table)")
    ap.add_argument("--out", help="JSON record (default: bench/results/train_throughput_<device>_<preset>.json)")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    p = BENCH_PRESETS[args.preset]
    seq = args.seq or p["seq_len"]
    cfg = resolve_model_config(SimpleNamespace(preset=p["model"], seq_len=seq), vocab_size=p["vocab_size"])
    device = resolve_device(args.device)
    tc = TrainConfig(device=str(device), precision=args.precision, compile=args.compile, optimizer=args.optimizer,
                     loss_chunk_size=p["loss_chunk"] if args.loss_chunk is None else args.loss_chunk,
                     lr=6e-4, grad_clip=1.0)
    batch = args.batch or p["batch"]
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g).to(device)
    y = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g).to(device)
    with torch.device("meta"):
        flops_per_token = LlamaModel(cfg).flops_per_token(seq)
    peak = device_peak_tflops(device, args.peak_tflops)
    sides = {"llm-maker": ours_step, "transformers": hf_step}
    results = {}
    for name, build in sides.items():
        if args.only in (None, name):
            results[name] = measure(name, build, cfg, tc, device, x, y, args.warmup, args.steps,
                                    check_syncs=args.check_syncs and name == "llm-maker")
            results[name]["mfu"] = mfu(flops_per_token, results[name]["tokens_per_s"], peak)
    if len(results) == 2:
        assert results["llm-maker"]["parameters"] == results["transformers"]["parameters"], "shapes differ"

    import transformers

    record = {"preset": args.preset, "model": cfg.to_dict(), "batch": batch, "seq_len": seq,
              "tokens_per_step": batch * seq, "flops_per_token": flops_per_token, "peak_tflops": peak,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
              f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
              "precision": "bf16" if resolve_precision(tc.precision, device) else "fp32", "compile": tc.compile,
              "loss_chunk_size": tc.loss_chunk_size, "optimizer": tc.optimizer, "steps": args.steps,
              "warmup": args.warmup, "torch": torch.__version__, "transformers": transformers.__version__,
              "date": time.strftime("%Y-%m-%d"), "results": results}
    if len(results) == 2:
        record["ratio_tokens_per_s"] = results["llm-maker"]["tokens_per_s"] / results["transformers"]["tokens_per_s"]
    print_record(record)
    out = Path(args.out or f"bench/results/train_throughput_{device.type}_{args.preset}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    return record


def print_record(r: dict) -> None:
    mem = "peak GPU memory" if "CPU" not in r["device"] else "process peak RSS"
    print(f"{r['preset']} ({r['flops_per_token'] / 1e6:,.1f} MFLOP/token), batch {r['batch']} x {r['seq_len']}, "
          f"{r['precision']}, compile={r['compile']}, loss_chunk={r['loss_chunk_size']}, {r['optimizer']}; "
          f"{r['device']}; torch {r['torch']}, transformers {r['transformers']}")
    print(f"  {'':13s} {'tokens/s':>12s} {'MFU':>7s} {mem + ' (MB)':>24s} {'warm-up s':>10s}")
    for name, res in r["results"].items():
        m = "-" if res["mfu"] is None else f"{100 * res['mfu']:.1f}%"
        print(f"  {name:13s} {res['tokens_per_s']:12,.0f} {m:>7s} {res['peak_mem_mb']:24,.0f} {res['warmup_s']:10.1f}")
    if "ratio_tokens_per_s" in r:
        print(f"  ratio llm-maker / transformers: {r['ratio_tokens_per_s']:.3f}")


if __name__ == "__main__":
    main()
