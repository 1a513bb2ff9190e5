"""MFU accounting: FLOPs per token by hand for the presets, the device table, and metrics.csv."""
import csv
from types import SimpleNamespace

import pytest
import torch

from helpers import tiny_model
from llm_maker.model.llama import LlamaModel
from llm_maker.model.presets import resolve_model_config
from llm_maker.pack.shards import load_split
from llm_maker.recipe import TrainConfig
from llm_maker.tokenizer.tokenizer import Tokenizer
from llm_maker.train.batches import PretrainBatches
from llm_maker.train.mfu import device_peak_tflops, mfu, peak_tflops_for_name
from llm_maker.train.trainer import run_training


def flops_per_token(name: str) -> float:
    cfg = resolve_model_config(SimpleNamespace(preset=name))
    with torch.device("meta"):
        return LlamaModel(cfg).flops_per_token()


def test_124m_untied_counts_the_head_but_not_the_embedding_lookup():
    per_layer = 4 * 768 * 768 + 3 * 768 * 2048 + 2 * 768  # q k v o, gate up down, two norms
    n = 12 * per_layer + 768 + 32000 * 768  # + final norm + head (the input embedding is a lookup)
    assert n == 109_529_856
    assert flops_per_token("124m") == 6 * n + 12 * 12 * 768 * 1024 == 770_425_344


def test_tied_head_counts_once_and_gqa_shrinks_k_v():
    n = 12 * (4 * 768 * 768 + 3 * 768 * 3072 + 2 * 768) + 768 + 100277 * 768  # 166m: tied, the head is the table
    assert flops_per_token("166m") == 6 * n + 12 * 12 * 768 * 1024
    kv = 3 * 64  # 135m: 9 query heads, 3 KV heads of 64
    n = 30 * (576 * 576 * 2 + 2 * 576 * kv + 3 * 576 * 1536 + 2 * 576) + 576 + 49152 * 576
    assert flops_per_token("135m") == 6 * n + 12 * 30 * 576 * 2048


@pytest.mark.parametrize("name,tflops", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100-PCIE-40GB", 312.0),
    ("NVIDIA L20", 119.5), ("NVIDIA L40S", 362.0), ("NVIDIA GeForce RTX 3090", 71.0),
    ("NVIDIA GeForce RTX 4090", 165.2), ("Tesla T4", 65.0), ("NVIDIA Quadro P1000", None),
])
def test_device_table(name, tflops):
    assert peak_tflops_for_name(name) == tflops


def test_cpu_has_no_peak_unless_overridden():
    assert device_peak_tflops(torch.device("cpu")) is None
    assert device_peak_tflops(torch.device("cpu"), override=2.5) == 2.5


def test_mfu_is_achieved_over_peak_per_device():
    # 124m at 600K tokens/s on one H100: 770.4 MFLOP/token * 6e5 / 989e12 = 46.7%
    assert mfu(770_425_344, 600_000, 989.0) == pytest.approx(0.4674, abs=1e-4)
    assert mfu(770_425_344, 8 * 600_000, 989.0, n_devices=8) == pytest.approx(0.4674, abs=1e-4)
    assert mfu(1e9, 1e5, None) is None


def test_metrics_rows_carry_mfu_from_tokens_per_second(tmp_path, pack_dir, tokenizer_dir):
    tokenizer = Tokenizer.load(tokenizer_dir)
    model = tiny_model(tokenizer.vocab_size, seq_len=32)
    batches = PretrainBatches(load_split(pack_dir, "train"), 32, 4, seed=0)
    tc = TrainConfig(max_steps=4, micro_batch_size=4, log_every=2, eval_every=4, checkpoint_every=4, progress=False,
                     device="cpu", peak_tflops=0.5)
    run_training(model, batches, tc, tmp_path, tokenizer, {})
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["2", "4"]
    for r in rows:
        expected = model.flops_per_token() * float(r["tokens_per_s"]) / 0.5e12
        assert float(r["mfu"]) == pytest.approx(expected, rel=1e-3, abs=1e-4)
