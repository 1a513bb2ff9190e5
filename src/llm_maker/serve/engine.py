"""The generation engine behind the server: chat jobs on a worker thread, off the event loop.

    engine = ChatEngine.load(model_dir)              # model, tokenizer, chat template, stop ids
    worker = GenerationWorker(engine.run, max_waiting=16); worker.start()
    job = Job(ids, SamplingParams(max_tokens=64), loop); worker.submit(job)   # QueueFull when busy
    async for kind, value in job.stream(): ...       # ("text", str) ... then ("done", {...})

One thread runs one job at a time (on a CPU, parallel generations only fight over the same
cores); at most `max_waiting` jobs wait behind it, and a full queue is refused at once rather
than queued without bound. A job is checked between tokens, so `job.cancel()` (the client went
away) stops its generation within one step.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Iterable, Iterator, Optional

from llm_maker.errors import LLMMakerError
from llm_maker.serve.generate import Generation, decode_stream, generate
from llm_maker.serve.rope_scaling import DynamicRope
from llm_maker.sft.templates import stop_token_ids
from llm_maker.tokenizer.tokenizer import Tokenizer

log = logging.getLogger("llm_maker.serve")


class QueueFull(LLMMakerError):
    """Every worker is busy and the waiting queue is full."""


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
    template: str
    name: str
    model_dir: Path
    stage: str
    rope: Optional[DynamicRope] = None
    stats: dict[str, int] = field(default_factory=lambda: {"completed": 0, "cancelled": 0, "completion_tokens": 0})

    @classmethod
    def load(cls, model_dir: str | Path, name: Optional[str] = None, template: Optional[str] = None,
             rope_scaling: Optional[float] = None, device: str = "auto") -> "ChatEngine":
        from llm_maker.train.checkpoint import load_model_dir
        from llm_maker.train.trainer import resolve_device

        model_dir = Path(model_dir)
        model, tokenizer, meta = load_model_dir(model_dir, resolve_device(device))
        model.eval()
        rope = DynamicRope(model, rope_scaling) if rope_scaling and rope_scaling != 1.0 else None
        return cls(model=model, tokenizer=tokenizer, template=template or meta.get("chat_template") or "chatml",
                   name=name or default_model_name(model_dir, meta), model_dir=model_dir,
                   stage=meta.get("stage", "unknown"), rope=rope)

    @property
    def context_len(self) -> int:
        return self.model.config.seq_len  # stretched when rope scaling is on

    @property
    def hidden_ids(self) -> frozenset[int]:
        t = self.tokenizer
        return frozenset((t.eos_id, t.pad_id, t.im_start_id, t.im_end_id))

    def generation(self, job: Job) -> Generation:
        p = job.params
        if self.rope is not None:
            self.rope.prepare(len(job.prompt_ids) + p.max_tokens)
        return generate(self.model, job.prompt_ids, p.max_tokens, temperature=p.temperature, top_k=p.top_k,
                        top_p=p.top_p, repetition_penalty=p.repetition_penalty,
                        stop_ids=stop_token_ids(self.tokenizer, self.template), seed=p.seed)

    def run(self, job: Job) -> None:
        """Generate `job`'s reply on the calling (worker) thread, emitting text as it decodes."""
        gen = self.generation(job)
        stopper = StopText(job.params.stop)
        for piece in decode_stream(self.tokenizer, _until_cancelled(gen, job), skip_ids=self.hidden_ids):
            text = stopper.feed(piece)
            if text:
                job.emit("text", text)
            if stopper.hit:
                break
        if job.cancelled.is_set():
            self.stats["cancelled"] += 1
            finish = "cancelled"
        else:
            tail = stopper.flush()
            if tail:
                job.emit("text", tail)
            finish = "stop" if gen.stopped or stopper.hit else "length"
            self.stats["completed"] += 1
        n_tokens = len(gen.new_ids) - (1 if gen.stopped else 0)  # the stop token is not part of the answer
        self.stats["completion_tokens"] += n_tokens
        job.emit("done", {"finish_reason": finish, "completion_tokens": n_tokens,
                          "prompt_tokens": len(gen.prompt_ids)})


def _until_cancelled(gen: Generation, job: Job) -> Iterator[int]:
    for token in gen:
        if job.cancelled.is_set():
            return
        yield token


def default_model_name(model_dir: Path, meta: dict[str, Any]) -> str:
    """`<recipe>-<stage>` (e.g. demo-sft), else the directory's path tail."""
    if meta.get("recipe") and meta.get("stage"):
        return f"{meta['recipe']}-{meta['stage']}"
    return "-".join(model_dir.resolve().parts[-2:])


class GenerationWorker:
    """A thread that runs jobs one after another from a bounded queue."""

    def __init__(self, run: Any, max_waiting: int = 16):
        if max_waiting < 1:
            raise LLMMakerError(f"max_waiting must be at least 1, got {max_waiting}")
        self._run = run
        self.max_waiting = max_waiting
        self._queue: queue.Queue = queue.Queue(maxsize=max_waiting)
        self._thread: Optional[threading.Thread] = None
        self.busy = False
        self.rejected = 0  # refused with 503: the queue was full
        self.failed = 0  # raised inside generation

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="llm-maker-generation", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        if self._thread is None:
            return
        try:
            self._queue.put(None, timeout=timeout_s)  # the sentinel, behind any waiting jobs
        except queue.Full:
            pass
        self._thread.join(timeout_s)
        self._thread = None

    def submit(self, job: Job) -> None:
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self.rejected += 1
            raise QueueFull(f"the server is busy: {self.max_waiting} requests are already waiting; "
                            f"retry shortly") from None

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if job.cancelled.is_set():  # the client left while the job waited
                job.emit("done", {"finish_reason": "cancelled", "completion_tokens": 0, "prompt_tokens": 0})
                continue
            self.busy = True
            try:
                self._run(job)
            except Exception as e:  # a bug must not kill the worker: report it to this request
                self.failed += 1
                log.exception("generation failed for %s", job.id)
                job.emit("error", f"generation failed: {type(e).__name__}: {e}")
            finally:
                self.busy = False
