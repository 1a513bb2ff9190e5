"""Precision for every device: the `auto` rule case by case, clear errors, and fp16 training with
dynamic loss scaling (close to fp32, overflowed steps skipped, exact resume with the scaler)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from helpers import tiny_model
from llm_maker.devices import DeviceCaps, auto_precision, choose_precision, resolve_precision
from llm_maker.errors import RecipeError
from llm_maker.pack.shards import load_split
from llm_maker.recipe import TrainConfig, recipe_from_dict
from llm_maker.tokenizer.tokenizer import Tokenizer
from llm_maker.train.batches import PretrainBatches
from llm_maker.train.checkpoint import latest_checkpoint, list_checkpoints, load_model_dir
from llm_maker.train.trainer import run_training


@pytest.mark.parametrize("caps, expected", [
    (DeviceCaps("cuda", bf16=True, name="NVIDIA H200"), "bf16"),
    (DeviceCaps("cuda", bf16=False, name="Tesla T4"), "fp16"),
    (DeviceCaps("cpu", bf16=True, name="cpu (AMX-BF16)"), "bf16"),
    (DeviceCaps("cpu", bf16=False, name="cpu"), "fp32"),
    (DeviceCaps("mps", bf16=False, name="mps"), "fp32"),
])
def test_auto_precision_table(caps, expected):
    assert auto_precision(caps) == expected
    assert choose_precision("auto", caps) == expected
    assert choose_precision("fp32", caps) == "fp32"  # an explicit choice is kept where it can run


def test_bf16_on_a_gpu_without_it_is_a_clear_error():
    with pytest.raises(RecipeError, match=r"`train.precision` is bf16, but Tesla T4 has no bf16 support"):
        choose_precision("bf16", DeviceCaps("cuda", bf16=False, name="Tesla T4"))
    with pytest.raises(RecipeError, match="`sft.train.precision` is 'fp8'"):
        choose_precision("fp8", DeviceCaps("cpu", bf16=True), key="sft.train.precision")


def test_fp8_in_a_recipe_is_refused_naming_the_key():
    with pytest.raises(RecipeError, match=r"train\.precision.*fp8"):
        recipe_from_dict({"train": {"precision": "fp8"}}, "r.yaml")


def test_this_cpu_resolves_to_what_it_has():
    has_amx = " amx_bf16" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else False
    assert resolve_precision("auto", torch.device("cpu")) == (torch.bfloat16 if has_amx else None)
    assert resolve_precision("fp16", torch.device("cpu")) == torch.float16


def config(**kw) -> TrainConfig:
    base = dict(max_steps=40, micro_batch_size=4, lr=1e-2, warmup_steps=5, eval_every=20, eval_batches=2,
                checkpoint_every=10, log_every=5, progress=False, device="cpu", seed=0)
    return TrainConfig(**{**base, **kw})


def losses(out: Path) -> list[float]:
    with open(out / "metrics.csv", newline="") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def batches(pack_dir, cls=PretrainBatches):
    return cls(load_split(pack_dir, "train"), 32, 4, seed=0, val_tokens=load_split(pack_dir, "val"))


def test_fp16_trains_close_to_fp32(tmp_path, pack_dir, tokenizer_dir):
    tok = Tokenizer.load(tokenizer_dir)
    curves = {}
    for precision in ("fp32", "fp16"):
        summary = run_training(tiny_model(tok.vocab_size, seq_len=32), batches(pack_dir), config(precision=precision),
                               tmp_path / precision, tok, {})
        assert summary["precision"] == precision
        curves[precision] = losses(tmp_path / precision)
    fp32, fp16 = curves["fp32"], curves["fp16"]
    assert fp16[-1] < fp16[0] - 0.5  # it learns
    assert max(abs(a - b) for a, b in zip(fp32, fp16, strict=False)) < 0.05  # the same curve to float16's precision
    with open(tmp_path / "fp16" / "metrics.csv", newline="") as f:
        assert all(r["skipped_steps"] != "" for r in csv.DictReader(f))  # the column is filled for fp16


def test_an_overflow_skips_the_step_and_halves_the_scale(tmp_path, pack_dir, tokenizer_dir):
    tok = Tokenizer.load(tokenizer_dir)
    model = tiny_model(tok.vocab_size, seq_len=32)
    calls = {"n": 0}

    def blow_up_step_3(module, args, output):  # one forward per step (no accumulation, no eval before step 3)
        calls["n"] += 1
        return output * 1e30 if calls["n"] == 3 else output  # inf in fp16 once scaled: backward overflows

    model.norm.register_forward_hook(blow_up_step_3)
    summary = run_training(model, batches(pack_dir), config(precision="fp16", max_steps=3, checkpoint_every=1,
                                                            eval_every=100), tmp_path, tok, {})
    assert summary["skipped_steps"] == 1
    states = [json.loads((c / "trainer_state.json").read_text()) for c in list_checkpoints(tmp_path / "checkpoints")]
    assert [s["step"] for s in states] == [2, 3]  # keep_checkpoints: 2
    assert states[1]["scaler"]["scale"] == states[0]["scaler"]["scale"] / 2 and states[1]["skipped_steps"] == 1
    step2 = load_model_dir(tmp_path / "checkpoints" / "step_00000002")[0].state_dict()
    final = load_model_dir(tmp_path / "final")[0].state_dict()
    assert all(torch.equal(step2[k], final[k]) for k in final)  # the overflowed step changed no weight


def test_fp16_stop_and_resume_equals_uninterrupted_with_the_scaler_state(tmp_path, pack_dir, tokenizer_dir):
    tok = Tokenizer.load(tokenizer_dir)
    a, b = tmp_path / "a", tmp_path / "b"
    run_training(tiny_model(tok.vocab_size, seq_len=32), batches(pack_dir), config(precision="fp16"), a, tok, {})

    class StopAt17(PretrainBatches):
        def micro_batch(self, index):
            if index == 16:
                (b / "STOP").touch()
            return super().micro_batch(index)

    b.mkdir()
    s = run_training(tiny_model(tok.vocab_size, seq_len=32), batches(pack_dir, StopAt17), config(precision="fp16"), b,
                     tok, {})
    assert s["stopped"] and latest_checkpoint(b / "checkpoints").name == "step_00000017"
    run_training(tiny_model(tok.vocab_size, seed=5, seq_len=32), batches(pack_dir), config(precision="fp16"), b,
                 tok, {},
                 resume=True)
    wa, wb = load_model_dir(a / "final")[0].state_dict(), load_model_dir(b / "final")[0].state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # bitwise: same scale, same skipped steps, same data
