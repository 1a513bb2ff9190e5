"""Divergence: a non-finite step is skipped, a run of them or a loss spike rolls back to the last
checkpoint past the batches read since, a run that keeps diverging stops with a TrainingError,
and no checkpoint or final/ ever holds a non-finite weight."""
from __future__ import annotations

import csv
import json
import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from helpers import tiny_model
from llm_maker.errors import RecipeError, TrainingError
from llm_maker.export.card import training_section
from llm_maker.model.presets import PRESETS
from llm_maker.pack.shards import load_split
from llm_maker.recipe import TrainConfig, recipe_from_dict
from llm_maker.tokenizer.tokenizer import Tokenizer
from llm_maker.train.batches import PretrainBatches
from llm_maker.train.checkpoint import list_checkpoints, load_model_dir
from llm_maker.train.distributed import DistContext
from llm_maker.train.divergence import RollbackState, check_window, nonfinite_step, step_unless
from llm_maker.train.loss import CausalLMLoss
from llm_maker.train.trainer import make_optimizer, run_training


def config(**kw) -> TrainConfig:
    base = dict(max_steps=40, micro_batch_size=4, lr=1e-2, warmup_steps=5, eval_every=10, eval_batches=2,
                checkpoint_every=10, log_every=5, progress=False, device="cpu", precision="fp32", seed=0)
    return TrainConfig(**{**base, **kw})


class Recorded(PretrainBatches):
    """The pretraining batches, remembering which micro-batch indices were read."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.read: list[int] = []

    def micro_batch(self, index):
        self.read.append(index)
        return super().micro_batch(index)


def batches(pack_dir, seq_len: int = 32, cls=Recorded):
    return cls(load_split(pack_dir, "train"), seq_len, 4, seed=0, val_tokens=load_split(pack_dir, "val"))


def corrupt_forward_at(model, batches, index: int, factor: float) -> None:
    """The forward pass of micro-batch `index` (training only, once) has its final hidden states
    multiplied by `factor`: NaN gives a NaN loss, a large number a loss spike."""
    armed = {"on": False}
    read = batches.micro_batch

    def micro_batch(i):
        armed["on"] = armed["on"] or i == index
        return read(i)

    def hook(module, args, output):
        if armed["on"] and module.training:
            armed["on"] = False
            return output * factor
        return output

    batches.micro_batch = micro_batch
    model.norm.register_forward_hook(hook)


def metrics(out: Path) -> list[dict[str, str]]:
    with open(out / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def finite_on_disk(out: Path) -> bool:
    dirs = list_checkpoints(out / "checkpoints") + ([out / "final"] if (out / "final").is_dir() else [])
    return all(torch.isfinite(t).all() for d in dirs for t in load_file(str(d / "model.safetensors")).values())


# --------------------------------------------------------------------------------------
# The rules, as pure functions
# --------------------------------------------------------------------------------------

def test_a_run_of_bad_steps_diverges_at_the_last_one():
    state = RollbackState(step=10)
    divergence, skipped = check_window(state, [math.nan] * 3 + [2.0] + [math.nan] * 6, [True] * 3 + [False]
                                       + [True] * 6, warmup_steps=0, max_bad_steps=4, spike_factor=None)
    assert skipped == [1, 2, 3, 5, 6, 7, 8] and divergence.step == 8 and "4 steps in a row" in divergence.why
    assert state.skipped_steps == 7 and state.bad_steps_in_a_row == 4


def test_a_spike_is_measured_against_the_steps_after_warmup():
    state = RollbackState(step=30)
    losses = [9.0] * 5 + [2.0] * 24 + [6.5]  # warmup (steps 1-5) is left out of the mean
    divergence, _ = check_window(state, losses, [False] * 30, warmup_steps=5, max_bad_steps=8, spike_factor=3.0)
    assert divergence.step == 30 and divergence.loss == 6.5 and "3 × 2" in divergence.why
    state = RollbackState(step=30)
    assert check_window(state, losses[:-1] + [5.9], [False] * 30, 5, 8, 3.0)[0] is None
    assert len(state.recent_losses) == 25 and check_window(RollbackState(step=30), losses, [False] * 30, 5, 8,
                                                           None)[0] is None  # spike_factor: null turns it off
    low = [0.05] * 29 + [0.4]  # 8x the mean, but a data set learnt by heart, not a divergence
    assert check_window(RollbackState(step=30), low, [False] * 30, 0, 8, 3.0)[0] is None


def test_the_rules_are_not_part_of_the_fingerprint_and_are_validated():
    base = TrainConfig(seed=1).fingerprint_fields()
    assert TrainConfig(seed=1, max_bad_steps=2, spike_factor=None, max_rollbacks=0).fingerprint_fields() == base
    for bad in ({"spike_factor": 0.5}, {"max_bad_steps": 0}, {"max_rollbacks": -1}):
        with pytest.raises(RecipeError, match=f"train.{next(iter(bad))}"):
            recipe_from_dict({"train": bad}, "r.yaml")


def test_a_fused_optimizer_skips_on_the_device_without_reading_the_flag():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5, 3))
    ref = torch.nn.Parameter(p.detach().clone())
    opt, ref_opt = (torch.optim.AdamW([q], lr=0.1, fused=True) for q in (p, ref))  # fused: as on CUDA
    for skip, grad in ((0.0, torch.randn(5, 3)), (1.0, torch.full((5, 3), math.nan)), (0.0, torch.randn(5, 3))):
        flag = torch.tensor(skip)
        flag.item = None  # the host never reads it: AdamW gets it as found_inf, as GradScaler hands it over
        p.grad, ref.grad = grad.clone(), grad.clone()
        step_unless(opt, flag)
        if not skip:
            ref_opt.step()  # a kept step is the plain step, bit for bit
        assert torch.equal(p, ref)
    assert opt.state_dict()["state"][0]["step"] == ref_opt.state_dict()["state"][0]["step"] == 2  # not counted


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_deciding_and_skipping_a_step_never_waits_for_the_gpu(pack_dir, tokenizer_dir):
    tok, device = Tokenizer.load(tokenizer_dir), torch.device("cuda")
    model = tiny_model(tok.vocab_size, seq_len=32).to(device)
    opt = make_optimizer(model, config(device="cuda"), device)
    x, y = batches(pack_dir).micro_batch(0)
    for bad in (False, True, False):
        loss = CausalLMLoss(model)(x.to(device), y.to(device)) * (math.nan if bad else 1.0)
        loss.backward()
        torch.cuda.set_sync_debug_mode("error")
        try:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            _, skip = nonfinite_step(loss.detach(), norm, DistContext())
            step_unless(opt, skip)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        opt.zero_grad(set_to_none=True)
        assert skip.item() == bad and all(torch.isfinite(q).all() for q in model.parameters())


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------

def test_a_nan_batch_is_skipped_without_touching_weights_or_optimizer(tmp_path, pack_dir, tokenizer_dir):
    tok = Tokenizer.load(tokenizer_dir)
    model, data = tiny_model(tok.vocab_size, seq_len=32), batches(pack_dir)
    corrupt_forward_at(model, data, index=2, factor=math.nan)  # step 3
    summary = run_training(model, data, config(max_steps=3, checkpoint_every=1, log_every=1), tmp_path, tok, {})
    assert summary["skipped_steps"] == 1 and summary["rollbacks"] == [] and math.isfinite(summary["final_loss"])
    step2, step3 = (tmp_path / "checkpoints" / f"step_0000000{s}" for s in (2, 3))
    w2, w3 = load_model_dir(step2)[0].state_dict(), load_model_dir(step3)[0].state_dict()
    assert all(torch.equal(w2[k], w3[k]) for k in w2)  # no weight moved
    o2, o3 = (torch.load(d / "optimizer.pt", weights_only=True)["state"] for d in (step2, step3))
    assert all(torch.equal(o2[i][k], o3[i][k]) for i in o2 for k in o2[i])  # moments and step counts too
    rows = metrics(tmp_path)
    assert [r["skipped_steps"] for r in rows] == ["0", "0", "1"] and rows[-1]["loss"] == ""  # no finite loss in it
    assert finite_on_disk(tmp_path) and (tmp_path / "final").is_dir()


def test_a_nan_batch_mid_run_is_counted_and_the_run_finishes(tmp_path, pack_dir, tokenizer_dir):
    tok = Tokenizer.load(tokenizer_dir)
    model, data = tiny_model(tok.vocab_size, seq_len=32), batches(pack_dir)
    corrupt_forward_at(model, data, index=12, factor=math.nan)
    summary = run_training(model, data, config(max_steps=20), tmp_path, tok, {})
    assert summary["skipped_steps"] == 1 and summary["rollbacks"] == [] and summary["steps"] == 20
    assert all(r["loss"] and math.isfinite(float(r["loss"])) for r in metrics(tmp_path))  # the NaN left out
    assert finite_on_disk(tmp_path) and data.read == list(range(20))


def test_a_spike_rolls_back_once_past_its_batches_and_shows_on_the_card(tmp_path, pack_dir, tokenizer_dir):
    tok = Tokenizer.load(tokenizer_dir)
    model, data = tiny_model(tok.vocab_size, seq_len=32), batches(pack_dir)
    corrupt_forward_at(model, data, index=24, factor=1e4)  # step 25: a finite, huge loss
    summary = run_training(model, data, config(), tmp_path, tok, {})
    assert summary["steps"] == 40 and math.isfinite(summary["final_loss"]) and (tmp_path / "final").is_dir()
    [event] = summary["rollbacks"]
    assert (event["step"], event["to_step"], event["skipped_batches"]) == (25, 20, 5) and event["loss"] > 100
    assert data.read == list(range(45))  # steps 21-25's batches read once, then steps 21-40 read 25-44
    state = json.loads((tmp_path / "checkpoints" / "step_00000040" / "trainer_state.json").read_text())
    assert state["data_skip_steps"] == 5 and state["micro_batch_index"] == 45  # the data cursor
    rows = metrics(tmp_path)
    events = [r for r in rows if r["event"]]
    assert [(r["step"], r["event"].split(" (")[0]) for r in events] == [("20", "rolled back at step 25")]
    assert [int(r["step"]) for r in rows] == [5, 10, 15, 20, 20, 25, 30, 35, 40]  # the discarded rows dropped
    card = "\n".join(training_section(None, [{"stage": "pretrain", **summary}], [], {}))
    assert "rolled back at step 25 (loss " in card and "to step 20, skipped 5 batches" in card
    assert finite_on_disk(tmp_path)


def test_a_run_that_rolled_back_resumes_exactly(tmp_path, pack_dir, tokenizer_dir):
    tok = Tokenizer.load(tokenizer_dir)
    a, b = tmp_path / "a", tmp_path / "b"
    model, data = tiny_model(tok.vocab_size, seq_len=32), batches(pack_dir)
    corrupt_forward_at(model, data, index=24, factor=1e4)
    run_training(model, data, config(), a, tok, {})

    model, data = tiny_model(tok.vocab_size, seq_len=32), batches(pack_dir)
    corrupt_forward_at(model, data, index=24, factor=1e4)
    read = data.micro_batch

    def stop_at_33(i):  # step 33 reads micro-batch 37, past the skip
        if i == 37:
            (b / "STOP").touch()
        return read(i)

    data.micro_batch = stop_at_33
    b.mkdir()
    assert run_training(model, data, config(), b, tok, {})["stopped"]
    (b / "STOP").unlink(missing_ok=True)
    data = batches(pack_dir)
    summary = run_training(tiny_model(tok.vocab_size, seed=7, seq_len=32), data, config(), b, tok, {}, resume=True)
    assert data.read == list(range(38, 45)) and len(summary["rollbacks"]) == 1  # the skip survived the resume
    wa, wb = load_model_dir(a / "final")[0].state_dict(), load_model_dir(b / "final")[0].state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_non_finite_weight_is_never_saved_the_run_rolls_back_instead(tmp_path, pack_dir, tokenizer_dir):
    tok = Tokenizer.load(tokenizer_dir)
    model = tiny_model(tok.vocab_size, seq_len=32)
    done = {"n": 0}

    def poison_once(module, device, amp_dtype):  # an evaluation at step 20 that breaks a weight
        done["n"] += 1
        if done["n"] == 2:
            with torch.no_grad():
                model.norm.weight[0] = math.inf
        return {}

    summary = run_training(model, batches(pack_dir), config(max_steps=30), tmp_path, tok, {},
                           evaluations=[poison_once])
    [event] = summary["rollbacks"]
    assert (event["step"], event["to_step"], event["why"]) == (20, 10, "a weight is not finite")
    assert summary["steps"] == 30 and finite_on_disk(tmp_path)


def test_a_huge_learning_rate_on_the_demo_shape_stops_with_a_clear_error(tmp_path, pack_dir, tokenizer_dir):
    tok = Tokenizer.load(tokenizer_dir)
    dims = {k: v for k, v in PRESETS["tiny"].items() if k not in ("vocab_size", "seq_len")}
    model = tiny_model(tok.vocab_size, seq_len=128, **dims)
    tc = config(lr=1e6, max_steps=200, warmup_steps=2, checkpoint_every=5, eval_every=50, max_rollbacks=2)
    with pytest.raises(TrainingError) as e:
        run_training(model, batches(pack_dir, seq_len=128), tc, tmp_path, tok, {})
    message = str(e.value)
    assert "training diverged at step" in message and "train.max_rollbacks: 2" in message
    assert "train.lr: 1e+06" in message and "fp16" in message and "data shard" in message
    assert not (tmp_path / "final").exists() and list_checkpoints(tmp_path / "checkpoints")
    assert finite_on_disk(tmp_path)
    rows = metrics(tmp_path)
    assert sum("rolled back" in r["event"] for r in rows) <= 2 and rows[-1]["event"].startswith("diverged at step")
    state = json.loads((list_checkpoints(tmp_path / "checkpoints")[-1] / "trainer_state.json").read_text())
    assert math.isfinite(state["loss"])


# --------------------------------------------------------------------------------------
# Two ranks (gloo): one rank's NaN batch skips the step on both, one rank's spike rolls both back
# --------------------------------------------------------------------------------------

def ddp_config() -> TrainConfig:
    return config(grad_accum_steps=2)  # rank r of 2 reads micro-batches 2(s-1) + r of step s


def inject_rank_faults(model, data) -> None:
    corrupt_forward_at(model, data, index=13, factor=math.nan)  # step 7's second micro-batch: rank 1's
    corrupt_forward_at(model, data, index=48, factor=1e4)  # step 25's first: rank 0's


def _ddp_worker(rank: int, world: int, port: int, pack_dir: str, tok_dir: str, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from llm_maker.train.distributed import shutdown_distributed

    tok = Tokenizer.load(tok_dir)
    model, data = tiny_model(tok.vocab_size, seq_len=32), batches(Path(pack_dir))
    inject_rank_faults(model, data)
    summary = run_training(model, data, ddp_config(), Path(out), tok, {})
    Path(out, f"rank{rank}.json").write_text(json.dumps(summary))
    shutdown_distributed()


@pytest.mark.slow  # 2 gloo ranks in subprocesses
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo")
def test_ranks_skip_and_roll_back_together_like_one_process(tmp_path, pack_dir, tokenizer_dir):
    tok = Tokenizer.load(tokenizer_dir)
    model, data = tiny_model(tok.vocab_size, seq_len=32), batches(pack_dir)
    inject_rank_faults(model, data)
    one = run_training(model, data, ddp_config(), tmp_path / "one", tok, {})
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.multiprocessing.spawn(_ddp_worker, args=(2, port, str(pack_dir), str(tokenizer_dir), str(tmp_path / "two")),
                                nprocs=2, join=True)
    ranks = [json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in (0, 1)]
    for summary in [one, *ranks]:
        assert summary["skipped_steps"] == 1 and summary["steps"] == 40
        assert [(e["step"], e["to_step"], e["skipped_batches"]) for e in summary["rollbacks"]] == [(25, 20, 5)]
    wa, wb = load_model_dir(tmp_path / "one" / "final")[0].state_dict(), \
        load_model_dir(tmp_path / "two" / "final")[0].state_dict()
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
