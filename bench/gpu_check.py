"""The GPU check, one command: `bench/gpu_check.sh OUT_DIR` (this file does the work).

On one H100/H200 it finishes within 8 minutes and writes OUT_DIR/gpu_check.json plus each part's
log. Parts, each timed and recorded even when another fails:
  device        device, driver, torch and CUDA versions
  throughput    bench/train_throughput.py: 124m at seq 1024, 135m at seq 2048, 166m at 16 x 1024,
                llm-maker against the transformers loop (tokens/s, MFU, peak memory, ratio)
  graph_breaks  torch._dynamo.explain over the compiled training module: the count must be 0
  quality       the built-in corpus on the 124m shape in bf16 and in fp16: the loss falls and
                nothing is non-finite
  ddp, fsdp2    one-rank torchrun smokes of `llm-maker pretrain` with each mode
  lm_eval       lm-eval on a GPU export of the quality run's model (bf16, batch auto)
`--cpu-smoke` runs tiny versions of every part on a CPU in under 3 minutes
(tests/test_gpu_check.py runs it, so the script cannot rot).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str], log: Path, timeout: int) -> tuple[int, float]:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, cwd=ROOT).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, round(time.perf_counter() - t0, 1)


def device_info() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"}
    try:
        info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                        capture_output=True, text=True, timeout=20).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        info["driver"] = None
    return info


def graph_breaks(device: str, preset: str, seq_len: int) -> dict:
    from llm_maker.model.llama import LlamaModel
    from llm_maker.model.presets import resolve_model_config
    from llm_maker.train.loss import CausalLMLoss

    cfg = resolve_model_config(argparse.Namespace(preset=preset, seq_len=seq_len), vocab_size=None)
    module = CausalLMLoss(LlamaModel(cfg).to(device))
    x = torch.randint(0, cfg.vocab_size, (2, seq_len), device=device)
    explanation = torch._dynamo.explain(module)(x, x)
    return {"graph_breaks": explanation.graph_break_count, "graphs": explanation.graph_count,
            "reasons": [str(r.reason) for r in explanation.break_reasons][:5]}


def quality_recipe(out: Path, smoke: bool, precision: str) -> Path:
    import yaml

    model = {"preset": "tiny"} if smoke else {"preset": "124m", "vocab_size": 4096}
    train = {"max_steps": 8 if smoke else 300, "micro_batch_size": 4 if smoke else 32, "lr": 1e-3,
             "warmup_steps": 5 if smoke else 30, "eval_every": 4 if smoke else 100, "eval_batches": 2,
             "checkpoint_every": 1000, "log_every": 2 if smoke else 20, "precision": precision,
             "compile": not smoke, "progress": False, "device": "cpu" if smoke else "cuda"}
    recipe = {"name": f"quality-{precision}", "run_dir": str(out / f"quality-{precision}"),
              "data": {"sources": [{"type": "builtin", "max_documents": 150 if smoke else None}], "val_fraction": 0.05},
              "tokenizer": {"vocab_size": 512 if smoke else 4096}, "model": model, "train": train,
              "sft": {"enabled": False}}
    if recipe["data"]["sources"][0]["max_documents"] is None:
        del recipe["data"]["sources"][0]["max_documents"]
    path = out / f"quality-{precision}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def loss_check(run_dir: Path) -> dict:
    import csv

    with open(run_dir / "pretrain" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    steps = [r for r in rows if not r.get("event")]  # event rows (rollbacks) carry no loss
    losses = [float(r["loss"]) if r["loss"] else math.nan for r in steps]  # empty: no finite step in the window
    finite = all(math.isfinite(v) for v in losses)
    return {"first_loss": losses[0], "last_loss": losses[-1], "finite": finite,
            "falls": finite and losses[-1] < losses[0], "skipped_steps": steps[-1].get("skipped_steps") or None,
            "events": [r["event"] for r in rows if r.get("event")]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    ap.add_argument("--cpu-smoke", action="store_true")
    args = ap.parse_args()
    out = Path(args.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    smoke, py = args.cpu_smoke, sys.executable
    result: dict = {"mode": "cpu-smoke" if smoke else "gpu", "device": device_info(), "parts": {}}
    print(json.dumps(result["device"]))

    def record(name: str, rc: int, seconds: float, **extra) -> None:
        result["parts"][name] = {"ok": rc == 0, "rc": rc, "seconds": seconds, **extra}
        print(f"{name:24s} {'ok' if rc == 0 else f'FAILED (rc {rc})'}  {seconds:.0f}s  {extra or ''}", flush=True)

    shapes = [("tiny", ["--seq", "64", "--batch", "2"])] if smoke else [
        ("124m", ["--seq", "1024"]), ("135m", ["--seq", "2048"]), ("166m", ["--seq", "1024", "--batch", "16"])]
    for preset, extra in shapes:
        json_out = out / f"throughput_{preset}.json"
        cmd = [py, "bench/train_throughput.py", "--preset", preset, *extra, "--out", str(json_out)]
        cmd += ["--device", "cpu", "--steps", "2", "--warmup", "1", "--no-compile"] if smoke else ["--steps", "20"]
        rc, s = run(cmd, out / f"throughput_{preset}.log", 300)
        record(f"throughput_{preset}", rc, s, **(json.loads(json_out.read_text()) if rc == 0 else {}))

    t0 = time.perf_counter()
    try:
        breaks = graph_breaks("cpu" if smoke else "cuda", "tiny" if smoke else "124m", 64 if smoke else 1024)
        record("graph_breaks", 0 if breaks["graph_breaks"] == 0 else 1, round(time.perf_counter() - t0, 1), **breaks)
    except Exception as e:  # a compile failure is a finding, not the end of the check
        record("graph_breaks", 1, round(time.perf_counter() - t0, 1), error=repr(e)[:500])

    for precision in ("bf16", "fp16"):
        recipe = quality_recipe(out, smoke, precision)
        rc, s = run([py, "-m", "llm_maker", "pipeline", str(recipe), "--only", "data", "tokenizer", "pack", "pretrain"],
                    out / f"quality_{precision}.log", 240)
        checks = loss_check(out / f"quality-{precision}") if rc == 0 else {}
        record(f"quality_{precision}", 0 if rc == 0 and checks.get("falls") else 1, s, **checks)

    base = quality_recipe(out, smoke, "bf16")
    for mode in ("ddp", "fsdp2"):
        cmd = [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "llm_maker", "pretrain",
               str(base), "--force", "--set", f"train.distributed={mode}", "--set", "train.max_steps=4",
               "--set", "train.compile=false"]
        rc, s = run(cmd, out / f"{mode}.log", 180)
        record(f"smoke_{mode}", rc, s)

    rc, s = run([py, "-m", "llm_maker", "lm-eval", str(out / "quality-fp16"), "--model", "base", "--suite",
                 "tests/data/python_mc.jsonl", "--device", "cpu" if smoke else "cuda",
                 "--limit", "8" if smoke else "24"], out / "lm_eval.log", 240)
    record("lm_eval", rc, s)

    (out / "gpu_check.json").write_text(json.dumps(result, indent=1) + "\n")
    failed = [k for k, v in result["parts"].items() if not v["ok"]]
    print("all parts ok" if not failed else f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
