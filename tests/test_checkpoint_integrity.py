"""Checkpoints on a bad disk (train/checkpoint.py): a damaged file is named and its checkpoint
moved aside, a full disk is a clear error that keeps the last good checkpoint, and what killed
writes leave is removed; every resume after them ends bitwise where it should."""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import warnings
from collections import namedtuple
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from helpers import tiny_model
from llm_maker.errors import CheckpointError
from llm_maker.pack.shards import load_split
from llm_maker.recipe import TrainConfig
from llm_maker.tokenizer.tokenizer import Tokenizer
from llm_maker.train import checkpoint
from llm_maker.train.batches import PretrainBatches
from llm_maker.train.checkpoint import list_checkpoints, load_model_dir
from llm_maker.train.trainer import run_training


def config(**kw) -> TrainConfig:
    # One micro-batch a step, so micro-batch index i is step i + 1's; checkpoints at 10, 20, 30.
    base = dict(max_steps=30, micro_batch_size=4, lr=1e-2, warmup_steps=5, eval_every=10, eval_batches=2,
                checkpoint_every=10, keep_checkpoints=3, log_every=5, progress=False, device="cpu", seed=0,
                precision="fp32")
    return TrainConfig(**{**base, **kw})


def batches(pack_dir, cls=PretrainBatches, **kw):
    return cls(load_split(pack_dir, "train"), 32, 4, seed=0, val_tokens=load_split(pack_dir, "val"), **kw)


def step(n: int) -> str:
    return f"step_{n:08d}"


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_model_dir(run / "final")[0].state_dict()


def bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def tree_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


@pytest.fixture(scope="module")
def tok(tokenizer_dir) -> Tokenizer:
    return Tokenizer.load(tokenizer_dir)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, pack_dir, tok) -> Path:
    """30 steps straight through: checkpoints at 10, 20, 30 and final/."""
    out = tmp_path_factory.mktemp("uninterrupted")
    run_training(tiny_model(tok.vocab_size, seq_len=32), batches(pack_dir), config(), out, tok, {})
    return out


def with_checkpoints(source: Path, out: Path, steps: list[int]) -> Path:
    """A stage directory holding copies of `source`'s checkpoints at `steps` (and its metrics.csv)."""
    (out / "checkpoints").mkdir(parents=True)
    shutil.copy(source / "metrics.csv", out / "metrics.csv")
    for n in steps:
        shutil.copytree(source / "checkpoints" / step(n), out / "checkpoints" / step(n))
    return out


def resume(out: Path, pack_dir, tok, init_seed: int = 99, **kw) -> dict:
    # Another init seed by default: whatever the run ends at comes from the checkpoint it resumed.
    return run_training(tiny_model(tok.vocab_size, seed=init_seed, seq_len=32), batches(pack_dir), config(**kw), out,
                        tok, {}, resume=True)


@pytest.fixture(scope="module")
def resumed_from_10(tmp_path_factory, uninterrupted, pack_dir, tok) -> dict[str, torch.Tensor]:
    """The final weights of a run resumed from the step-10 checkpoint: what a fallback to it must give."""
    out = with_checkpoints(uninterrupted, tmp_path_factory.mktemp("from10"), [10])
    resume(out, pack_dir, tok)
    return final_weights(out)


# ----------------------------------------------------------------------------------------
# Damaged files
# ----------------------------------------------------------------------------------------

def truncate(p: Path) -> None:
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def empty(p: Path) -> None:
    p.write_bytes(b"")


def cut_rng_state(p: Path) -> None:
    raw = json.loads(p.read_text())
    raw["rng"]["torch"] = raw["rng"]["torch"][:100]  # valid base64, far too few bytes
    p.write_text(json.dumps(raw))


DAMAGES = [("model.safetensors", truncate), ("optimizer.pt", truncate), ("trainer_state.json", empty),
           ("trainer_state.json", cut_rng_state), ("config.json", empty)]


@pytest.mark.parametrize("name, damage", DAMAGES, ids=[f"{d.__name__}-{n}" for n, d in DAMAGES])
def test_a_damaged_checkpoint_is_moved_aside_and_resume_falls_back_exactly(tmp_path, capsys, pack_dir, tok,
                                                                           uninterrupted, resumed_from_10, name,
                                                                           damage):
    out = with_checkpoints(uninterrupted, tmp_path, [10, 20])
    bad = out / "checkpoints" / step(20) / name
    damage(bad)
    damaged_bytes = bad.read_bytes()
    summary = resume(out, pack_dir, tok)
    said = [line for line in capsys.readouterr().err.splitlines() if "is damaged" in line]
    assert len(said) == 1 and str(bad) in said[0]
    assert f"moved it to {step(20)}.damaged and resuming from {step(10)}" in said[0]
    assert (out / "checkpoints" / f"{step(20)}.damaged" / name).read_bytes() == damaged_bytes  # kept, not deleted
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == [step(10), step(20), step(30)]  # redone
    assert summary["steps"] == 30
    assert bitwise_equal(final_weights(out), resumed_from_10)


def test_no_intact_checkpoint_is_a_clear_error_naming_each_damaged_file(tmp_path, pack_dir, tok, uninterrupted):
    out = with_checkpoints(uninterrupted, tmp_path, [10, 20])
    weights, state = out / "checkpoints" / step(10) / "model.safetensors", out / "checkpoints" / step(20) / \
        "trainer_state.json"
    truncate(weights)
    empty(state)
    with pytest.raises(CheckpointError, match="no intact checkpoint") as e:
        resume(out, pack_dir, tok)
    assert f"{state}: empty (0 bytes)" in str(e.value)
    assert f"{weights}: truncated or corrupt: SafetensorError" in str(e.value)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [step(10), step(20)]  # nothing moved


@pytest.mark.parametrize("name, damage", [("model.safetensors", truncate), ("config.json", empty),
                                          ("tokenizer.json", truncate)])
def test_a_damaged_model_directory_is_a_checkpoint_error_naming_the_file(tmp_path, uninterrupted, name, damage):
    final = shutil.copytree(uninterrupted / "final", tmp_path / "final")
    damage(final / name)
    with pytest.raises(CheckpointError, match=re.escape(f"{final / name}: ")):
        load_model_dir(final)


# ----------------------------------------------------------------------------------------
# A full disk
# ----------------------------------------------------------------------------------------

DiskUsage = namedtuple("DiskUsage", "total used free")


@dataclass
class SmallDisk:
    root: Path  # a filesystem of `size` bytes
    mount: Path  # where the error message should say it is mounted
    size: int

    def fill(self, leave: int) -> None:
        """A ballast file that leaves about `leave` bytes free."""
        (self.root / "ballast").write_bytes(b"\0" * (shutil.disk_usage(self.root).free - leave))

    def free_up(self) -> None:
        (self.root / "ballast").unlink()


def simulate_small_disk(monkeypatch, root: Path, size: int) -> Path:
    """What a tmpfs of `size` bytes would do, without mounting one: the free space is `size` less
    the bytes under `root`, and the big writes (weights, optimizer state) fail with ENOSPC past it."""
    real_disk_usage = shutil.disk_usage

    def disk_usage(path):
        if not Path(path).absolute().is_relative_to(root):
            return real_disk_usage(path)
        used = tree_bytes(root)
        return DiskUsage(size, used, max(0, size - used))

    def within_quota(write):
        def checked(obj, f, *args, **kwargs):  # f: a path or an open file
            write(obj, f, *args, **kwargs)
            if hasattr(f, "flush"):
                f.flush()
            name = Path(getattr(f, "name", f))
            if name.absolute().is_relative_to(root) and tree_bytes(root) > size:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(name))  # the partial file stays
        return checked

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    monkeypatch.setattr(checkpoint, "save_file", within_quota(checkpoint.save_file))
    monkeypatch.setattr(torch, "save", within_quota(torch.save))
    mount = root
    while not os.path.ismount(mount):
        mount = mount.parent
    return mount


@pytest.fixture
def small_disk(tmp_path, monkeypatch, uninterrupted):
    """A tmpfs four checkpoints big (and some), mounted when this process may; else simulated, with a warning."""
    size = (4 * tree_bytes(uninterrupted / "checkpoints" / step(10)) // 4096 + 64) * 4096
    root = tmp_path / "disk"
    root.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(root)],
                                 capture_output=True, text=True)
        why = mounted.stderr.strip()
    except OSError as e:
        mounted, why = None, str(e)
    if mounted is not None and mounted.returncode == 0:
        yield SmallDisk(root, root, size)
        if subprocess.run(["umount", str(root)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", str(root)], check=True)
            pytest.fail(f"a file on {root} is still open after the test: a failed write leaked its handle")
        return
    warnings.warn(f"cannot mount a tmpfs ({why}): the full disk is simulated", stacklevel=1)
    yield SmallDisk(root, simulate_small_disk(monkeypatch, root, size), size)


class FillTheDisk(PretrainBatches):
    """Batches that, at the first micro-batch of `at_step`, fill the disk to leave `leave` bytes free."""

    def __init__(self, *args, disk: SmallDisk, at_step: int, leave: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.disk, self.at_step, self.leave = disk, at_step, leave

    def micro_batch(self, index):
        if index == self.at_step - 1:
            self.disk.fill(self.leave)
        return super().micro_batch(index)


# (the step the disk fills at, the bytes it leaves free in checkpoints, the checkpoint that fails, the last good one)
FULL_DISKS = {
    "before the first checkpoint": (5, 0.5, 10, None),  # refused before writing: its tensors alone do not fit
    "before writing": (15, 1.5, 30, 20),  # room for step 20 (with a warning) but not for step 30
    "while writing": (15, 0.5, 20, 10),  # with the check before writing turned off: the write itself fails
}


@pytest.mark.parametrize("when", FULL_DISKS)
def test_a_full_disk_is_a_clear_error_and_resume_after_freeing_space_is_exact(when, small_disk, monkeypatch, capsys,
                                                                              pack_dir, tok, uninterrupted):
    at_step, room, failed, last_good = FULL_DISKS[when]
    size = tree_bytes(uninterrupted / "checkpoints" / step(10))  # every checkpoint of this run is as big
    leave, good = int(room * size), [n for n in (10, 20) if last_good and n <= last_good]
    if when == "while writing":
        monkeypatch.setattr(checkpoint, "_refuse_if_no_room", lambda *args: None)
    out, ckpts = small_disk.root / "run", small_disk.root / "run" / "checkpoints"
    fill = batches(pack_dir, FillTheDisk, disk=small_disk, at_step=at_step, leave=leave)
    with pytest.raises(CheckpointError) as e:
        run_training(tiny_model(tok.vocab_size, seq_len=32), fill, config(), out, tok, {})
    message = str(e.value)
    if when == "while writing":
        assert re.search(rf"could not write {re.escape(str(ckpts / f'.tmp-{step(20)}'))}/\S+ \(", message)
    else:
        as_big = f"as big as {step(last_good)}" if last_good else "its weights and optimizer state"
        assert f"not enough space to write checkpoint {step(failed)} ({as_big}), so nothing was written" in message
    assert re.search(rf"[\d.]+ [KM]?B free of [\d.]+ [KM]?B on the filesystem at {re.escape(str(small_disk.mount))}, "
                     r"about [\d.]+ [KM]?B needed", message)
    if last_good:
        assert f"the last good checkpoint {ckpts / step(last_good)} is intact" in message
        assert "lower train.keep_checkpoints" in message and "--resume" in message
        for name in ("model.safetensors", "optimizer.pt"):
            assert (ckpts / step(last_good) / name).read_bytes() == \
                (uninterrupted / "checkpoints" / step(last_good) / name).read_bytes()
    else:
        assert message.endswith("free space on that disk, then rerun")
    if when == "before writing":
        assert f"warning: after checkpoint {step(20)} the next one will not fit" in capsys.readouterr().err
    assert sorted(os.listdir(ckpts) if ckpts.exists() else []) == [step(n) for n in good]  # no .tmp-* left
    assert not (out / "final").exists()
    # What the failed write took is free again (no handle holds a deleted file): page slack aside.
    assert shutil.disk_usage(small_disk.root).free > leave - sum(n > at_step for n in good) * size - 64 * 1024

    small_disk.free_up()
    summary = resume(out, pack_dir, tok, init_seed=99 if last_good else 0)  # no checkpoint: a rerun from scratch
    assert summary["steps"] == 30
    assert bitwise_equal(final_weights(out), final_weights(uninterrupted))


def test_a_lower_keep_checkpoints_makes_room_at_resume(tmp_path, capsys, pack_dir, tok, uninterrupted):
    out = with_checkpoints(uninterrupted, tmp_path, [10, 20, 30])
    resume(out, pack_dir, tok, keep_checkpoints=1)  # at step 30 already: only final/ is written
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == [step(30)]
    err = capsys.readouterr().err
    assert f"removed {step(10)}: train.keep_checkpoints is 1" in err and f"removed {step(20)}" in err


# ----------------------------------------------------------------------------------------
# Leftovers of killed writes
# ----------------------------------------------------------------------------------------

def test_what_killed_writes_left_is_removed_by_the_next_run(tmp_path, capsys, pack_dir, tok, uninterrupted):
    out = with_checkpoints(uninterrupted, tmp_path, [30])
    partial_ckpt, partial_final = out / "checkpoints" / f".tmp-{step(40)}", out / ".tmp-final-k1ll3d"
    for partial in (partial_ckpt, partial_final):
        partial.mkdir()
        (partial / "model.safetensors").write_bytes(b"\0" * 1000)
    resume(out, pack_dir, tok)  # at step 30 already: only final/ is written
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("removed what killed writes")]
    assert said == [f"removed what killed writes left in {out} (2.0 KB): checkpoints/.tmp-{step(40)}, "
                    ".tmp-final-k1ll3d"]
    assert not partial_ckpt.exists() and not partial_final.exists()
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "final", "metrics.csv"]
    assert bitwise_equal(final_weights(out), final_weights(uninterrupted))
