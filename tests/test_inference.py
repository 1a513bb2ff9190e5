"""Inference precision: `--precision` / `eval.precision` follow the training rule, and bf16 on a
CPU runs on packed weights that give the same numbers as the plain bf16 layers."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import make_tokenizer, random_model
from llm_maker.devices import auto_precision, device_caps, inference_dtype
from llm_maker.errors import RecipeError
from llm_maker.serve import inference
from llm_maker.serve.generate import generate
from llm_maker.serve.inference import (
    HalfWeightLinear,
    PackedLinear,
    can_pack,
    half_weights_gain,
    load_for_inference,
    pack_linears,
)
from llm_maker.train.checkpoint import load_model_dir, save_model_dir

needs_packing = pytest.mark.skipif(not can_pack(torch.device("cpu"), torch.bfloat16),
                                   reason="oneDNN packs no bf16 weight here (a build without it, or an AVX2-only CPU)")


def test_inference_dtype_follows_the_training_rule():
    assert inference_dtype("fp32", "cpu") == torch.float32
    assert inference_dtype("bf16", "cpu") == torch.bfloat16
    expected = {"bf16": torch.bfloat16, "fp32": torch.float32}[auto_precision(device_caps(torch.device("cpu")))]
    assert inference_dtype("auto", "cpu") == expected  # the table itself is tests/test_precision.py's


def test_unknown_precision_names_the_flag():
    with pytest.raises(RecipeError, match=r"`--precision` is 'fp8'; choose one of auto, fp32, bf16, fp16"):
        inference_dtype("fp8", "cpu")


@needs_packing
def test_packed_linear_gives_the_plain_bf16_products():
    torch.manual_seed(0)
    w = torch.randn(96, 64).bfloat16()
    layer = PackedLinear(w)
    for rows in (1, 7):  # a decode step and a prefill
        x = torch.randn(2, rows, 64).bfloat16()
        assert torch.equal(layer(x), F.linear(x, w))


@needs_packing
def test_packed_model_generates_what_the_plain_bf16_model_does(tmp_path):
    tok = make_tokenizer()
    model = random_model(tok.vocab_size, tie_embeddings=True)
    save_model_dir(tmp_path / "m", model, tok, {"stage": "pretrain", "recipe": "t"})
    plain, _, _ = load_model_dir(tmp_path / "m", dtype=torch.bfloat16)
    packed, _, _ = load_for_inference(tmp_path / "m", "cpu", "bf16")
    assert packed.embed_tokens.weight.dtype == torch.bfloat16
    assert not any(isinstance(m, torch.nn.Linear) for m in packed.modules())  # every projection and the head
    prompt = tok.encode("The return statement")
    with torch.inference_mode():
        assert torch.equal(packed(torch.tensor([prompt])), plain.eval()(torch.tensor([prompt])))
    assert list(generate(packed, prompt, 24)) == list(generate(plain, prompt, 24))


def test_fp32_loads_the_saved_weights_unchanged(tmp_path):
    tok = make_tokenizer()
    model = random_model(tok.vocab_size)
    save_model_dir(tmp_path / "m", model, tok, {"stage": "pretrain", "recipe": "t"})
    loaded, _, _ = load_for_inference(tmp_path / "m", "cpu", "fp32")
    assert loaded.embed_tokens.weight.dtype == torch.float32
    assert any(isinstance(m, torch.nn.Linear) for m in loaded.modules())  # nothing packed in fp32
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


@needs_packing
def test_pack_linears_counts_every_projection():
    model = random_model(64, tie_embeddings=False).bfloat16()
    assert pack_linears(model) == 7 * model.config.n_layers + 1  # q k v o gate up down, and the head


def test_bf16_on_a_cpu_that_cannot_pack_runs_on_plain_weights(tmp_path, monkeypatch):
    """An AVX2-only CPU (no AVX-512, no AMX): oneDNN refuses to pack a bf16 weight. `--precision
    bf16` there loads plain bf16 layers instead of failing at load."""
    def refuse(weight, batch_size):
        raise RuntimeError("mkldnn_reorder_linear_weight: bf16 path needs the cpu support avx_ne_convert or "
                           "avx512bw, avx512vl and avx512dq")

    monkeypatch.setattr(inference, "_reorder_linear_weight", refuse)
    inference._cpu_packs_bf16.cache_clear()
    try:
        assert not can_pack(torch.device("cpu"), torch.bfloat16)
        tok = make_tokenizer()
        save_model_dir(tmp_path / "m", random_model(tok.vocab_size), tok, {"stage": "pretrain", "recipe": "t"})
        model, _, _ = load_for_inference(tmp_path / "m", "cpu", "bf16")
        assert model.lm_head.weight.dtype == torch.bfloat16
        assert any(isinstance(m, torch.nn.Linear) for m in model.modules())  # not packed
        assert len(list(generate(model, tok.encode("The return"), 4))) == 4
    finally:
        inference._cpu_packs_bf16.cache_clear()


def test_half_weight_linear_decodes_in_bf16_and_prefills_in_fp32():
    """bf16 weights beside fp32 activations (`auto` on an AVX2-only CPU): a decode step's few rows
    multiply in bf16 (half the bytes read), a prefill's many rows in fp32 on the upcast weight."""
    torch.manual_seed(0)
    w = torch.randn(96, 64)
    layer = HalfWeightLinear(w)
    assert layer.weight_bf16.dtype == torch.bfloat16
    step = torch.randn(1, 1, 64)
    out = layer(step)
    assert out.dtype == torch.float32
    assert torch.equal(out, F.linear(step.bfloat16(), w.bfloat16()).float())
    prefill = torch.randn(1, HalfWeightLinear.FP32_FROM_ROWS, 64)
    assert torch.equal(layer(prefill), F.linear(prefill, w.bfloat16().float()))
    assert torch.allclose(layer(prefill), F.linear(prefill, w), rtol=0.05, atol=0.1)  # only the weight rounded


def test_auto_on_an_avx2_cpu_keeps_fp32_activations_with_bf16_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(inference, "_cpu_packs_bf16", lambda: False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert half_weights_gain(torch.device("cpu"), torch.float32)
    assert not half_weights_gain(torch.device("cpu"), torch.bfloat16)
    monkeypatch.setattr(inference, "inference_dtype", lambda precision, device: torch.float32)  # `auto` there
    tok = make_tokenizer()
    model = random_model(tok.vocab_size, tie_embeddings=True)
    save_model_dir(tmp_path / "m", model, tok, {"stage": "pretrain", "recipe": "t"})
    auto, _, _ = load_for_inference(tmp_path / "m", "cpu", "auto")
    exact, _, _ = load_for_inference(tmp_path / "m", "cpu", "fp32")
    assert not any(isinstance(m, torch.nn.Linear) for m in auto.modules())  # every projection and the head
    assert auto.embed_tokens.weight.dtype == torch.float32  # lookups and norms stay fp32
    assert any(isinstance(m, torch.nn.Linear) for m in exact.modules())  # --precision fp32: as saved
    prompt = torch.tensor([tok.encode("The return statement")])
    with torch.inference_mode():
        a, b = auto(prompt), exact(prompt)
    assert (a - b).abs().max() < 0.02 * b.abs().max()
    assert len(list(generate(auto, prompt[0].tolist(), 8))) == 8
