"""Two nodes on one machine: two torchrun launches (--nnodes=2, a c10d rendezvous on 127.0.0.1,
gloo) train the demo shape to the same losses as one process, to 1e-5, and a checkpoint the two
nodes wrote resumes on one process to the same end: the README's multi-node recipe, tested."""
from __future__ import annotations

import csv
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llm_maker.cli import main

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def losses(stage_dir: Path) -> list[tuple[int, float]]:
    with open(stage_dir / "metrics.csv", newline="") as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]


def pretrain(recipe: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llm_maker", "pretrain", str(recipe), *extra],
                          capture_output=True, text=True, timeout=300)


def two_nodes(recipe: Path) -> None:
    port = free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={rank}",
                               "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
                               "--rdzv_id=llm-maker-test", "-m", "llm_maker", "pretrain", str(recipe)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    outputs = [n.communicate(timeout=300)[0] for n in nodes]
    assert all(n.returncode == 0 for n in nodes), "\n\n".join(o[-3000:] for o in outputs)


def test_two_nodes_equal_one_process_and_resume_on_one(tmp_path, prose_jsonl):
    demo = yaml.safe_load((Path(__file__).parents[1] / "configs" / "demo.yaml").read_text())
    recipe = {"name": "nodes", "run_dir": str(tmp_path / "one"), "seed": 7,
              "data": {"sources": [{"type": "jsonl", "path": str(prose_jsonl)}], "val_fraction": 0.1},
              "tokenizer": {"vocab_size": 512}, "model": demo["model"],  # the demo shape
              "train": {"micro_batch_size": 4, "grad_accum_steps": 2, "max_steps": 8, "lr": 3e-3, "warmup_steps": 2,
                        "eval_every": 4, "eval_batches": 2, "checkpoint_every": 4, "keep_checkpoints": 2,
                        "log_every": 1, "precision": "fp32", "device": "cpu", "progress": False},
              "sft": {"enabled": False}}
    one = tmp_path / "one.yaml"
    one.write_text(yaml.safe_dump(recipe))
    assert main(["pipeline", str(one), "--only", "data", "tokenizer", "pack"]) == 0
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    two = tmp_path / "two.yaml"
    two.write_text(yaml.safe_dump({**recipe, "run_dir": str(tmp_path / "two")}))

    done = pretrain(one)
    assert done.returncode == 0, done.stdout + done.stderr
    two_nodes(two)
    reference, nodes = losses(tmp_path / "one" / "pretrain"), losses(tmp_path / "two" / "pretrain")
    assert [s for s, _ in nodes] == [s for s, _ in reference] == list(range(1, 9))
    assert all(abs(a - b) < 1e-5 for (_, a), (_, b) in zip(reference, nodes, strict=True))

    # The two nodes' step-4 checkpoint, continued by one process, ends where the others did.
    stage = tmp_path / "two" / "pretrain"
    shutil.rmtree(stage / "checkpoints" / "step_00000008")
    shutil.rmtree(stage / "final")
    (stage / "manifest.json").unlink()
    resumed = pretrain(two, "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert abs(losses(stage)[-1][1] - reference[-1][1]) < 1e-5
