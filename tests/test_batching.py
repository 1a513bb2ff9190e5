"""serve/batching.py's continuous batching, driven directly (no HTTP): jobs that decode together
get exactly the answer each would get alone, join and leave between steps, and a failure or a
cancellation touches only what it must."""
from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from helpers import make_tokenizer, random_model
from llm_maker.serve.batching import Batch, GenerationWorker, QueueFull
from llm_maker.serve.engine import ChatEngine, Job, SamplingParams
from llm_maker.serve.generate import answer_ids, generate
from llm_maker.sft.templates import prompt_ids
from llm_maker.train.checkpoint import save_model_dir


class RecordedJob(Job):
    """A job whose events are kept in a list instead of crossing to an event loop."""

    def __init__(self, ids: list[int], params: SamplingParams):
        super().__init__(ids, params, loop=None)
        self.log: list[tuple[str, Any]] = []
        self.finished = threading.Event()

    def emit(self, kind: str, value: Any) -> None:
        self.log.append((kind, value))
        if kind in ("done", "error"):
            self.finished.set()

    @property
    def text(self) -> str:
        return "".join(v for k, v in self.log if k == "text")

    @property
    def end(self) -> tuple[str, Any]:
        return self.log[-1]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def engine(tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("batching") / "model"
    save_model_dir(path, random_model(tok.vocab_size, seed=5, seq_len=96), tok,
                   {"stage": "sft", "chat_template": "chatml", "recipe": "batch"})
    return ChatEngine.load(path, device="cpu")


QUESTIONS = ["What is a list?", "Tell me about the os module and its many functions, please.", "Hi",
             "Why are tuples immutable?", "Explain decorators."]


def ids_for(engine: ChatEngine, text: str) -> list[int]:
    return prompt_ids(engine.tokenizer, [{"role": "user", "content": text}], engine.template)


def alone(engine: ChatEngine, ids: list[int], p: SamplingParams) -> str:
    """The reply the plain single-sequence generator gives: what a batched job must match."""
    gen = generate(engine.model, ids, p.max_tokens, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                   repetition_penalty=p.repetition_penalty, stop_ids=engine.stop_ids, seed=p.seed)
    for _ in gen:
        pass
    return engine.tokenizer.decode([t for t in answer_ids(gen) if t not in engine.special_ids])


def mixed_params(i: int) -> SamplingParams:
    """Greedy, seeded sampling with top-k/top-p, and a repetition penalty, with different lengths."""
    return [SamplingParams(max_tokens=12, temperature=0.0),
            SamplingParams(max_tokens=20, temperature=0.9, top_k=40, seed=7),
            SamplingParams(max_tokens=5, temperature=0.0, repetition_penalty=1.3),
            SamplingParams(max_tokens=16, temperature=1.1, top_p=0.8, seed=11),
            SamplingParams(max_tokens=9, temperature=0.0)][i % 5]


def test_jobs_decoding_together_get_the_answers_they_would_get_alone(engine):
    batch = Batch(engine, max_rows=4)
    jobs = [RecordedJob(ids_for(engine, q), mixed_params(i)) for i, q in enumerate(QUESTIONS)]
    expected = [alone(engine, j.prompt_ids, j.params) for j in jobs]
    assert len(set(expected)) == len(jobs)  # distinct answers: a crossed row would show
    for job in jobs[:3]:
        batch.admit(job)
    sizes, steps = [], 0
    while len(batch) or not jobs[4].finished.is_set():
        if steps == 3:  # two newcomers join mid-flight: one fits now, one when a row frees
            batch.admit(jobs[3])
        if steps >= 3 and not jobs[4].log and batch.fits(jobs[4]):
            batch.admit(jobs[4])
        sizes.append(len(batch))
        batch.step()
        steps += 1
    assert max(sizes) == 4 and batch.fits(jobs[0])  # it filled up, and it is free again
    for job, want in zip(jobs, expected, strict=False):
        assert job.text == want
        kind, info = job.end
        assert kind == "done" and info["prompt_tokens"] == len(job.prompt_ids)
        assert info["completion_tokens"] <= job.params.max_tokens
    assert len(batch.cache.lengths) == 0


def test_a_batch_step_decodes_all_rows_in_one_forward(engine):
    """The point of batching: B running jobs cost one model call per step, not B."""
    batch = Batch(engine, max_rows=4)
    jobs = [RecordedJob(ids_for(engine, q), SamplingParams(max_tokens=6, temperature=0.0)) for q in QUESTIONS[:4]]
    for job in jobs:
        batch.admit(job)
    shapes = []
    hook = engine.model.register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    try:
        batch.step()
    finally:
        hook.remove()
    assert shapes == [(4, 1)]


def test_a_cancelled_job_leaves_at_the_next_step_and_the_others_go_on(engine):
    batch = Batch(engine, max_rows=3)
    jobs = [RecordedJob(ids_for(engine, q), SamplingParams(max_tokens=10, temperature=0.0)) for q in QUESTIONS[:3]]
    expected = [alone(engine, j.prompt_ids, j.params) for j in jobs]
    for job in jobs:
        batch.admit(job)
    batch.step()
    jobs[0].cancel()
    batch.step()
    assert jobs[0].end[0] == "done" and jobs[0].end[1]["finish_reason"] == "cancelled" and len(batch) == 2
    while len(batch):
        batch.step()
    assert [j.text for j in jobs[1:]] == expected[1:]


def test_stop_strings_end_only_their_own_job(engine):
    batch = Batch(engine, max_rows=2)
    free = SamplingParams(max_tokens=16, temperature=0.0)
    full = alone(engine, ids_for(engine, QUESTIONS[0]), free)
    stop = full.strip()[2:4]  # a string the greedy answer is known to contain
    cut = RecordedJob(ids_for(engine, QUESTIONS[0]), SamplingParams(max_tokens=16, temperature=0.0, stop=(stop,)))
    other = RecordedJob(ids_for(engine, QUESTIONS[1]), free)
    batch.admit(cut), batch.admit(other)
    while len(batch):
        batch.step()
    assert cut.text == full[:full.index(stop)] and cut.end[1]["finish_reason"] == "stop"
    assert other.text == alone(engine, other.prompt_ids, free)


def test_with_dynamic_rope_only_jobs_sharing_a_rotary_base_run_together(tok, tmp_path):
    save_model_dir(tmp_path / "m", random_model(tok.vocab_size, seed=2, seq_len=32), tok,
                   {"stage": "sft", "chat_template": "chatml", "recipe": "rope"})
    engine = ChatEngine.load(tmp_path / "m", device="cpu", rope_scaling=2.0)
    batch = Batch(engine, max_rows=4)
    short = RecordedJob(ids_for(engine, "Hi"), SamplingParams(max_tokens=4, temperature=0.0))
    also_short = RecordedJob(ids_for(engine, "Yo"), SamplingParams(max_tokens=4, temperature=0.0))
    long = RecordedJob(ids_for(engine, "Hi"), SamplingParams(max_tokens=40, temperature=0.0))  # past 32 tokens
    batch.admit(short)
    assert batch.fits(also_short) and not batch.fits(long)
    while len(batch):
        batch.step()
    assert batch.fits(long)
    batch.admit(long)
    assert engine.rope.theta > engine.rope.base_theta
    while len(batch):
        batch.step()
    # The stretched job matches a solo generation under the base it was prepared with.
    assert long.text == alone(engine, long.prompt_ids, long.params)


def test_the_worker_batches_waiting_jobs_and_survives_a_failing_step(engine):
    """Queued jobs join one batch; a step that raises fails the jobs in it (an error each), and
    the worker goes on with the next ones."""
    worker = GenerationWorker(engine, max_batch=4, max_waiting=8)
    gate = threading.Event()
    real_admit = worker.batch.admit
    worker.batch.admit = lambda job: (gate.wait(30), real_admit(job))
    jobs = [RecordedJob(ids_for(engine, q), SamplingParams(max_tokens=8, temperature=0.0)) for q in QUESTIONS[:4]]
    worker.start()
    try:
        for job in jobs:
            worker.submit(job)
        gate.set()
        for job in jobs:
            assert job.finished.wait(30)
        assert worker.peak_batch == 4 and all(j.end[0] == "done" for j in jobs)

        real_step = worker.batch.step
        worker.batch.step = lambda: (_ for _ in ()).throw(RuntimeError("boom"))
        doomed = [RecordedJob(ids_for(engine, q), SamplingParams(max_tokens=8, temperature=0.0)) for q in QUESTIONS[:2]]
        for job in doomed:
            worker.submit(job)
        for job in doomed:
            assert job.finished.wait(30)
        assert [j.end for j in doomed] == [("error", "generation failed: RuntimeError: boom")] * 2
        assert worker.failed == 2 and len(worker.batch) == 0 and worker.batch.cache.n == 0

        worker.batch.step = real_step
        after = RecordedJob(ids_for(engine, QUESTIONS[0]), SamplingParams(max_tokens=8, temperature=0.0))
        worker.submit(after)
        assert after.finished.wait(30) and after.text == alone(engine, after.prompt_ids, after.params)
    finally:
        worker.stop()


def test_the_worker_admits_max_batch_plus_max_waiting_whatever_it_is_doing(engine):
    """Admission counts jobs, not the queue's length: the job held in its prefill counts as
    running, so 2 + 3 are admitted while the worker is busy; every job that ends (answered,
    cancelled while waiting, failed) frees its place."""
    worker = GenerationWorker(engine, max_batch=2, max_waiting=3)
    gate = threading.Event()
    real_admit = worker.batch.admit
    worker.batch.admit = lambda job: (gate.wait(30), real_admit(job))
    params = SamplingParams(max_tokens=4, temperature=0.0)
    jobs = [RecordedJob(ids_for(engine, q), params) for q in QUESTIONS]
    worker.start()
    try:
        for job in jobs:
            worker.submit(job)
        deadline = time.monotonic() + 30
        while worker.waiting != 4:  # the worker has taken the first into its prefill
            assert time.monotonic() < deadline
            time.sleep(0.005)
        assert worker.running == 1
        with pytest.raises(QueueFull, match="2 requests are running and 3 are already waiting"):
            worker.submit(RecordedJob(ids_for(engine, "Hi"), params))
        assert worker.rejected == 1
        jobs[4].cancel()  # its client leaves while it waits
        gate.set()
        for job in jobs:
            assert job.finished.wait(30)
        assert all(j.end[0] == "done" for j in jobs) and jobs[4].end[1]["finish_reason"] == "cancelled"
        bad = RecordedJob(ids_for(engine, "x") + [engine.tokenizer.vocab_size + 5], params)  # fails in its prefill
        worker.submit(bad)
        assert bad.finished.wait(30) and bad.end[0] == "error"
        deadline = time.monotonic() + 30
        while worker.running or worker.waiting:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        again = [RecordedJob(ids_for(engine, q), params) for q in QUESTIONS]  # all five places are free
        for job in again:
            worker.submit(job)
        for job in again:
            assert job.finished.wait(30) and job.end[0] == "done"
    finally:
        worker.stop()


def test_stopping_the_worker_ends_running_and_waiting_jobs_with_an_error(engine):
    worker = GenerationWorker(engine, max_batch=1, max_waiting=4)
    jobs = [RecordedJob(ids_for(engine, q), SamplingParams(max_tokens=60, temperature=0.0)) for q in QUESTIONS[:3]]
    worker.start()
    for job in jobs:
        worker.submit(job)
    deadline = time.monotonic() + 30
    while not jobs[0].log:  # the first is running
        assert time.monotonic() < deadline
        time.sleep(0.005)
    worker.stop()
    for job in jobs:
        assert job.finished.is_set() and job.end[0] in ("done", "error")
    assert any(j.end == ("error", "the server is shutting down") for j in jobs)


def test_max_batch_must_be_positive(engine):
    with pytest.raises(Exception, match="max_batch must be at least 1, got 0"):
        Batch(engine, 0)


def test_a_job_that_fails_in_its_prefill_fails_alone(engine):
    """An id outside the vocabulary makes the prefill raise: that job gets an error; the job
    already running keeps its row and its answer."""
    batch = Batch(engine, max_rows=2)
    good = RecordedJob(ids_for(engine, QUESTIONS[0]), SamplingParams(max_tokens=10, temperature=0.0))
    batch.admit(good)
    batch.step()
    bad = RecordedJob(ids_for(engine, "x") + [engine.tokenizer.vocab_size + 5], SamplingParams(max_tokens=4))
    with pytest.raises(IndexError):
        batch.admit(bad)
    assert len(batch) == 1 and batch.cache.n == 1
    while len(batch):
        batch.step()
    assert good.text == alone(engine, good.prompt_ids, good.params)
