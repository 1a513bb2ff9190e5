"""The training loop: schedule, batches, exact resume, graceful stop, checkpoint safety."""
import csv
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import tiny_model
from llm_maker.errors import CheckpointError, DataError
from llm_maker.recipe import TrainConfig
from llm_maker.tokenizer.tokenizer import train_bpe
from llm_maker.train.batches import PretrainBatches
from llm_maker.train.checkpoint import latest_checkpoint, list_checkpoints, load_model_dir
from llm_maker.train.loss import CausalLMLoss
from llm_maker.train.schedule import cosine_lr
from llm_maker.train.trainer import apply_activation_checkpointing, run_training

TEXT = ("The quick brown fox jumps over the lazy dog. A stitch in time saves nine. "
        "Practice makes perfect, and patience is a virtue. ") * 40


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(iter([TEXT]), vocab_size=300, min_frequency=1)


@pytest.fixture(scope="module")
def tokens(tokenizer):
    ids = np.array(tokenizer.encode(TEXT) * 3, dtype=np.uint16)
    return ids[: len(ids) * 9 // 10], ids[len(ids) * 9 // 10:]


def small_model(tokenizer, seed=0):
    return tiny_model(tokenizer.vocab_size, seed, seq_len=32)


def config(**kw):
    base = dict(precision="fp32",  # equivalences to 1e-5 are checked in fp32
                max_steps=30, micro_batch_size=4, grad_accum_steps=2, lr=1e-2, warmup_steps=5, eval_every=10,
                eval_batches=2, checkpoint_every=10, keep_checkpoints=2, log_every=5, progress=False)
    return TrainConfig(**{**base, **kw})


def read_metrics(out: Path) -> list[dict]:
    with open(out / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_cosine_schedule_shape():
    lrs = [cosine_lr(s, 1.0, 10, 100, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))  # monotone decay after warmup
    assert lrs[-1] == pytest.approx(0.1)


def test_batches_are_deterministic_reshuffled_and_disjoint_across_ranks(tokens):
    train, _ = tokens
    b = PretrainBatches(train, seq_len=16, micro_batch_size=4, seed=3)
    x, y = b.micro_batch(5)
    x2, y2 = PretrainBatches(train, seq_len=16, micro_batch_size=4, seed=3).micro_batch(5)
    assert torch.equal(x, x2) and torch.equal(y[:, :-1], x[:, 1:])  # targets are inputs shifted by one
    per_epoch = b.n_blocks // 4
    epoch0 = np.concatenate([b.block_ids(i) for i in range(per_epoch)])
    epoch1 = np.concatenate([b.block_ids(i) for i in range(per_epoch, 2 * per_epoch)])
    assert len(set(epoch0)) == len(epoch0)  # every block at most once per epoch
    assert not np.array_equal(epoch0, epoch1)  # a fresh order each epoch
    r0 = PretrainBatches(train, seq_len=16, micro_batch_size=2, seed=3, rank=0, world_size=2)
    r1 = PretrainBatches(train, seq_len=16, micro_batch_size=2, seed=3, rank=1, world_size=2)
    assert not set(r0.block_ids(0)) & set(r1.block_ids(0))


def test_too_little_data_is_a_clear_error():
    with pytest.raises(DataError, match="fewer than one micro-batch"):
        PretrainBatches(np.zeros(50, dtype=np.uint16), seq_len=32, micro_batch_size=4, seed=0)


def test_loss_falls_and_final_model_is_written(tmp_path, tokenizer, tokens):
    train, val = tokens
    batches = PretrainBatches(train, 32, 4, seed=0, val_tokens=val)
    summary = run_training(small_model(tokenizer), batches, config(max_steps=40), tmp_path, tokenizer, {"stage": "t"})
    rows = read_metrics(tmp_path)
    assert float(rows[-1]["loss"]) < 0.5 * float(rows[0]["loss"])
    assert summary["val_loss"] < math.log(tokenizer.vocab_size) / 2
    model, tok, meta = load_model_dir(tmp_path / "final")
    assert tok.hash == tokenizer.hash and meta.steps == 40
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_00000030", "step_00000040"]


def test_stop_then_resume_equals_uninterrupted(tmp_path, tokenizer, tokens):
    train, val = tokens
    a, b = tmp_path / "a", tmp_path / "b"
    run_training(small_model(tokenizer), PretrainBatches(train, 32, 4, 0, val), config(), a, tokenizer, {})
    # Run b stops at step 13 through the STOP file (as SIGINT/SIGTERM would), then resumes.
    b.mkdir()

    class StopAt13(PretrainBatches):
        def micro_batch(self, index):
            if index == 12 * 2:  # first micro-batch of step 13
                (b / "STOP").touch()
            return super().micro_batch(index)

    s = run_training(small_model(tokenizer), StopAt13(train, 32, 4, 0, val), config(), b, tokenizer, {})
    assert s["stopped"] and s["steps"] == 13 and not (b / "final").exists()
    assert latest_checkpoint(b / "checkpoints").name == "step_00000013"
    assert not (b / "STOP").exists() and (b / "STOP.done-13").is_file()  # consumed: the resume goes on
    s2 = run_training(small_model(tokenizer, seed=99), PretrainBatches(train, 32, 4, 0, val), config(), b,
                      tokenizer, {}, resume=True)
    ra, rb = read_metrics(a), read_metrics(b)
    assert float(rb[-1]["loss"]) == pytest.approx(float(ra[-1]["loss"]), abs=1e-5)
    # b logged one extra row when it stopped (step 13); every later full window matches a exactly.
    assert [int(r["step"]) for r in rb] == sorted([int(r["step"]) for r in ra] + [13])
    def late(rows):
        return [(r["step"], r["loss"], r["val_loss"]) for r in rows if int(r["step"]) >= 20]
    assert late(rb) == late(ra)
    assert s2["steps"] == 30
    wa = load_model_dir(a / "final")[0].state_dict()
    wb = load_model_dir(b / "final")[0].state_dict()
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_partial_checkpoints_are_never_chosen(tmp_path, tokenizer, tokens):
    train, val = tokens
    run_training(small_model(tokenizer), PretrainBatches(train, 32, 4, 0, val), config(max_steps=20), tmp_path,
                 tokenizer, {})
    root = tmp_path / "checkpoints"
    # A crash mid-write leaves a temp dir; a hand-copied dir may lack its state file.
    (root / ".tmp-step_00000030-abc").mkdir()
    (root / ".tmp-step_00000030-abc" / "model.safetensors").write_bytes(b"partial")
    shutil.copytree(root / "step_00000020", root / "step_00000040")
    (root / "step_00000040" / "trainer_state.json").unlink()
    assert latest_checkpoint(root).name == "step_00000020"


def test_resume_with_another_tokenizer_is_refused(tmp_path, tokenizer, tokens):
    train, val = tokens
    run_training(small_model(tokenizer), PretrainBatches(train, 32, 4, 0, val), config(max_steps=10), tmp_path,
                 tokenizer, {})
    other = train_bpe(iter([TEXT + " something else entirely"]), vocab_size=310, min_frequency=1)
    model = small_model(other)
    with pytest.raises(CheckpointError, match="tokenizer"):
        run_training(model, PretrainBatches(train, 32, 4, 0, val), config(max_steps=20), tmp_path, other, {},
                     resume=True)


def test_fresh_run_over_existing_checkpoints_is_refused(tmp_path, tokenizer, tokens):
    train, val = tokens
    run_training(small_model(tokenizer), PretrainBatches(train, 32, 4, 0, val), config(max_steps=10), tmp_path,
                 tokenizer, {})
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    with pytest.raises(CheckpointError, match="--resume"):
        run_training(small_model(tokenizer), PretrainBatches(train, 32, 4, 0, val), config(max_steps=10),
                     tmp_path, tokenizer, {})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    model = tiny_model(97, seq_len=16).train()
    x = torch.randint(0, 97, (2, 16))
    loss = CausalLMLoss(model)(x[:, :-1], x[:, 1:])
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]
    model.zero_grad()
    apply_activation_checkpointing(model)
    loss2 = CausalLMLoss(model)(x[:, :-1], x[:, 1:])
    loss2.backward()
    assert torch.allclose(loss, loss2)
    assert all(torch.allclose(g, p.grad, atol=1e-6) for g, p in zip(grads, model.parameters(), strict=False))
    assert [n for n, _ in model.named_parameters()] == names  # applied in place: checkpoints load as before
