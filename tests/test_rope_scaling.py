"""serve/rope_scaling.py: dynamic NTK RoPE scaling, checked against transformers' `dynamic` RoPE."""
from __future__ import annotations

import math

import pytest
import torch

from helpers import random_model
from llm_maker.errors import LLMMakerError
from llm_maker.serve.generate import generate
from llm_maker.serve.rope_scaling import DynamicRope, dynamic_ntk_theta

TRAINED = 32  # the test model's context


def test_theta_is_unchanged_within_the_trained_context_and_grows_beyond():
    assert dynamic_ntk_theta(10000.0, 16, 32, 32, 2.0) == 10000.0
    # S = 2L with factor 2: base * (2*2 - 1) ** (hd / (hd - 2))
    assert dynamic_ntk_theta(10000.0, 16, 64, 32, 2.0) == pytest.approx(10000.0 * 3 ** (16 / 14))
    thetas = [dynamic_ntk_theta(10000.0, 16, s, 32, 2.0) for s in (33, 40, 48, 64)]
    assert thetas == sorted(thetas) and thetas[0] > 10000.0


def hf_twin(model, factor: float):
    """transformers' LlamaForCausalLM with `model`'s weights and dynamic RoPE scaling."""
    transformers = pytest.importorskip("transformers")
    c = model.config
    cfg = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_mlp, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim,
        max_position_embeddings=c.seq_len, rms_norm_eps=c.norm_eps, tie_word_embeddings=c.tie_embeddings,
        rope_parameters={"rope_type": "dynamic", "factor": factor, "rope_theta": c.rope_theta})
    hf = transformers.LlamaForCausalLM(cfg)
    sd = {(k if k.startswith("lm_head") else f"model.{k}"): v for k, v in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    return hf.eval()


@pytest.mark.parametrize("length", [24, 32, 48, 64])
def test_a_full_forward_matches_transformers_dynamic_rope(length):
    model = random_model(300, seed=1, seq_len=TRAINED, d_model=64, n_heads=4, n_kv_heads=2)
    hf = hf_twin(model, 2.0)
    rope = DynamicRope(model, 2.0)
    assert model.context_len == 64 and model.config.seq_len == rope.trained_len == TRAINED  # config: as trained
    ids = torch.randint(4, 300, (1, length), generator=torch.Generator().manual_seed(length))
    theta = rope.prepare(length)
    assert (theta == 10000.0) == (length <= TRAINED)
    with torch.no_grad():
        ours = model(ids)
        theirs = hf(ids).logits
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()


def test_scaling_leaves_the_trained_context_exact_and_stretches_generation():
    base = random_model(300, seed=2, seq_len=TRAINED)
    stretched = random_model(300, seed=2, seq_len=TRAINED)
    DynamicRope(stretched, 2.0)
    prompt = list(range(10, 20))
    assert list(generate(stretched, prompt, 20)) == list(generate(base, prompt, 20))  # 30 <= 32 tokens
    gen = generate(stretched, list(range(10, 50)), 20)  # 60 tokens: more than the trained 32
    assert gen.n_prompt_dropped == 0 and len(list(gen)) == 20
    assert generate(base, list(range(10, 50)), 20).n_prompt_dropped == 28  # unscaled: only 32 fit


def test_the_table_follows_the_planned_length():
    model = random_model(300, seed=3, seq_len=TRAINED)
    rope = DynamicRope(model, 2.0)
    rope.prepare(64)
    hd = model.config.head_dim
    expected = 1.0 / dynamic_ntk_theta(10000.0, hd, 64, TRAINED, 2.0) ** (2 / hd)  # second rotary frequency
    assert model.rope_cos.shape == (64, hd)
    assert math.acos(model.rope_cos[1, 1].item()) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("factor", [0.5, 9.0])
def test_bad_factor_is_refused(factor):
    with pytest.raises(LLMMakerError, match=r"rope scaling factor must be in \[1, 8\]"):
        DynamicRope(random_model(300, seq_len=TRAINED), factor)
