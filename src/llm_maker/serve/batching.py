"""Continuous batching: the worker thread that runs the server's jobs together, off the event loop.

    worker = GenerationWorker(engine, max_batch=8, max_waiting=16); worker.start()
    worker.submit(job)                               # QueueFull when 8 + 16 jobs are in already

Concurrent requests decode together (`Batch`): every step feeds the newest token of each
running job to the model as one (B, 1) batch over a `BatchKVCache` (serve/kv_cache.py), in
which each row has its own length and position. A new job joins between steps (its prompt is
prefilled alone into a free row) and leaves as soon as it ends, so a short answer never waits
for a long one.

At most `max_batch` jobs run; at most `max_waiting` wait behind them, and any more are refused
at once rather than queued without bound. Admission counts the jobs the server holds, not the
queue's length, so it does not depend on what the worker is doing: a job taken off the queue
for its prefill counts as running, and a burst is admitted up to `max_batch + max_waiting`
while the worker is still prefilling the first. Jobs are checked between steps, so
`job.cancel()` (the client went away) frees the row within one step. With dynamic RoPE every
row must share one rotary base (it depends on the planned length): a job needing another base
waits for the batch to drain, and jobs behind it wait too (first come, first served).
"""
from __future__ import annotations

import logging
import queue
import threading
from typing import Optional

import torch

from llm_maker.errors import LLMMakerError
from llm_maker.serve.engine import ChatEngine, Job, StopText
from llm_maker.serve.generate import TextDecoder, fit_context, next_token, sampling_generator
from llm_maker.serve.kv_cache import BatchKVCache

log = logging.getLogger("llm_maker.serve")


class QueueFull(LLMMakerError):
    """`max_batch` jobs run and `max_waiting` wait already."""


class _Row:
    """One running job inside a `Batch`: its sampling state and its text so far."""

    def __init__(self, job: Job, prompt_ids: list[int], max_new: int, engine: ChatEngine, device: torch.device):
        p = job.params
        self.job, self.prompt_ids, self.max_new = job, prompt_ids, max_new
        self.new_ids: list[int] = []
        self.seen = set(prompt_ids)  # for the repetition penalty
        self.sampling = dict(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                             repetition_penalty=p.repetition_penalty)
        self.generator = sampling_generator(device, p.seed)
        self.plain_greedy = p.temperature == 0.0 and p.repetition_penalty == 1.0  # the argmax, nothing else
        self.decoder = TextDecoder(engine.tokenizer, skip_ids=engine.special_ids)
        self.stopper = StopText(p.stop)
        self.stopped = False  # ended on a stop id


class Batch:
    """Continuous batching over one `BatchKVCache`: `admit` a job (prefill, first token), `step`
    every running job by one token; finished and cancelled jobs leave at once. Row i of
    `rows` is row i of the cache. Not thread-safe: one worker thread drives it."""

    def __init__(self, engine: ChatEngine, max_rows: int):
        if max_rows < 1:
            raise LLMMakerError(f"max_batch must be at least 1, got {max_rows}")
        model = engine.model
        self.engine, self.max_rows = engine, max_rows
        self.device = next(model.parameters()).device
        self.cache = BatchKVCache(model.config, max_rows, engine.context_len, self.device,
                                  model.embed_tokens.weight.dtype)
        self.rows: list[_Row] = []
        self._stop_ids = engine.stop_ids

    def __len__(self) -> int:
        return len(self.rows)

    def _plan(self, job: Job) -> tuple[list[int], int]:
        """(prompt ids kept, new tokens allowed) so that the job fits the context."""
        keep, max_new = fit_context(len(job.prompt_ids), job.params.max_tokens, self.engine.context_len)
        return job.prompt_ids[len(job.prompt_ids) - keep:], max_new

    def fits(self, job: Job) -> bool:
        """Whether `job` can join now: a free row and, with dynamic RoPE, the same rotary base."""
        if len(self.rows) >= self.max_rows:
            return False
        rope = self.engine.rope
        if rope is None or not self.rows:
            return True
        prompt, max_new = self._plan(job)
        return rope.theta_for(len(prompt) + max_new) == rope.theta

    @torch.inference_mode()
    def admit(self, job: Job) -> None:
        """Prefill `job`'s prompt into a free row and sample its first token (which may end it)."""
        prompt, max_new = self._plan(job)
        if self.engine.rope is not None and not self.rows:
            self.engine.rope.prepare(len(prompt) + max_new)
        i = self.cache.add_row()
        row = _Row(job, prompt, max_new, self.engine, self.device)
        self.rows.append(row)
        try:
            self.cache.select(slice(i, i + 1))
            logits = self.engine.model(torch.tensor([prompt], dtype=torch.long, device=self.device),
                                       cache=self.cache)[0, -1]  # (V,)
            self._advance(i, logits)
        except BaseException:
            if i < len(self.rows) and self.rows[i] is row:  # not already finished and removed
                self._remove(i)
            raise

    @torch.inference_mode()
    def step(self) -> None:
        """One token for every running job; cancelled jobs leave first."""
        for i in reversed(range(len(self.rows))):
            if self.rows[i].job.cancelled.is_set():
                self._finish(i, "cancelled")
        if not self.rows:
            return
        self.cache.select(slice(0, len(self.rows)))
        idx = torch.tensor([[row.new_ids[-1]] for row in self.rows], dtype=torch.long, device=self.device)
        logits = self.engine.model(idx, cache=self.cache)[:, -1]  # (B, V)
        # Plain greedy rows take one argmax over the batch (one device sync, not one per row).
        greedy = [i for i, row in enumerate(self.rows) if row.plain_greedy]
        picked = dict(zip(greedy, logits[greedy].argmax(-1).tolist(), strict=False)) if greedy else {}
        for i in reversed(range(len(self.rows))):  # backwards: a row that leaves is replaced by one already done
            self._advance(i, logits[i], picked.get(i))

    def fail(self, message: str) -> int:
        """End every running job with an error (after a failed step); returns how many."""
        n = len(self.rows)
        for i in reversed(range(n)):
            self.rows[i].job.emit("error", message)
            self._remove(i)
        return n

    def _advance(self, i: int, logits: torch.Tensor, token: Optional[int] = None) -> None:
        """Sample row i's next token from its logits (V,) unless `token` is already picked, stream
        its text, end it if done."""
        row = self.rows[i]
        if token is None:
            token = next_token(logits, row.seen, generator=row.generator, **row.sampling)
        row.new_ids.append(token)
        row.seen.add(token)
        if token in self._stop_ids:
            row.stopped = True
            self._finish(i, "stop")
            return
        text = row.stopper.feed(row.decoder.push(token))
        if text:
            row.job.emit("text", text)
        if row.stopper.hit:
            self._finish(i, "stop")
        elif len(row.new_ids) >= row.max_new:
            self._finish(i, "length")

    def _finish(self, i: int, reason: str) -> None:
        row, stats = self.rows[i], self.engine.stats
        if reason == "cancelled":
            stats["cancelled"] += 1
        else:
            tail = row.stopper.feed(row.decoder.flush()) + row.stopper.flush()  # a held-back character or stop prefix
            if tail:
                row.job.emit("text", tail)
            stats["completed"] += 1
        n_tokens = len(row.new_ids) - (1 if row.stopped else 0)  # the stop token is not part of the answer
        stats["completion_tokens"] += n_tokens
        row.job.emit("done", {"finish_reason": reason, "completion_tokens": n_tokens,
                              "prompt_tokens": len(row.prompt_ids)})
        self._remove(i)

    def _remove(self, i: int) -> None:
        self.cache.remove_row(i)  # the last row moves into i: mirror it
        last = self.rows.pop()
        if i < len(self.rows):
            self.rows[i] = last


_STOP = object()  # wakes the worker to shut down


class GenerationWorker:
    """A thread that runs jobs in a continuous `Batch`, fed from a queue; `submit` admits at most
    `max_batch + max_waiting` jobs at once (running, being prefilled or waiting)."""

    def __init__(self, engine: ChatEngine, max_batch: int = 8, max_waiting: int = 16):
        if max_waiting < 1:
            raise LLMMakerError(f"max_waiting must be at least 1, got {max_waiting}")
        self.batch = Batch(engine, max_batch)
        self.max_waiting = max_waiting
        self.capacity = max_batch + max_waiting
        self._queue: queue.Queue = queue.Queue()  # bounded by `capacity`, counted in `_admitted`
        self._held: Optional[Job] = None  # taken from the queue, waiting for the batch to drain
        self._admitted = 0  # jobs submitted and not ended yet, wherever they are
        self._lock = threading.Lock()  # guards `_admitted` (submit runs on the event loop)
        self._stopping = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._admitting = False
        self.rejected = 0  # refused with 503: the queue was full
        self.failed = 0  # raised inside generation
        self.peak_batch = 0  # the most jobs that decoded together

    @property
    def waiting(self) -> int:
        return self._queue.qsize() + (self._held is not None)

    @property
    def running(self) -> int:
        """Jobs decoding or being prefilled: admitted ones that no longer wait."""
        return max(0, self._admitted - self.waiting)

    @property
    def busy(self) -> bool:
        return self._admitting or len(self.batch) > 0

    def start(self) -> None:
        self._stopping.clear()
        self._thread = threading.Thread(target=self._loop, name="llm-maker-generation", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """End the thread after its current step; running and waiting jobs get an error."""
        if self._thread is None:
            return
        self._stopping.set()
        self._queue.put_nowait(_STOP)  # wakes a worker blocked on an empty queue
        self._thread.join(timeout_s)
        self._thread = None

    def submit(self, job: Job) -> None:
        """Queue `job`, or QueueFull when `capacity` jobs are in the server already. Never waits
        for the worker: it holds the lock only between its own short updates."""
        with self._lock:
            if self._admitted >= self.capacity:
                self.rejected += 1
                raise QueueFull(f"the server is busy: {self.batch.max_rows} requests are running and "
                                f"{self.max_waiting} are already waiting; retry shortly")
            self._admitted += 1
            self._queue.put_nowait(job)

    def _ended(self, n: int) -> None:
        """`n` admitted jobs have ended (done, error or cancelled): their places are free."""
        if n:
            with self._lock:
                self._admitted -= n

    def _loop(self) -> None:
        while not self._stopping.is_set():
            self._admit_waiting()
            if len(self.batch) and not self._stopping.is_set():
                self.peak_batch = max(self.peak_batch, len(self.batch))
                before = len(self.batch)
                try:
                    self.batch.step()
                except Exception as e:  # a bug must not kill the worker: report it to these requests
                    log.exception("a batched generation step failed")
                    self.failed += self.batch.fail(f"generation failed: {type(e).__name__}: {e}")
                self._ended(before - len(self.batch))  # every job that leaves a row has ended
        self._shut_down()

    def _admit_waiting(self) -> None:
        """Move waiting jobs into free rows, in order; block for one when nothing runs."""
        while len(self.batch) < self.batch.max_rows:
            job = self._held
            self._held = None
            if job is None:
                try:
                    job = self._queue.get(block=not len(self.batch))
                except queue.Empty:
                    return
            if job is _STOP:
                return
            if job.cancelled.is_set():  # the client left while the job waited
                job.emit("done", {"finish_reason": "cancelled", "completion_tokens": 0, "prompt_tokens": 0})
                self._ended(1)
                continue
            if not self.batch.fits(job):
                self._held = job
                return
            self._admitting = True
            before = len(self.batch)
            try:
                self.batch.admit(job)
            except Exception as e:
                self.failed += 1
                log.exception("generation failed for %s", job.id)
                job.emit("error", f"generation failed: {type(e).__name__}: {e}")
            finally:
                self._admitting = False
            self._ended(before + 1 - len(self.batch))  # 0 if it runs on; 1 if its first token ended it or it failed

    def _shut_down(self) -> None:
        n_ended = self.batch.fail("the server is shutting down")
        pending = [self._held] if self._held is not None else []
        self._held = None
        while True:
            try:
                pending.append(self._queue.get_nowait())
            except queue.Empty:
                break
        for job in pending:
            if job is not _STOP:
                job.emit("error", "the server is shutting down")
                n_ended += 1
        self._ended(n_ended)
