"""serve/generate.py: cached greedy == full recomputation, stop ids, sampling, penalties, context cap,
UTF-8-safe streaming."""
import pytest
import torch

from helpers import UNICODE_TEXT, make_tokenizer, one_hot_logits, random_model, successor_model, table_model
from llm_maker.errors import LLMMakerError
from llm_maker.model.llama import LlamaModel
from llm_maker.serve.generate import (
    apply_repetition_penalty,
    complete,
    decode_stream,
    filter_top_k,
    filter_top_p,
    fit_context,
    generate,
    next_token,
    stream_text,
)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


# --------------------------------------------------------------------------------------


def full_recompute_greedy(model: LlamaModel, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[:, -1].argmax(-1)))
    return ids[len(prompt):]


@pytest.mark.parametrize("prompt_len", [1, 7])
def test_cached_greedy_equals_full_recomputation(tok, prompt_len):
    model = random_model(tok.vocab_size)
    prompt = tok.encode("The with statement is used")[:prompt_len]
    assert len(prompt) == prompt_len
    expected = full_recompute_greedy(model, prompt, 30)
    assert list(generate(model, prompt, max_new_tokens=30)) == expected
    assert len(set(expected)) > 5  # not a degenerate constant sequence
    changed_first = full_recompute_greedy(model, [100] + prompt[1:], 30)
    assert changed_first != expected  # attention over the prompt matters: the cache is exercised


def test_generation_restores_training_mode_and_needs_no_grad(tok):
    model = random_model(tok.vocab_size).train()
    out = list(generate(model, [5, 6], max_new_tokens=3))
    assert len(out) == 3 and model.training
    assert torch.is_grad_enabled()


def test_stop_id_is_yielded_and_ends_generation():
    model = successor_model(50, {10: 11, 11: 12, 12: 3}, default=10)  # 10 -> 11 -> 12 -> 3
    gen = generate(model, [20], max_new_tokens=10, stop_ids=[3])
    assert list(gen) == [10, 11, 12, 3]
    assert gen.stopped and gen.new_ids == [10, 11, 12, 3]
    gen = generate(model, [20], max_new_tokens=10, stop_ids=[12, 3])  # either stop id ends it
    assert list(gen) == [10, 11, 12] and gen.stopped
    gen = generate(model, [20], max_new_tokens=2, stop_ids=[3])  # budget runs out first
    assert list(gen) == [10, 11] and not gen.stopped


def test_seeded_sampling_is_reproducible(tok):
    model = random_model(tok.vocab_size, std=0.02)  # a flat distribution: samples differ by seed
    kw = dict(max_new_tokens=20, temperature=1.0)
    a = list(generate(model, [5, 6, 7], seed=123, **kw))
    torch.manual_seed(999)  # the global RNG plays no part
    b = list(generate(model, [5, 6, 7], seed=123, **kw))
    c = list(generate(model, [5, 6, 7], seed=124, **kw))
    assert a == b
    assert a != c


def test_top_k_1_equals_greedy(tok):
    model = random_model(tok.vocab_size)
    prompt = tok.encode("A class definition")
    greedy = list(generate(model, prompt, max_new_tokens=25))
    assert list(generate(model, prompt, max_new_tokens=25, temperature=1.5, top_k=1, seed=7)) == greedy
    assert list(generate(model, prompt, max_new_tokens=25, temperature=1.5, top_p=1e-6, seed=7)) == greedy


def test_repetition_penalty_moves_away_from_seen_tokens():
    # Every step: token 7 scores 2.0, token 8 scores 1.9, others 0.
    model = table_model(20, {}, one_hot_logits(20, t7=2.0, t8=1.9))
    assert list(generate(model, [1], max_new_tokens=4)) == [7, 7, 7, 7]
    # With 1.2: 7 is penalised once seen (2.0/1.2 = 1.67 < 1.9), then both are (1.67 > 1.58).
    assert list(generate(model, [1], max_new_tokens=4, repetition_penalty=1.2)) == [7, 8, 7, 7]
    # Prompt tokens count as seen, as in transformers.
    assert list(generate(model, [7], max_new_tokens=1, repetition_penalty=1.2)) == [8]


def test_repetition_penalty_pushes_negative_logits_down():
    logits = torch.tensor([-1.0, -1.1, 0.5, 2.0])
    out = apply_repetition_penalty(logits, [0, 2, 3], 2.0)
    assert out.tolist() == pytest.approx([-2.0, -1.1, 0.25, 1.0])
    assert next_token(torch.tensor([-1.0, -1.1]), [0], 0.0, None, None, 1.2, None) == 1  # -1.2 < -1.1


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert torch.isfinite(filter_top_k(logits, 2)).tolist() == [True, True, False, False]
    assert torch.isfinite(filter_top_p(logits, 0.8)).tolist() == [True, True, False, False]  # 0.5+0.3 >= 0.8
    assert torch.isfinite(filter_top_p(logits, 0.81)).tolist() == [True, True, True, False]
    assert torch.isfinite(filter_top_p(logits, 0.1)).tolist() == [True, False, False, False]


def test_context_is_capped_keeping_the_last_prompt_tokens():
    assert fit_context(10, 20, 64) == (10, 20)
    assert fit_context(60, 20, 64) == (44, 20)
    assert fit_context(5, 100, 64) == (1, 63)
    model = successor_model(50, {}, default=9)  # seq_len 64
    prompt = list(range(10, 50)) + list(range(10, 30))  # 60 tokens
    gen = generate(model, prompt, max_new_tokens=20)
    assert gen.n_prompt_dropped == 16 and gen.prompt_ids == prompt[16:]
    assert list(gen) == [9] * 20  # the cache (64 positions) never overflows
    gen = generate(model, [1, 2], max_new_tokens=500)
    assert gen.max_new_tokens == 63 and gen.n_prompt_dropped == 1 and len(list(gen)) == 63


@pytest.mark.parametrize("kw,match", [
    (dict(max_new_tokens=0), "max_new_tokens must be at least 1, got 0"),
    (dict(temperature=-0.5), r"temperature must be >= 0 \(0 is greedy\), got -0.5"),
    (dict(top_k=0), "top_k must be at least 1, got 0"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be positive"),
])
def test_bad_settings_are_rejected(kw, match):
    model = successor_model(20, {}, default=3)
    with pytest.raises(LLMMakerError, match=match):
        generate(model, [1], **{"max_new_tokens": 5, **kw})
    with pytest.raises(LLMMakerError, match="empty prompt"):
        generate(model, [], max_new_tokens=5)


def test_decode_stream_never_splits_a_character(tok):
    ids = tok.encode(UNICODE_TEXT)
    pieces = list(decode_stream(tok, ids))
    assert "".join(pieces) == UNICODE_TEXT
    assert all("\ufffd" not in p for p in pieces)
    # Byte-level tokens split multi-byte characters: one byte at a time must still stream whole.
    byte_ids = [tok.token_id(ch) for ch in _byte_level_chars("日本🙂".encode("utf-8"))]
    assert None not in byte_ids
    pieces = list(decode_stream(tok, byte_ids))
    assert pieces == ["日", "本", "🙂"]


def test_decode_stream_skips_ids_and_flushes_a_trailing_partial_byte(tok):
    ids = tok.encode("ab") + [tok.im_end_id]
    assert "".join(decode_stream(tok, ids, skip_ids=[tok.im_end_id])) == "ab"
    lone = tok.token_id(_byte_level_chars(b"\xe6")[0])  # the first byte of a 3-byte character
    assert list(decode_stream(tok, tok.encode("x") + [lone])) == ["x", "\ufffd"]


def _byte_level_chars(data: bytes) -> list[str]:
    """The byte-level alphabet symbol of each byte (GPT-2's mapping, as `tokenizers` uses it)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    mapping = bytes_to_unicode()
    return [mapping[b] for b in data]


def test_complete_returns_answer_without_the_stop_token(tok):
    word = tok.encode(" the")
    assert len(word) == 1
    model = successor_model(tok.vocab_size, {word[0]: tok.im_end_id}, default=word[0])
    r = complete(model, tok, "In Python", max_new_tokens=10, stop_ids=[tok.im_end_id])
    assert r == {"text": " the", "ids": word, "stopped": True, "n_tokens": 1, "n_prompt_dropped": 0}
    r = complete(model, tok, "", max_new_tokens=3)  # an empty text starts after <|endoftext|>
    assert r["ids"] == [word[0], tok.im_end_id, word[0]] and not r["stopped"]


def test_stream_text_streams_a_generation_without_its_stop_token(tok):
    word = tok.encode(" the")[0]
    model = successor_model(tok.vocab_size, {word: tok.eos_id}, default=word)
    pieces = list(stream_text(model, tok, tok.encode("Hello"), max_new_tokens=5, stop_ids=[tok.eos_id]))
    assert pieces == [" the"]
