"""A streaming terminal chat over a model directory, with a rolling context window.

Before each reply the oldest user/assistant turns are dropped (a system message is kept)
until the prompt plus the reply budget fits the model's context (the client-side rolling
window of slm-124M-llama32k-fwedu-sft), so a long session never overflows the KV cache.
Commands: `clear` starts over, `exit` / `quit` (or end of input) leave.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Optional, TextIO

from llm_maker.devices import precision_name, resolve_device
from llm_maker.errors import LLMMakerError
from llm_maker.serve.engine import chat_template, special_ids
from llm_maker.serve.generate import check_settings, decode_stream, generate
from llm_maker.serve.inference import load_for_inference
from llm_maker.sft.templates import ChatFormat, prompt_ids, stop_token_ids
from llm_maker.tokenizer.tokenizer import SPECIAL_TOKENS, Tokenizer

EXIT_COMMANDS = ("exit", "quit", "/exit", "/quit", "/bye")
CLEAR_COMMANDS = ("clear", "/clear")
USER_PROMPT = "you> "
ASSISTANT_PROMPT = "assistant> "


def fit_history(tokenizer: Tokenizer, messages: list[dict], template: ChatFormat,
                budget_tokens: int) -> tuple[list[dict], int]:
    """Drop the oldest turns until the rendered prompt fits `budget_tokens`.

    `messages` ends with the new user message, which is always kept, as is a leading system
    message; each drop removes the oldest user message and the assistant reply after it.
    Returns (kept messages, number of messages dropped). If even the minimum does not fit,
    it is returned anyway and generation keeps the prompt's last tokens."""
    head = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = list(messages[len(head):])
    dropped = 0
    while len(turns) > 1 and len(prompt_ids(tokenizer, head + turns, template)) > budget_tokens:
        n = 2 if len(turns) > 2 and turns[1]["role"] == "assistant" else 1  # never start with a reply
        turns = turns[n:]
        dropped += n
    return head + turns, dropped


def chat_repl(model_dir: str | Path, template: Optional[str] = None, max_new_tokens: int = 128,
              temperature: float = 0.7, top_k: Optional[int] = 40, top_p: Optional[float] = None,
              repetition_penalty: float = 1.1, system: Optional[str] = None, seed: Optional[int] = None,
              device: Optional[str] = None, precision: str = "auto", input_fn: Callable[[str], str] = input,
              output: TextIO = sys.stdout) -> list[dict]:
    """Chat with the model in `model_dir` until exit; returns the final history.

    `template` defaults to an imported model's own Jinja template, else the one the model was
    fine-tuned with (config.json's chat_template), else chatml. Sampling defaults are the LLM Maker
    design doc's chat app (top-k 40).
    `precision` (auto | bf16 | fp16 | fp32) is the weights' dtype, by `devices.inference_dtype`'s rule."""
    check_settings(max_new_tokens, temperature, top_k, top_p, repetition_penalty)  # before loading anything
    dev = resolve_device(device or "auto")
    model, tokenizer, meta = load_for_inference(model_dir, dev, precision)
    template = chat_template(meta, template, tokenizer)
    seq_len = model.config.seq_len
    if max_new_tokens >= seq_len:
        raise LLMMakerError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in "
                            f"{model_dir}'s {seq_len}-token context; use fewer than {seq_len}")
    stop_ids = stop_token_ids(tokenizer, template)
    specials = special_ids(tokenizer)  # never shown

    def say(text: str) -> None:
        output.write(text)
        output.flush()

    say(f"Chatting with {model_dir} ({model.num_parameters():,} parameters, {seq_len}-token context, "
        f"template {template}, {precision_name(model.embed_tokens.weight.dtype)} on {dev.type}). "
        f"Type /clear to start over, /exit to leave.\n")
    if not meta.is_chat_model:
        say("note: this is a base (pretrained) model: it continues text and does not follow chat; "
            "expect it to ramble. Chat with the SFT model (`--model sft`) for answers.\n")

    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    while True:
        try:
            line = input_fn(USER_PROMPT)
        except (EOFError, KeyboardInterrupt):  # Ctrl-D / Ctrl-C at the prompt leave
            say("\n")
            break
        text = line.strip()
        if not text:
            continue
        if text.lower() in EXIT_COMMANDS:
            break
        if text.lower() in CLEAR_COMMANDS:
            history = list(start)
            say("(history cleared)\n")
            continue
        try:
            messages, n_dropped = fit_history(tokenizer, history + [{"role": "user", "content": text}],
                                              template, seq_len - max_new_tokens)
            ids = prompt_ids(tokenizer, messages, template)
        except LLMMakerError as e:  # e.g. a message that spells a special token
            say(f"error: {e}\n")
            continue
        if n_dropped:
            say(f"(dropped the {n_dropped} oldest messages to fit the {seq_len}-token context)\n")
        gen = generate(model, ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                       repetition_penalty=repetition_penalty, stop_ids=stop_ids, seed=seed, device=dev)
        if gen.n_prompt_dropped:
            say(f"(your message is too long: only its last {len(gen.prompt_ids)} tokens are used)\n")
        say(ASSISTANT_PROMPT)
        try:
            for piece in decode_stream(tokenizer, gen, skip_ids=specials):
                say(piece)
        except KeyboardInterrupt:  # Ctrl-C stops this reply, not the session
            say(" [interrupted]")
        say("\n")
        if not gen.stopped and len(gen.new_ids) >= gen.max_new_tokens:
            say(f"(reply cut at {gen.max_new_tokens} tokens)\n")
        reply = tokenizer.decode([t for t in gen.new_ids if t not in specials])
        for special in SPECIAL_TOKENS:  # plain tokens can spell one; the template would reject it
            reply = reply.replace(special, "")
        history = messages + [{"role": "assistant", "content": reply}]
    return history
