"""Distillation pays, measured on CPU in one run: a small student distilled from a larger teacher
reaches a lower held-out cross-entropy than the same student trained on the data alone, for the
same number of tokens.

Built-in corpus (configs/demo.yaml's data, tokenizer and pack). The teacher is the demo shape
(`tiny`: 4 layers, d_model 128, 1.3M parameters) pretrained for --teacher-steps; the student is
smaller (2 layers, d_model 64, 0.36M parameters, 0.26M of them the tied embedding). Both students
start from the same seed and see the same blocks in the same order (distill.train = train); one
learns from the targets alone (the pretrain stage), the other with loss = alpha * T^2 *
KL(teacher || student) + (1 - alpha) * CE (the distill stage, online teacher).
The score is each final model's cross-entropy over the whole val split (fp32), printed side by
side and written to bench/results/distill_cpu.json. The run directories are under
bench/results/distill_cpu.tmp/ (gitignored).

    python bench/distill_cpu.py [--teacher-steps 300] [--student-steps 200] [--alpha 0.9] [--temperature 2]
                                [--seq-len 128] [--precision fp32] [--threads N] [--fresh]
"""
from __future__ import annotations

import argparse
import platform
import shutil
import time
from pathlib import Path

import torch

from llm_maker.artifacts import atomic_write_json, inputs_fingerprint, is_up_to_date
from llm_maker.data.stage import prepare_data
from llm_maker.distill.stage import run_distill
from llm_maker.layout import RunPaths
from llm_maker.pack.packer import pack_tokens
from llm_maker.pack.shards import load_split
from llm_maker.recipe import load_recipe
from llm_maker.tokenizer.stage import build_tokenizer
from llm_maker.train.batches import PretrainBatches
from llm_maker.train.checkpoint import load_model_dir
from llm_maker.train.evaluation import mean_loss
from llm_maker.train.loss import CausalLMLoss
from llm_maker.train.stage import pretrain_inputs, run_pretrain

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "results" / "distill_cpu.tmp"
RESULT = ROOT / "bench" / "results" / "distill_cpu.json"
STUDENT = {"preset": "tiny", "n_layers": 2, "d_model": 64, "n_heads": 4, "n_kv_heads": 2, "d_mlp": 192}


def train_settings(steps: int, precision: str) -> dict:
    return {"max_steps": steps, "warmup_steps": min(30, steps // 10), "eval_every": steps, "checkpoint_every": steps,
            "log_every": 20, "progress": False, "precision": precision}


def recipe_for(run: str, **overrides):
    return load_recipe(ROOT / "configs" / "demo.yaml", {"run_dir": str(WORK / run), "name": run, **overrides})


def shared_inputs(run_dir: Path) -> RunPaths:
    """data/, tokenizer/ and pack/ of the demo, built once in WORK/inputs and copied into `run_dir`."""
    src = RunPaths.of(WORK / "inputs")
    recipe = recipe_for("inputs")
    prepare_data(recipe.data, src.data)
    build_tokenizer(recipe.tokenizer, src.data, src.tokenizer)
    pack_tokens(recipe.pack, src.data, src.tokenizer, src.pack)
    paths = RunPaths.of(run_dir)
    for stage in ("data", "tokenizer", "pack"):
        if not (run_dir / stage).is_dir():
            shutil.copytree(WORK / "inputs" / stage, run_dir / stage)
    return paths


def val_cross_entropy(model_dir: Path, pack_dir: Path) -> float:
    """Mean next-token cross-entropy of the model over every block of the val split, in fp32."""
    model = load_model_dir(model_dir)[0].eval()
    seq_len = model.config.seq_len
    batches = PretrainBatches(load_split(pack_dir, "train"), seq_len, 16, seed=0,
                              val_tokens=load_split(pack_dir, "val"))
    return mean_loss(CausalLMLoss(model), batches.val_batches(), "cpu")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher-steps", type=int, default=300)
    ap.add_argument("--student-steps", type=int, default=200)
    ap.add_argument("--alpha", type=float, default=0.9)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--seq-len", type=int, default=128, help="model.seq_len of teacher and student (demo: 256)")
    ap.add_argument("--precision", default="fp32", help="train.precision of every run (auto: bf16 on AMX CPUs)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--fresh", action="store_true", help="retrain the teacher too (the packed inputs are kept)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.fresh:
        for run in ("teacher", "plain", "distilled"):
            shutil.rmtree(WORK / run, ignore_errors=True)
    t0 = time.perf_counter()
    timings = {}

    teacher_paths = shared_inputs(WORK / "teacher")  # the demo shape, pretrained
    start = time.perf_counter()
    teacher_recipe = recipe_for("teacher", **{"model.seq_len": args.seq_len, **{
        f"train.{k}": v for k, v in train_settings(args.teacher_steps, args.precision).items()}})
    fp = inputs_fingerprint(pretrain_inputs(teacher_recipe, teacher_paths))
    unchanged = is_up_to_date(teacher_paths.pretrain, fp)
    run_pretrain(teacher_recipe, teacher_paths, force=not unchanged)  # reused while its settings are unchanged
    timings["teacher_s"] = round(time.perf_counter() - start, 1)
    teacher_dir = teacher_paths.final("pretrain")

    student_model = {**STUDENT, "seq_len": args.seq_len}
    student = {"model": student_model,
               **{f"train.{k}": v for k, v in train_settings(args.student_steps, args.precision).items()}}
    plain_paths = shared_inputs(WORK / "plain")
    start = time.perf_counter()
    run_pretrain(recipe_for("plain", **student), plain_paths, force=True)
    timings["plain_s"] = round(time.perf_counter() - start, 1)

    distill_paths = shared_inputs(WORK / "distilled")
    train = {**recipe_for("plain", **student).train.__dict__}  # the same train config, seed included
    distill = {"enabled": True, "teacher": str(teacher_dir), "mode": "online", "alpha": args.alpha,
               "temperature": args.temperature, "student": "scratch", "train": train}
    start = time.perf_counter()
    run_distill(recipe_for("distilled", model=student_model, distill=distill), distill_paths, force=True)
    timings["distilled_s"] = round(time.perf_counter() - start, 1)

    tokens = args.student_steps * 16 * args.seq_len
    result = {
        "what": "held-out (val split) cross-entropy, nats/token, fp32; students see the same blocks in the same order",
        "teacher": {"model": "tiny (4 layers, d_model 128)", "steps": args.teacher_steps,
                    "val_ce": round(val_cross_entropy(teacher_dir, teacher_paths.pack), 4)},
        "student": {"model": student_model, "steps": args.student_steps, "tokens": tokens},
        "plain_val_ce": round(val_cross_entropy(plain_paths.final("pretrain"), plain_paths.pack), 4),
        "distilled_val_ce": round(val_cross_entropy(distill_paths.final("distill"), distill_paths.pack), 4),
        "alpha": args.alpha, "temperature": args.temperature, "precision": args.precision, "timings_s": timings,
        "total_s": round(time.perf_counter() - t0, 1), "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    result["gain_nats"] = round(result["plain_val_ce"] - result["distilled_val_ce"], 4)
    atomic_write_json(RESULT, result)
    print(f"teacher ({args.teacher_steps} steps): val CE {result['teacher']['val_ce']:.4f}")
    print(f"student, {tokens:,} tokens   plain: val CE {result['plain_val_ce']:.4f}   "
          f"distilled (alpha {args.alpha}, T {args.temperature}): val CE {result['distilled_val_ce']:.4f}   "
          f"gain {result['gain_nats']:+.4f} nats")
    print(f"wrote {RESULT.relative_to(ROOT)} ({result['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
