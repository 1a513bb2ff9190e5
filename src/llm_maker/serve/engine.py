"""What the server generates for: a loaded chat model (`ChatEngine`) and one request's job.

    engine = ChatEngine.load(model_dir)              # model, tokenizer, chat template, stop ids
    job = Job(ids, SamplingParams(max_tokens=64), loop)
    worker.submit(job)                               # serve/batching.py; QueueFull when busy
    async for kind, value in job.stream(): ...       # ("text", str) ... then ("done", {...})

A job is filled on the worker thread (`emit`) and read on the event loop (`stream`); `cancel()`
(the client went away) is seen by the worker between decode steps.
"""
from __future__ import annotations

import asyncio
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Iterable, Optional

from llm_maker.devices import precision_name
from llm_maker.serve.inference import load_for_inference
from llm_maker.serve.rope_scaling import DynamicRope
from llm_maker.sft.templates import ChatFormat, JinjaTemplate, stop_token_ids
from llm_maker.tokenizer.tokenizer import Tokenizer
from llm_maker.train.checkpoint import ModelMeta


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    repetition_penalty: float = 1.0
    seed: Optional[int] = None
    stop: tuple[str, ...] = ()


class StopText:
    """Cut a stream of text at the first of `stops`, holding back any tail that could still
    become one (so a stop string split across tokens is never shown)."""

    def __init__(self, stops: Iterable[str]):
        self.stops = tuple(s for s in stops if s)
        self.pending = ""
        self.hit = False

    def feed(self, piece: str) -> str:
        """Add `piece`; return the text that is now safe to show."""
        if self.hit:
            return ""
        text = self.pending + piece
        cuts = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if cuts:
            self.hit, self.pending = True, ""
            return text[:min(cuts)]
        hold = max((n for s in self.stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        self.pending = text[len(text) - hold:] if hold else ""
        return text[:len(text) - hold]

    def flush(self) -> str:
        """The held-back tail once the stream ends without a stop."""
        out, self.pending = ("" if self.hit else self.pending), ""
        return out


class Job:
    """One chat completion: the worker thread fills `events`, the event loop reads them."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, loop: asyncio.AbstractEventLoop):
        self.id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.prompt_ids = prompt_ids
        self.params = params
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self._loop = loop

    def emit(self, kind: str, value: Any) -> None:
        """Called on the worker thread: hand an event to the event loop."""
        self._loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))

    def cancel(self) -> None:
        self.cancelled.set()

    async def stream(self) -> AsyncIterator[tuple[str, Any]]:
        """Events until ("done", info) or ("error", message), which end the stream."""
        while True:
            kind, value = await self.events.get()
            yield kind, value
            if kind in ("done", "error"):
                return


@dataclass
class ChatEngine:
    """A loaded chat model: what the server needs to turn messages into a streamed reply."""

    model: Any  # LlamaModel
    tokenizer: Tokenizer
    template: ChatFormat
    name: str
    model_dir: Path
    stage: str
    rope: Optional[DynamicRope] = None
    precision: str = "fp32"  # the weights' dtype: bf16 | fp16 | fp32
    max_context: Optional[int] = None  # serve at most this many tokens a request (None: the model's context)
    stats: dict[str, int] = field(default_factory=lambda: {"completed": 0, "cancelled": 0, "completion_tokens": 0})

    @classmethod
    def load(cls, model_dir: str | Path, name: Optional[str] = None, template: Optional[str] = None,
             rope_scaling: Optional[float] = None, device: str = "auto", precision: str = "auto") -> "ChatEngine":
        model_dir = Path(model_dir)
        model, tokenizer, meta = load_for_inference(model_dir, device, precision)
        rope = DynamicRope(model, rope_scaling) if rope_scaling and rope_scaling != 1.0 else None
        return cls(model=model, tokenizer=tokenizer, template=chat_template(meta, template, tokenizer),
                   name=name or default_model_name(model_dir, meta), model_dir=model_dir,
                   stage=meta.stage or "unknown", rope=rope, precision=precision_name(model.embed_tokens.weight.dtype))

    @property
    def context_len(self) -> int:
        """Prompt + reply tokens a request may hold: the model's (stretched when rope scaling is on),
        or less when the server was started with a smaller `max_context`."""
        full = self.model.context_len
        return full if self.max_context is None else min(full, self.max_context)

    @property
    def special_ids(self) -> frozenset[int]:
        return special_ids(self.tokenizer)

    @property
    def stop_ids(self) -> frozenset[int]:
        return frozenset(stop_token_ids(self.tokenizer, self.template))


JINJA_KEY = "jinja_chat_template"  # ModelMeta.extra: an imported model's own chat template, as Jinja text


def chat_template(meta: ModelMeta, override: Optional[str] = None,
                  tokenizer: Optional[Tokenizer] = None) -> ChatFormat:
    """The template prompts are rendered with: `override`, else an imported model's own Jinja template
    (exact, default system message included, even where a named template renders turns alike), else
    the one the model was fine-tuned with (config.json's chat_template), else chatml."""
    if override:
        return override
    jinja = meta.extra.get(JINJA_KEY)
    if jinja and tokenizer is not None:
        return model_jinja_template(meta, jinja, tokenizer)
    return meta.template


def model_jinja_template(meta: ModelMeta, jinja: str, tokenizer: Tokenizer) -> JinjaTemplate:
    """The model's template with its special tokens (extra["special_ids"]) as variables and its stop
    ids (config.json's stop_token_ids, else the tokenizer's eos)."""
    names = {"bos": "bos_token", "eos": "eos_token", "pad": "pad_token", "unk": "unk_token"}
    ids = meta.extra.get("special_ids") or {"eos": tokenizer.eos_id, "pad": tokenizer.pad_id}
    tokens = {names[k]: tokenizer.hf.id_to_token(int(i)) for k, i in ids.items() if k in names and i is not None}
    stops = tuple(int(i) for i in meta.stop_token_ids) or (tokenizer.eos_id,)
    return JinjaTemplate(text=jinja, stop_ids=stops,
                         special_tokens=tuple((k, v) for k, v in tokens.items() if v is not None))


def special_ids(tokenizer: Tokenizer) -> frozenset[int]:
    """The special tokens' ids: never shown as reply text."""
    return frozenset((tokenizer.eos_id, tokenizer.pad_id, tokenizer.im_start_id, tokenizer.im_end_id))


def default_model_name(model_dir: Path, meta: ModelMeta) -> str:
    """`<recipe>-<stage>` (e.g. demo-sft), else the directory's path tail."""
    if meta.recipe and meta.stage:
        return f"{meta.recipe}-{meta.stage}"
    return "-".join(model_dir.resolve().parts[-2:])
