"""Pretraining tokens/s of llm-maker's model beside transformers' LlamaForCausalLM, same run.

Both models get the demo shape (the `tiny` preset), the same batch, the same AdamW settings
(weight decay on matrices, clipping at 1.0) and the same step: forward, fp32 loss, backward,
clip, optimizer step. Rounds alternate between the two so machine noise hits both alike; the
figure is the ratio of median tokens/s (ours / theirs).

    python bench/pretrain_throughput_cpu.py [--preset tiny] [--batch 16] [--rounds 5] [--steps 10]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from llm_maker.model.llama import LlamaModel
from llm_maker.model.presets import resolve_model_config
from llm_maker.train.loss import CausalLMLoss


def hf_model(cfg):
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    hf_cfg = HFConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_mlp,
                      num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                      num_key_value_heads=cfg.n_kv_heads, max_position_embeddings=cfg.seq_len,
                      rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings,
                      attn_implementation="sdpa")
    return LlamaForCausalLM(hf_cfg)


def optimizer_for(model: torch.nn.Module) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.95))


def timed_steps(loss_fn, model, opt, x, y, steps: int) -> float:
    """Seconds for `steps` full training steps."""
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = loss_fn(model, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def ours_loss(model, x, y):
    return CausalLMLoss(model)(x, y)


def hf_loss(model, x, y):
    logits = model(input_ids=x).logits  # same fp32 cross-entropy as ours, no internal shift
    return torch.nn.functional.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default="bench/results/pretrain_throughput_cpu.json")
    args = ap.parse_args()

    cfg = resolve_model_config(SimpleNamespace(preset=args.preset), vocab_size=args.vocab_size)
    torch.manual_seed(0)
    ours, theirs = LlamaModel(cfg), hf_model(cfg)
    n_ours, n_theirs = ours.num_parameters(), sum(p.numel() for p in theirs.parameters())
    assert n_ours == n_theirs, f"shapes differ: {n_ours} vs {n_theirs} parameters"
    x = torch.randint(0, cfg.vocab_size, (args.batch, cfg.seq_len))
    y = torch.randint(0, cfg.vocab_size, (args.batch, cfg.seq_len))
    runs = {"llm-maker": (ours_loss, ours, optimizer_for(ours)),
            "transformers": (hf_loss, theirs, optimizer_for(theirs))}
    for loss_fn, model, opt in runs.values():  # warm-up
        timed_steps(loss_fn, model, opt, x, y, 2)
    tps: dict[str, list[float]] = {k: [] for k in runs}
    tokens = args.batch * cfg.seq_len * args.steps
    for r in range(args.rounds):
        order = list(runs) if r % 2 == 0 else list(reversed(runs))
        for name in order:
            tps[name].append(tokens / timed_steps(*runs[name], x, y, args.steps))
    med = {k: statistics.median(v) for k, v in tps.items()}
    result = {
        "preset": args.preset, "parameters": n_ours, "batch": args.batch, "seq_len": cfg.seq_len,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine(),
        "processor": platform.processor(), "tokens_per_s_median": {k: round(v, 1) for k, v in med.items()},
        "tokens_per_s_all": {k: [round(t, 1) for t in v] for k, v in tps.items()},
        "ratio_ours_over_theirs": round(med["llm-maker"] / med["transformers"], 3),
    }
    import transformers

    result["transformers"] = transformers.__version__
    print(f"{args.preset} ({n_ours:,} params), batch {args.batch} x {cfg.seq_len}, {result['threads']} threads, CPU")
    for k, v in med.items():
        print(f"  {k:13s} {v:10,.0f} tokens/s")
    print(f"  ratio ours/theirs: {result['ratio_ours_over_theirs']:.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
