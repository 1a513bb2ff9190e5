"""DPO pays, measured: an SFT model on the built-in corpus, then DPO on the built-in preference set,
and the two side by side on the held-out pairs' prompts (dpo/data/heldout.jsonl).

  preference accuracy   the share of held-out pairs whose chosen completion the model prefers:
                        implicit: summed log-prob(chosen) > summed log-prob(rejected), for both models
                        vs reference: (pi_c - ref_c) - (pi_r - ref_r) > 0, DPO's own margin (the SFT
                        model is the reference, so its own margin is 0 on every pair)
                        first difference: at the first token where chosen and rejected differ (for
                        the built-in set: <|im_end|> against the ramble's first word), the chosen
                        token is the likelier one
  stop rate             the share of held-out prompts whose greedy answer (serve/generate.py, at most
                        --max-new-tokens) ends its turn with the template's end token (<|im_end|>); and
                        the share that does so after a non-empty answer (an empty turn also "stops")

The run (configs/demo.yaml, shortened) lives in bench/results/dpo_cpu-pP-sS.tmp/ (ignored by git); its
stages skip themselves when up to date, so a second run only measures (delete its dpo/ to retrain
DPO after changing the built-in set: its fingerprint does not hash the code). Figures to
bench/results/dpo_cpu.json (--json).

    python bench/dpo_cpu.py [--pretrain-steps 200] [--sft-steps 150] [--dpo-steps 80] [--max-new-tokens 48]
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from llm_maker.artifacts import atomic_write_json, read_manifest
from llm_maker.data.stage import prepare_data
from llm_maker.dpo.data import encode_pairs, pad_pairs, pair_seq_len
from llm_maker.dpo.loss import DPOLoss
from llm_maker.dpo.stage import run_dpo
from llm_maker.errors import CheckpointError
from llm_maker.layout import RunPaths
from llm_maker.pack.packer import pack_tokens
from llm_maker.recipe import load_recipe
from llm_maker.serve.generate import generate
from llm_maker.sft.stage import run_sft
from llm_maker.sft.templates import end_token, prompt_ids, stop_token_ids
from llm_maker.tokenizer.stage import build_tokenizer
from llm_maker.train.checkpoint import load_model_dir
from llm_maker.train.stage import run_pretrain

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def recipe_for(args: argparse.Namespace):
    overrides = {
        "run_dir": str(RESULTS / f"dpo_cpu-p{args.pretrain_steps}-s{args.sft_steps}.tmp"),  # one per SFT model
        # the demo's tiny preset, smaller still: minutes on 2 shared cores, pretraining and SFT included
        "tokenizer.vocab_size": 2048, "model.n_layers": 2, "model.d_model": 64, "model.n_heads": 4,
        "model.n_kv_heads": 2, "model.d_mlp": 192, "model.seq_len": 128, "train.micro_batch_size": 16,
        "sft.train.micro_batch_size": 16,
        "train.max_steps": args.pretrain_steps, "train.eval_every": 100, "train.checkpoint_every": 100,
        "train.progress": False,
        "sft.train.max_steps": args.sft_steps, "sft.train.eval_every": 50, "sft.train.checkpoint_every": 50,
        "sft.train.progress": False,
        "dpo.enabled": True, "dpo.beta": args.beta, "dpo.sft_weight": args.sft_weight,
        "dpo.train.max_steps": args.dpo_steps, "dpo.train.lr": args.dpo_lr, "dpo.train.micro_batch_size": 8,
        "dpo.train.warmup_steps": 10, "dpo.train.eval_every": 20, "dpo.train.eval_batches": 16,
        "dpo.train.checkpoint_every": 60, "dpo.train.log_every": 10, "dpo.train.progress": False,
        "eval.enabled": False,
    }
    return load_recipe(ROOT / "configs" / "demo.yaml", overrides)


def train_dpo(recipe, paths: RunPaths) -> Path:
    try:
        return run_dpo(recipe, paths)
    except CheckpointError:  # dpo/ holds a run of other --dpo-* settings: this run's replace it
        return run_dpo(recipe, paths, force=True)


def build(recipe, paths: RunPaths) -> dict[str, float]:
    """The stages up to DPO (each skipped when up to date); seconds per stage."""
    seconds = {}
    for name, step in (("data", lambda: prepare_data(recipe.data, paths.data)),
                       ("tokenizer", lambda: build_tokenizer(recipe.tokenizer, paths.data, paths.tokenizer)),
                       ("pack", lambda: pack_tokens(recipe.pack, paths.data, paths.tokenizer, paths.pack)),
                       ("pretrain", lambda: run_pretrain(recipe, paths)), ("sft", lambda: run_sft(recipe, paths)),
                       ("dpo", lambda: train_dpo(recipe, paths))):
        t0 = time.perf_counter()
        step()
        seconds[name] = round(time.perf_counter() - t0, 1)
        print(f"{name}: {seconds[name]} s", flush=True)
    return seconds


@torch.no_grad()
def summed_logprobs(model, pairs, seq_len: int, pad_id: int, batch: int = 16) -> torch.Tensor:
    """(n, 2): each held-out pair's summed completion log-probs (chosen, rejected), in fp32."""
    module = DPOLoss(model, beta=1.0).eval()
    out = [torch.stack(module.pair_logprobs(*pad_pairs(pairs[i:i + batch], seq_len, pad_id)), dim=1)
           for i in range(0, len(pairs), batch)]
    return torch.cat(out)


@torch.no_grad()
def chosen_loss(model, pairs, seq_len: int, pad_id: int) -> float:
    """The mean cross-entropy per token of the held-out chosen completions (the stage's val_loss)."""
    xc, yc, _, _ = pad_pairs(pairs, seq_len, pad_id)
    return float(DPOLoss(model, beta=1.0).eval()(xc, yc))


@torch.no_grad()
def first_difference_acc(model, pairs) -> float:
    """The share of pairs whose chosen token beats the rejected one where the two first differ: for
    the built-in set, <|im_end|> against the first word of the ramble, right after the answer."""
    wins = 0
    for p in pairs:
        c, r = p.chosen.ids, p.rejected.ids
        i = next(k for k in range(min(len(c), len(r))) if c[k] != r[k])
        logp = model(torch.tensor([c[:i]]))[0, -1].float().log_softmax(-1)  # (V,): the next token after the prefix
        wins += bool(logp[c[i]] > logp[r[i]])
    return wins / len(pairs)


def stop_rate(model, tokenizer, triples, template: str, max_new_tokens: int) -> dict[str, float]:
    """Greedy answers to the held-out prompts: the share ending on the template's end token, mean length."""
    end_id, stops = tokenizer.token_id(end_token(template)), stop_token_ids(tokenizer, template)
    ended, answered, lengths = 0, 0, []
    for t in triples:
        gen = generate(model, prompt_ids(tokenizer, t["prompt"], template), max_new_tokens=max_new_tokens,
                       stop_ids=stops)
        for _ in gen:
            pass
        stopped = gen.stopped and gen.new_ids[-1] == end_id
        ended += stopped
        answered += stopped and len(gen.new_ids) > 1  # an answer, then the end token (not an empty turn)
        lengths.append(len(gen.new_ids) - stopped)
    n = len(triples)
    return {"stop_rate": ended / n, "stop_rate_nonempty": answered / n, "mean_answer_tokens": sum(lengths) / n}


def measure(paths: RunPaths, max_new_tokens: int) -> dict[str, dict]:
    heldout = [json.loads(line) for line in (paths.dpo / "data" / "heldout.jsonl").read_text().splitlines()]
    sft_dir = Path(read_manifest(paths.dpo)["start_model"])
    models = {"sft": sft_dir, "dpo": paths.model("dpo")}
    loaded = {name: load_model_dir(d) for name, d in models.items()}  # fp32: exactly what was saved
    tokenizer, template = loaded["sft"][1], loaded["sft"][2].template
    pairs, _ = encode_pairs(tokenizer, heldout, template, loaded["sft"][0].config.seq_len + 1)
    seq_len = pair_seq_len(pairs)
    logps = {name: summed_logprobs(m, pairs, seq_len, tokenizer.pad_id) for name, (m, _, _) in loaded.items()}
    ref = logps["sft"]  # the reference DPO trained against
    beta = read_manifest(paths.dpo)["beta"]
    results = {}
    for name, (model, _, _) in loaded.items():
        lp = logps[name]
        margin = beta * ((lp[:, 0] - ref[:, 0]) - (lp[:, 1] - ref[:, 1]))
        results[name] = {"model": str(models[name]), "heldout_pairs": len(pairs),
                         "pref_acc_implicit": float((lp[:, 0] > lp[:, 1]).float().mean()),
                         "pref_acc_vs_reference": float((margin > 0).float().mean()),
                         "mean_reward_margin": float(margin.mean()),
                         "pref_acc_first_difference": first_difference_acc(model, pairs),
                         "chosen_answer_tokens": sum(len(tokenizer.encode(t["chosen"])) for t in heldout)
                         / len(heldout),
                         "chosen_loss": chosen_loss(model, pairs, seq_len, tokenizer.pad_id),
                         "mean_logprob_chosen": float(lp[:, 0].mean()),
                         "mean_logprob_rejected": float(lp[:, 1].mean()),
                         **stop_rate(model, tokenizer, heldout, template, max_new_tokens)}
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pretrain-steps", type=int, default=200)
    p.add_argument("--sft-steps", type=int, default=150)
    p.add_argument("--dpo-steps", type=int, default=80)
    p.add_argument("--dpo-lr", type=float, default=5e-5)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--sft-weight", type=float, default=0.0, help="dpo.sft_weight: + the chosen answers' CE")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--json", type=Path, default=RESULTS / "dpo_cpu.json")
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    recipe = recipe_for(args)
    paths = RunPaths.of(recipe.run_dir)
    t0 = time.perf_counter()
    seconds = build(recipe, paths)
    results = measure(paths, args.max_new_tokens)
    seconds["measure"] = round(time.perf_counter() - t0 - sum(seconds.values()), 1)
    m = read_manifest(paths.dpo)
    print(f"\n{'':28}{'SFT':>10}{'DPO':>10}")
    for key, label in (("pref_acc_implicit", "pref acc (lp_c > lp_r)"), ("pref_acc_vs_reference", "pref acc (vs ref)"),
                       ("pref_acc_first_difference", "pref acc (first diff token)"),
                       ("stop_rate", f"stop rate (<= {args.max_new_tokens} tok)"),
                       ("stop_rate_nonempty", "  of them a non-empty answer"),
                       ("mean_answer_tokens", "mean answer tokens")):
        print(f"{label:28}{results['sft'][key]:>10.3f}{results['dpo'][key]:>10.3f}")
    print(f"held-out chosen answers: {results['sft']['chosen_answer_tokens']:.2f} tokens on average; "
          f"held-out chosen loss (val_loss): SFT {results['sft']['chosen_loss']:.3f}, "
          f"DPO {results['dpo']['chosen_loss']:.3f}")
    print(f"held-out pairs: {results['sft']['heldout_pairs']}, DPO steps: {m['summary']['steps']}, "
          f"total {sum(seconds.values()):.0f} s")
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    out = {"bench": "dpo_cpu", "args": settings, "seconds": seconds, "results": results,
           "dpo_summary": {k: m["summary"].get(k) for k in ("steps", "final_loss", "val_loss", "precision")},
           "dpo_counts": {k: m[k] for k in ("pairs", "kept_train", "kept_heldout", "dropped_too_long",
                                            "dropped_prompt_too_long")},
           "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                       "torch": torch.__version__}}
    atomic_write_json(args.json, out)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
