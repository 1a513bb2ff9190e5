"""Two ranks on CPU (gloo): DDP and FSDP2 train like one process at the same global batch, each
rank reads a disjoint slice, only rank 0 writes, and a 2-rank checkpoint resumes on 1 rank.

One `torch.multiprocessing.spawn` runs every 2-rank job (process start-up dominates on CPU);
the one-process references and resumes run in the test process.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml

from helpers import tiny_model
from llm_maker.cli import main
from llm_maker.errors import RecipeError
from llm_maker.pack.shards import load_split
from llm_maker.recipe import TrainConfig
from llm_maker.tokenizer.tokenizer import Tokenizer
from llm_maker.train.batches import PretrainBatches
from llm_maker.train.checkpoint import list_checkpoints, load_model_dir
from llm_maker.train.distributed import DistContext, rank_micro_batches
from llm_maker.train.trainer import run_training

pytestmark = [pytest.mark.slow,  # 2 gloo ranks in subprocesses
              pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                 reason="torch.distributed with gloo is not available")]

STEPS, STOP_AT = 12, 7


def config(**kw) -> TrainConfig:
    base = dict(precision="fp32",  # equivalences to 1e-5 are checked in fp32
                max_steps=STEPS, micro_batch_size=4, grad_accum_steps=2, lr=1e-2, warmup_steps=3, eval_every=4,
                eval_batches=2, checkpoint_every=4, keep_checkpoints=2, log_every=2, progress=False, device="cpu")
    return TrainConfig(**{**base, **kw})


MODES = {"ddp": {}, "fsdp2": {"distributed": "fsdp2", "loss_chunk_size": 48}}  # train config overrides
JOBS = [  # (run directory, mode, stop at step STOP_AT?, resume?), in order, on 2 ranks
    ("ddp", "ddp", False, False),
    ("ddp_stop", "ddp", True, False),  # resumed on 1 rank by a test
    ("fsdp2", "fsdp2", False, False),
    ("fsdp2_stop", "fsdp2", True, False),  # resumed on 1 rank by a test
    ("fsdp2_2to2", "fsdp2", True, False),
    ("fsdp2_2to2", "fsdp2", False, True),  # 2 ranks -> 2 ranks
    ("fsdp2_1to2", "fsdp2", False, True),  # stopped by one process in the fixture -> 2 ranks
]


class RecordingBatches(PretrainBatches):
    """Remembers which global micro-batches this process read; optionally asks to stop."""

    def __init__(self, *args, stop_file: Path | None = None, **kw):
        super().__init__(*args, **kw)
        self.read, self.stop_file = [], stop_file

    def micro_batch(self, index):
        if self.stop_file is not None and index == (STOP_AT - 1) * 2:  # first micro-batch of step STOP_AT
            self.stop_file.touch()  # seen by rank 0 only: the ranks must agree to stop
        self.read.append(index)
        return super().micro_batch(index)


def batches_for(pack_dir: Path, stop_file: Path | None = None) -> RecordingBatches:
    return RecordingBatches(load_split(pack_dir, "train"), 32, 4, seed=0, val_tokens=load_split(pack_dir, "val"),
                            stop_file=stop_file)


def _worker(rank: int, world: int, port: int, pack_dir: str, tok_dir: str, root: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from llm_maker.train.distributed import shutdown_distributed

    tokenizer = Tokenizer.load(tok_dir)
    for name, mode, stop, resume in JOBS:
        out = Path(root) / name
        batches = batches_for(Path(pack_dir), stop_file=out / "STOP" if stop and rank == 0 else None)
        model = tiny_model(tokenizer.vocab_size, seq_len=32)
        summary = run_training(model, batches, config(**MODES[mode]), out, tokenizer, {},
                               resume=resume)
        (Path(root) / f"{name}.rank{rank}.json").write_text(json.dumps({"read": batches.read, "summary": summary}))
        dist.barrier()
    shutdown_distributed()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory, pack_dir, tokenizer_dir) -> Path:
    for attempt in range(2):  # a second try only for the rare race on the free port between bind and use
        root = tmp_path_factory.mktemp("ranks")
        tokenizer = Tokenizer.load(tokenizer_dir)  # one process stops a run that 2 ranks will resume
        run_training(tiny_model(tokenizer.vocab_size, seq_len=32),
                     batches_for(pack_dir, stop_file=root / "fsdp2_1to2" / "STOP"),
                     config(**MODES["fsdp2"]), root / "fsdp2_1to2", tokenizer, {})
        try:
            torch.multiprocessing.spawn(_worker, args=(2, free_port(), str(pack_dir), str(tokenizer_dir), str(root)),
                                        nprocs=2, join=True)
            return root
        except torch.multiprocessing.ProcessRaisedException as e:
            if attempt == 1 or "Address already in use" not in str(e):
                raise


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, pack_dir, tokenizer_dir) -> dict[str, Path]:
    """Uninterrupted one-process runs of the same recipes: the references."""
    root, tokenizer = tmp_path_factory.mktemp("single"), Tokenizer.load(tokenizer_dir)
    outs = {}
    for name in ("ddp", "fsdp2"):
        run_training(tiny_model(tokenizer.vocab_size, seq_len=32), batches_for(pack_dir), config(**MODES[name]),
                     root / name,
                     tokenizer, {})
        outs[name] = root / name
    return outs


def losses(out: Path) -> list[tuple[int, float, float]]:
    with open(out / "metrics.csv", newline="") as f:
        return [(int(r["step"]), float(r["loss"]), float(r["val_loss"] or "nan")) for r in csv.DictReader(f)]


def assert_same_curve(a: Path, b: Path, steps: set[int] | None = None) -> None:
    la = {s: (loss, v) for s, loss, v in losses(a)}
    lb = {s: (loss, v) for s, loss, v in losses(b)}
    for step in sorted(steps or (set(la) & set(lb))):
        assert la[step][0] == pytest.approx(lb[step][0], abs=1e-5), f"loss at step {step}"
        if la[step][1] == la[step][1]:  # not NaN: a validation row
            assert la[step][1] == pytest.approx(lb[step][1], abs=1e-5), f"val loss at step {step}"


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_model_dir(a)[0].state_dict(), load_model_dir(b)[0].state_dict()
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k


def test_micro_batches_are_dealt_round_robin_and_must_divide():
    ranks = [rank_micro_batches(3, 4, DistContext(rank=r, local_rank=r, world_size=2)) for r in (0, 1)]
    assert ranks == [[12, 14], [13, 15]]
    assert rank_micro_batches(3, 4, DistContext()) == [12, 13, 14, 15]
    with pytest.raises(RecipeError, match=r"`train.grad_accum_steps` is 3, not a multiple of the 2 ranks"):
        rank_micro_batches(0, 3, DistContext(rank=0, local_rank=0, world_size=2))


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_ranks_train_like_one_process(mode, two_rank_runs, one_process):
    out = two_rank_runs / mode
    assert_same_curve(out, one_process[mode])
    assert [s for s, _, _ in losses(out)] == [s for s, _, _ in losses(one_process[mode])]  # rank 0's rows, once each
    assert_same_weights(out / "final", one_process[mode] / "final")
    reads = [json.loads((two_rank_runs / f"{mode}.rank{r}.json").read_text())["read"] for r in (0, 1)]
    assert not set(reads[0]) & set(reads[1])  # disjoint slices ...
    assert sorted(reads[0] + reads[1]) == list(range(STEPS * 2))  # ... that together are one process's data
    summaries = [json.loads((two_rank_runs / f"{mode}.rank{r}.json").read_text())["summary"] for r in (0, 1)]
    assert summaries[0]["world_size"] == 2 and summaries[0]["final_loss"] == summaries[1]["final_loss"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000008", "step_00000012"]


def test_fsdp2_checkpoints_hold_every_ranks_shard_and_full_weights(two_rank_runs):
    ckpt = two_rank_runs / "fsdp2" / "checkpoints" / "step_00000012"
    assert sorted(p.name for p in (ckpt / "dcp").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert (ckpt / "model.safetensors").is_file() and not (ckpt / "optimizer.pt").exists()
    assert load_model_dir(ckpt)[0].config.vocab_size == 512


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_rank_checkpoint_resumes_on_one_rank(mode, two_rank_runs, one_process, tokenizer_dir, pack_dir):
    out = two_rank_runs / f"{mode}_stop"
    stopped = json.loads((two_rank_runs / f"{mode}_stop.rank1.json").read_text())["summary"]
    assert stopped["stopped"] and stopped["steps"] == STOP_AT  # rank 1 stopped too, at rank 0's step
    assert [p.name for p in list_checkpoints(out / "checkpoints")][-1] == f"step_{STOP_AT:08d}"
    tokenizer = Tokenizer.load(tokenizer_dir)
    model = tiny_model(tokenizer.vocab_size, seq_len=32)
    summary = run_training(model, batches_for(pack_dir), config(**MODES[mode]), out,
                           tokenizer, {}, resume=True)
    assert summary["steps"] == STEPS and summary["world_size"] == 1
    assert_same_curve(out, one_process[mode], steps={10, 12})  # the full log windows after the resume
    assert_same_weights(out / "final", one_process[mode] / "final")


def test_torchrun_pretrain_on_two_ranks_equals_one_process(tmp_path, data_dir):
    """The user's command: `torchrun --nproc_per_node=2 -m llm_maker pretrain RECIPE`."""
    recipes = {}
    for name in ("one", "two"):
        for stage in ("tokenizer", "pack"):  # the stages before pretraining, built once by conftest
            shutil.copytree(data_dir.parent / stage, tmp_path / name / stage)
        recipe = {"name": name, "run_dir": str(tmp_path / name),
                  "model": {"preset": "tiny", "n_layers": 2, "d_model": 32, "n_heads": 4, "n_kv_heads": 2,
                            "d_mlp": 64, "seq_len": 32},
                  "train": {**{k: v for k, v in vars(config()).items() if k in ("micro_batch_size", "lr",
                            "warmup_steps", "eval_every", "eval_batches", "checkpoint_every", "log_every")},
                            "max_steps": 8, "grad_accum_steps": 2, "device": "cpu", "progress": False}}
        recipes[name] = tmp_path / f"{name}.yaml"
        recipes[name].write_text(yaml.safe_dump(recipe))
    assert main(["pretrain", str(recipes["one"])]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "llm_maker", "pretrain",
                           str(recipes["two"])], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = tmp_path / "one" / "pretrain", tmp_path / "two" / "pretrain"
    assert_same_curve(two, one)
    assert [s for s, _, _ in losses(two)] == [s for s, _, _ in losses(one)]  # rank 0 alone wrote the rows
    assert_same_weights(two / "final", one / "final")
    manifest = json.loads((two / "manifest.json").read_text())
    assert manifest["summary"]["world_size"] == 2 and manifest["summary"]["steps"] == 8
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())


@pytest.mark.parametrize("name", ["fsdp2_2to2", "fsdp2_1to2"])
def test_fsdp2_checkpoint_resumes_on_two_ranks(name, two_rank_runs, one_process):
    """Sharded checkpoints reshard on load: 2 ranks -> 2 ranks, and one process -> 2 ranks."""
    out = two_rank_runs / name
    ranks = [json.loads((two_rank_runs / f"{name}.rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["summary"]["steps"] == STEPS and not r["summary"]["stopped"] for r in ranks)
    assert [min(r["read"]) for r in ranks] == [STOP_AT * 2, STOP_AT * 2 + 1]  # on from the checkpoint's step
    assert_same_curve(out, one_process["fsdp2"], steps={10, 12})
    assert_same_weights(out / "final", one_process["fsdp2"] / "final")
