"""Token-by-token generation with the model's KV cache, and text helpers on top of it.

`generate(...)` returns a `Generation`: an iterator over new token ids (streaming) that also
says what happened to the prompt and why it ended:

    gen = generate(model, ids, max_new_tokens=64, stop_ids=[tok.im_end_id])
    for token_id in gen: ...           # one id per step; a stop id is yielded, then it ends
    gen.n_prompt_dropped, gen.stopped  # prompt tokens cut to fit the context; ended on a stop id?

The prompt is run through the model once (prefill), then one token per step reuses the cache.
Sampling follows transformers' order: repetition penalty, temperature, top-k, top-p.
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator, Optional

import torch

from llm_maker.errors import LLMMakerError
from llm_maker.model.llama import LlamaModel
from llm_maker.serve.kv_cache import KVCache
from llm_maker.tokenizer.tokenizer import Tokenizer

REPLACEMENT_CHAR = "\ufffd"  # what a decoder emits for an incomplete UTF-8 sequence


# --------------------------------------------------------------------------------------
# Logits processing: pure functions on a (V,) float tensor
# --------------------------------------------------------------------------------------

def apply_repetition_penalty(logits: torch.Tensor, seen_ids: Iterable[int], penalty: float) -> torch.Tensor:
    """CTRL / transformers penalty: for every token already in the context, divide a positive
    logit by `penalty` and multiply a negative one, so the token becomes less likely either way."""
    if penalty == 1.0:
        return logits
    ids = torch.tensor(sorted(set(seen_ids)), dtype=torch.long, device=logits.device)
    if ids.numel() == 0:
        return logits
    out = logits.clone()
    picked = out[ids]
    out[ids] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return out


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits; the rest become -inf."""
    if k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of most likely tokens whose probability sums
    to at least p (always at least the most likely token)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # probability of the tokens ranked above
    drop_sorted = mass_before >= p
    drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def next_token(logits: torch.Tensor, seen_ids: Iterable[int], temperature: float, top_k: Optional[int],
               top_p: Optional[float], repetition_penalty: float, generator: Optional[torch.Generator]) -> int:
    """Pick the next id from the last position's logits (V,): greedy when temperature is 0."""
    logits = apply_repetition_penalty(logits.float(), seen_ids, repetition_penalty)
    if temperature == 0.0:
        return int(torch.argmax(logits))
    logits = logits / temperature
    if top_k is not None:
        logits = filter_top_k(logits, top_k)
    if top_p is not None:
        logits = filter_top_p(logits, top_p)
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


# --------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------

def check_settings(max_new_tokens: int, temperature: float, top_k: Optional[int], top_p: Optional[float],
                    repetition_penalty: float) -> None:
    if max_new_tokens < 1:
        raise LLMMakerError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise LLMMakerError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise LLMMakerError(f"top_k must be at least 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise LLMMakerError(f"top_p must be in (0, 1], got {top_p}")
    if repetition_penalty <= 0:
        raise LLMMakerError(f"repetition_penalty must be positive (1.0 is none), got {repetition_penalty}")


def sampling_generator(device: torch.device | str, seed: Optional[int]) -> torch.Generator:
    """A generator of its own for one generation: `seed` makes it reproducible; None seeds it
    afresh. Either way it is independent of the global RNG and of other generations."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def fit_context(prompt_len: int, max_new_tokens: int, seq_len: int) -> tuple[int, int]:
    """(prompt tokens to keep, new tokens allowed) so that prompt + new <= seq_len.

    New tokens are capped at seq_len - 1 (at least one prompt token must remain); the prompt
    loses its oldest tokens when it does not fit beside them."""
    max_new = min(max_new_tokens, seq_len - 1)
    return min(prompt_len, seq_len - max_new), max_new


class Generation:
    """Iterator over the new token ids of one generation (see the module docstring).

    Known before iterating: `prompt_ids` (what is fed), `n_prompt_dropped`, `max_new_tokens`
    (after capping to the context). Filled while iterating: `new_ids`, `stopped`."""

    def __init__(self, model: LlamaModel, prompt_ids: list[int], max_new_tokens: int, temperature: float,
                 top_k: Optional[int], top_p: Optional[float], repetition_penalty: float,
                 stop_ids: Iterable[int], seed: Optional[int], device: Optional[torch.device | str]):
        if len(prompt_ids) == 0:
            raise LLMMakerError("cannot generate from an empty prompt: give at least one token")
        check_settings(max_new_tokens, temperature, top_k, top_p, repetition_penalty)
        keep, self.max_new_tokens = fit_context(len(prompt_ids), max_new_tokens, model.context_len)
        self.prompt_ids = list(prompt_ids[len(prompt_ids) - keep:])
        self.n_prompt_dropped = len(prompt_ids) - keep
        self.new_ids: list[int] = []
        self.stopped = False
        self._model = model
        self._device = torch.device(device) if device is not None else next(model.parameters()).device
        self._sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p,
                              repetition_penalty=repetition_penalty)
        self._stop_ids = frozenset(int(i) for i in stop_ids)
        self._generator = sampling_generator(self._device, seed)
        self._steps = self._run()

    def __iter__(self) -> "Generation":
        return self

    def __next__(self) -> int:
        return next(self._steps)

    @torch.inference_mode()  # torch wraps generator functions: the mode is on only inside each step
    def _run(self) -> Iterator[int]:
        model = self._model
        was_training = model.training
        model.eval()
        try:
            dtype = model.embed_tokens.weight.dtype
            cache = KVCache(model.config, 1, len(self.prompt_ids) + self.max_new_tokens, self._device, dtype)
            idx = torch.tensor([self.prompt_ids], dtype=torch.long, device=self._device)  # (1, T)
            seen = set(self.prompt_ids)
            for step in range(self.max_new_tokens):
                logits = model(idx, cache=cache)[0, -1]  # (V,): prefill on step 0, then one token
                token = next_token(logits, seen, generator=self._generator, **self._sampling)
                self.new_ids.append(token)
                seen.add(token)
                if token in self._stop_ids:
                    self.stopped = True
                    yield token
                    return
                yield token
                if step + 1 < self.max_new_tokens:  # the last token need not be fed back
                    idx = torch.tensor([[token]], dtype=torch.long, device=self._device)
        finally:
            model.train(was_training)


def generate(model: LlamaModel, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None, repetition_penalty: float = 1.0,
             stop_ids: Iterable[int] = (), seed: Optional[int] = None,
             device: Optional[torch.device | str] = None) -> Generation:
    """Stream new token ids after `prompt_ids` (see `Generation`). `device` is where the model
    lives (default: its parameters' device)."""
    return Generation(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                      stop_ids, seed, device)


# --------------------------------------------------------------------------------------
# Text helpers
# --------------------------------------------------------------------------------------

class TextDecoder:
    """Push-style text of a growing id sequence, never splitting a UTF-8 character.

    Byte-level BPE tokens can end mid-character; decoding such a prefix ends in U+FFFD, so the
    new suffix is held back until the character completes (`flush` gives it up regardless).
    `skip_ids` (e.g. the stop id) are not shown."""

    def __init__(self, tokenizer: Tokenizer, skip_ids: Iterable[int] = ()):
        self.tokenizer = tokenizer
        self.skip = frozenset(skip_ids)
        self.ids: list[int] = []
        self.shown = ""

    def push(self, token: int) -> str:
        """Add one id; return the text that is now complete ("" while a character is pending)."""
        if token in self.skip:
            return ""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith(REPLACEMENT_CHAR):
            return ""
        piece, self.shown = text[len(self.shown):], text
        return piece

    def flush(self) -> str:
        """Whatever is still held back, at the end of the stream."""
        text = self.tokenizer.decode(self.ids)
        piece, self.shown = text[len(self.shown):], text
        return piece


def decode_stream(tokenizer: Tokenizer, ids: Iterable[int], skip_ids: Iterable[int] = ()) -> Iterator[str]:
    """Yield the text of a growing id sequence piece by piece (see `TextDecoder`)."""
    decoder = TextDecoder(tokenizer, skip_ids)
    for token in ids:
        piece = decoder.push(token)
        if piece:
            yield piece
    tail = decoder.flush()
    if tail:
        yield tail


def stream_text(model: LlamaModel, tokenizer: Tokenizer, prompt_ids: list[int], **kw: Any) -> Iterator[str]:
    """Generate after `prompt_ids` (keywords as `generate`) and yield the new text as it comes,
    without the stop token."""
    yield from decode_stream(tokenizer, generate(model, prompt_ids, **kw), skip_ids=kw.get("stop_ids", ()))


def answer_ids(gen: Generation) -> list[int]:
    """The generated ids without the trailing stop id."""
    return gen.new_ids[:-1] if gen.stopped else list(gen.new_ids)


def complete_ids(model: LlamaModel, tokenizer: Tokenizer, prompt_ids: list[int], **kw: Any) -> dict[str, Any]:
    """Generate to the end and return {text, ids, stopped, n_tokens, n_prompt_dropped}.

    `ids`/`text` are the answer without the stop token; `n_tokens` is its length, so
    `stopped and n_tokens == 13` reads as "eos@13" in the LLM Maker design doc's sample tables."""
    gen = generate(model, prompt_ids, **kw)
    for _ in gen:
        pass
    ids = answer_ids(gen)
    return {"text": tokenizer.decode(ids), "ids": ids, "stopped": gen.stopped, "n_tokens": len(ids),
            "n_prompt_dropped": gen.n_prompt_dropped}


def complete(model: LlamaModel, tokenizer: Tokenizer, text: str, **kw: Any) -> dict[str, Any]:
    """Plain-text continuation of `text` (see `complete_ids` for the result); an empty text
    starts a fresh document, after <|endoftext|>."""
    return complete_ids(model, tokenizer, tokenizer.encode(text) or [tokenizer.eos_id], **kw)
