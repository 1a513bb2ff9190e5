"""serve/server.py + serve/engine.py + serve/batching.py: the OpenAI-compatible API over a real
uvicorn server on a free loopback port, with tiny models whose answers are known in advance."""
from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from typing import Any

import pytest

pytestmark = pytest.mark.slow  # a live uvicorn server per module, many concurrent clients
pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn) is not installed")

from helpers import REPLY, make_tokenizer, random_model, running_server, save_chat_model, scripted_model  # noqa: E402
from llm_maker.errors import LLMMakerError  # noqa: E402
from llm_maker.serve.engine import StopText  # noqa: E402
from llm_maker.serve.generate import generate  # noqa: E402
from llm_maker.serve.server import ServeSettings, create_app  # noqa: E402
from llm_maker.sft.templates import prompt_ids  # noqa: E402


def connect(url: str, timeout: float = 60) -> http.client.HTTPConnection:
    host, port = url.removeprefix("http://").split(":")
    return http.client.HTTPConnection(host, int(port), timeout=timeout)


def call(url: str, method: str, path: str, body: Any = None) -> tuple[int, dict, Any]:
    """(status, headers, parsed JSON or text) of one request; a dict body is sent as JSON."""
    conn = connect(url)
    data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    raw = r.read().decode()
    headers = {k.lower(): v for k, v in r.getheaders()}
    conn.close()
    return r.status, headers, json.loads(raw) if headers.get("content-type", "").startswith("application/json") else raw


def sse_data(raw: str) -> list[Any]:
    """The `data:` payloads of a server-sent event stream, JSON-parsed ([DONE] kept as text)."""
    out = []
    for event in raw.split("\n\n"):
        for line in event.splitlines():
            if line.startswith("data: "):
                payload = line[6:]
                out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def wait_for(predicate, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


# --------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def scripted(tok, tmp_path_factory):
    engine = save_chat_model(scripted_model(tok, REPLY), tok, tmp_path_factory.mktemp("scripted") / "model")
    with running_server(create_app(engine, ServeSettings(max_tokens_limit=200))) as url:
        yield url, engine


@pytest.fixture(scope="module")
def endless(tok, tmp_path_factory):
    """Never emits a stop token; a long context, so a generation can run for a while."""
    model = scripted_model(tok, " the", seq_len=2048, stop=False)
    engine = save_chat_model(model, tok, tmp_path_factory.mktemp("endless") / "model", name="endless")
    with running_server(create_app(engine, ServeSettings(max_tokens_limit=2000))) as url:
        yield url, engine


# --------------------------------------------------------------------------------------
# Pure pieces
# --------------------------------------------------------------------------------------

def test_stop_text_cuts_at_the_first_stop_and_never_shows_a_partial_one():
    s = StopText(["END", "xy"])
    assert [s.feed(p) for p in ["ab", "cE", "N", "Dzz"]] == ["ab", "c", "", ""]
    assert s.hit and s.flush() == ""
    s = StopText(["aab"])
    assert [s.feed(p) for p in ["a", "a", "a", "c"]] == ["", "", "a", "aac"]
    s = StopText(["END"])
    assert s.feed("xE") == "x" and not s.hit and s.flush() == "E"  # an unfinished stop is shown at the end


# --------------------------------------------------------------------------------------
# The API
# --------------------------------------------------------------------------------------

def test_health_and_models(scripted):
    url, engine = scripted
    status, _, health = call(url, "GET", "/health")
    assert status == 200
    assert health["model"] == "test-sft" and health["context_length"] == 64 and health["template"] == "chatml"
    assert health["parameters"] == engine.model.num_parameters()
    status, _, models = call(url, "GET", "/v1/models")
    assert status == 200 and [m["id"] for m in models["data"]] == ["test-sft"]


def test_completion_is_the_models_answer_with_usage(scripted, tok):
    url, _ = scripted
    status, headers, body = call(url, "POST", "/v1/chat/completions", {"messages": user("Hi there"), "temperature": 0})
    assert status == 200, body
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": REPLY} and choice["finish_reason"] == "stop"
    n_prompt = len(prompt_ids(tok, user("Hi there"), "chatml"))
    n_reply = len(tok.encode(REPLY))
    assert body["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": n_reply,
                             "total_tokens": n_prompt + n_reply}
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert headers["x-dropped-messages"] == "0"


def test_streaming_sends_openai_chunks_then_done(scripted, tok):
    url, _ = scripted
    status, headers, raw = call(url, "POST", "/v1/chat/completions",
                                {"messages": user("Hi"), "stream": True, "temperature": 0,
                                 "stream_options": {"include_usage": True}})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = sse_data(raw)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    pieces = [c["choices"][0]["delta"].get("content") for c in chunks[1:] if c["choices"]]
    assert "".join(p for p in pieces if p) == REPLY
    assert len([p for p in pieces if p]) == len(tok.encode(REPLY))  # one chunk per token: it streams
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == len(tok.encode(REPLY))


def test_stop_strings_and_max_tokens_end_a_reply(scripted):
    url, _ = scripted
    _, _, body = call(url, "POST", "/v1/chat/completions", {"messages": user("Hi"), "stop": [" of"], "temperature": 0})
    assert body["choices"][0]["message"]["content"] == " The class" and body["choices"][0]["finish_reason"] == "stop"
    _, _, body = call(url, "POST", "/v1/chat/completions", {"messages": user("Hi"), "max_tokens": 2, "temperature": 0})
    assert body["choices"][0]["message"]["content"] == " The"
    assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("body,status,param,message", [
    (b'{"messages": [', 400, None, "malformed JSON in the request body"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role",
     "messages[0].role: Input should be 'system', 'user' or 'assistant'"),
    ({"messages": []}, 400, "messages", "messages: List should have at least 1 item"),
    ({"messages": [{"role": "user"}]}, 400, "messages[0].content", "messages[0].content: Field required"),
    ({"messages": user("hi"), "max_tokens": 201}, 400, "max_tokens",
     "max_tokens=201 is over this server's bound of 200"),
    ({"messages": user("word " * 80)}, 400, "messages", "this model's maximum context length is 64 tokens"),
    ({"messages": user("hi"), "max_tokens": 60}, 400, "messages", "max_tokens asks for 60 more"),
    ({"messages": user("hi"), "temperature": 3}, 400, "temperature",
     "temperature: Input should be less than or equal to 2"),
    ({"messages": user("hi"), "logit_bias": {}}, 400, "logit_bias", "unsupported parameter 'logit_bias'"),
    ({"messages": user("hi"), "n": 2}, 400, "n", "n: Input should be 1"),
    # Strict types: a string is not a number, a number is not a boolean.
    ({"messages": user("hi"), "max_tokens": "10"}, 400, "max_tokens", "max_tokens: Input should be a valid integer"),
    ({"messages": user("hi"), "seed": "7"}, 400, "seed", "seed: Input should be a valid integer"),
    ({"messages": user("hi"), "n": True}, 400, "n", "n: Input should be a valid integer"),
    ({"messages": user("hi"), "temperature": "0.5"}, 400, "temperature", "temperature: Input should be a valid number"),
    ({"messages": user("hi"), "top_p": "0.9"}, 400, "top_p", "top_p: Input should be a valid number"),
    ({"messages": user("hi"), "stream": 1}, 400, "stream", "stream: Input should be a valid boolean"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content",
     "messages[0].content: Input should be a valid string"),
    ({"messages": user("hi"), "stop": ["a", "b", "c", "d", "e"]}, 400, "stop",
     "stop must be up to 4 non-empty strings"),
    ({"messages": user("close <|im_end|> it")}, 400, "messages", "contains the special token <|im_end|>"),
    ({"model": "gpt-4o", "messages": user("hi")}, 404, "model", "model 'gpt-4o' is not served here"),
    (b"[" + b" " * (1 << 20) + b"]", 413, None, "request body of 1,048,578 bytes is over the limit of 1,048,576"),
])
def test_bad_requests_get_a_clear_4xx_in_openais_error_format(scripted, body, status, param, message):
    url, _ = scripted
    got, _, answer = call(url, "POST", "/v1/chat/completions", body)
    assert got == status, answer
    assert answer["error"]["param"] == param
    assert message in answer["error"]["message"]


def test_integers_are_accepted_where_numbers_are_expected(scripted):
    url, _ = scripted
    status, _, body = call(url, "POST", "/v1/chat/completions",
                           {"messages": user("Hi"), "temperature": 0, "top_p": 1, "repetition_penalty": 1})
    assert status == 200 and body["choices"][0]["message"]["content"] == REPLY
    status, _, body = call(url, "POST", "/v1/chat/completions",
                           {"messages": user("Hi"), "temperature": 1, "seed": 3, "max_tokens": 4})
    assert status == 200, body


def test_rolling_window_drops_the_oldest_turns_and_says_how_many(scripted):
    url, _ = scripted
    history = []
    for i in range(4):
        history += [{"role": "user", "content": f"question number {i} about lists"},
                    {"role": "assistant", "content": REPLY}]
    messages = history + user("last one")
    status, _, body = call(url, "POST", "/v1/chat/completions", {"messages": messages, "max_tokens": 10})
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    status, headers, body = call(url, "POST", "/v1/chat/completions",
                                 {"messages": messages, "max_tokens": 10, "rolling_window": True, "temperature": 0})
    assert status == 200 and body["choices"][0]["message"]["content"] == REPLY
    dropped = int(headers["x-dropped-messages"])
    assert dropped > 0 and dropped % 2 == 0  # whole user/assistant pairs
    assert body["usage"]["prompt_tokens"] + 10 <= 64


def test_a_last_message_too_long_for_the_rolling_window_says_what_to_change(scripted, tok):
    url, _ = scripted
    history = [{"role": "user", "content": "an earlier question"}, {"role": "assistant", "content": REPLY}]
    too_long = "word " * 80
    n_long = len(prompt_ids(tok, user(too_long), "chatml"))
    assert n_long > 64
    status, _, body = call(url, "POST", "/v1/chat/completions",
                           {"messages": history + user(too_long), "max_tokens": 10, "rolling_window": True})
    assert status == 400 and body["error"]["code"] == "context_length_exceeded", body
    assert body["error"]["message"] == (
        f"this model's maximum context length is 64 tokens, but even after rolling_window dropped every earlier turn "
        f"(2 messages), the last message alone takes {n_long} tokens and max_tokens asks for 10 more; "
        f"shorten the last message")  # lowering max_tokens would not help: the prompt alone is over
    # A last message that fits on its own, but not with the reply asked for.
    long = "word " * 10
    n = len(prompt_ids(tok, user(long), "chatml"))
    assert 30 < n < 60
    asked = 64 - n + 5
    status, _, body = call(url, "POST", "/v1/chat/completions",
                           {"messages": user(long), "max_tokens": asked, "rolling_window": True})
    assert status == 400 and body["error"]["message"] == (
        f"this model's maximum context length is 64 tokens, but the last message alone takes {n} tokens and "
        f"max_tokens asks for {asked} more; shorten the last message or lower max_tokens")
    system = [{"role": "system", "content": "Be brief."}]
    status, _, body = call(url, "POST", "/v1/chat/completions",
                           {"messages": system + history + user(too_long), "rolling_window": True})
    message = body["error"]["message"]
    assert status == 400 and "the system message and the last message take" in message
    assert "no room is left for a reply" in message and "rolling_window" in message
    assert message.endswith("shorten the system message or the last message")


def test_seeded_sampling_is_reproducible_through_the_api(tok, tmp_path):
    engine = save_chat_model(random_model(tok.vocab_size, std=0.02), tok, tmp_path / "m")  # flat: samples vary
    with running_server(create_app(engine)) as url:
        def sample(seed):
            body = {"messages": user("Hello"), "temperature": 1.0, "seed": seed, "max_tokens": 12}
            return call(url, "POST", "/v1/chat/completions", body)[2]["choices"][0]["message"]["content"]
        assert sample(1) == sample(1)
        assert sample(1) != sample(2)


def test_the_official_openai_client_works_unchanged(scripted):
    openai = pytest.importorskip("openai")
    url, _ = scripted
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="not-needed", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list()] == ["test-sft"]
    reply = client.chat.completions.create(model="test-sft", messages=user("Hello"), temperature=0, max_tokens=20)
    assert reply.choices[0].message.content == REPLY and reply.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(model="test-sft", messages=user("Hello"), temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == REPLY
    with pytest.raises(openai.BadRequestError, match="maximum context length is 64 tokens"):
        client.chat.completions.create(model="test-sft", messages=user("word " * 80))
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.chat.completions.create(model="other", messages=user("hi"))


# --------------------------------------------------------------------------------------
# Concurrency: the worker thread, the bounded queue, disconnects
# --------------------------------------------------------------------------------------

def test_a_full_queue_answers_503(tok, tmp_path):
    engine = save_chat_model(scripted_model(tok, REPLY), tok, tmp_path / "m")
    gate = threading.Event()
    app = create_app(engine, ServeSettings(max_batch=1, max_waiting=1))
    batch = app.state.worker.batch
    real_admit = batch.admit
    batch.admit = lambda job: (gate.wait(30), real_admit(job))  # hold the worker busy until released
    with running_server(app) as url:
        results = {}
        def request(name):
            results[name] = call(url, "POST", "/v1/chat/completions", {"messages": user(name), "temperature": 0})
        first = threading.Thread(target=request, args=("first",))
        first.start()
        wait_for(lambda: app.state.worker.busy)
        second = threading.Thread(target=request, args=("second",))
        second.start()
        wait_for(lambda: app.state.worker.waiting == 1)
        status, headers, body = call(url, "POST", "/v1/chat/completions", {"messages": user("third")})
        assert status == 503 and headers["retry-after"] == "1"
        assert body["error"]["code"] == "server_busy"
        assert "1 requests are running and 1 are already waiting" in body["error"]["message"]
        gate.set()
        first.join(30)
        second.join(30)
        assert [results[n][0] for n in ("first", "second")] == [200, 200]
        assert call(url, "GET", "/health")[2]["rejected"] == 1


def test_a_burst_is_admitted_up_to_max_batch_plus_max_waiting_while_the_worker_prefills(tok, tmp_path):
    """32 streaming requests arrive while the worker is held in its first prefill: the one being
    prefilled counts as running, so 8 + 16 are admitted (and answered in full), 8 get 503."""
    engine = save_chat_model(scripted_model(tok, REPLY), tok, tmp_path / "m")
    app = create_app(engine, ServeSettings(max_batch=8, max_waiting=16))
    worker = app.state.worker
    gate = threading.Event()
    real_admit = worker.batch.admit
    worker.batch.admit = lambda job: (gate.wait(30), real_admit(job))  # the first prefill waits for the burst
    with running_server(app) as url:
        results: dict[int, Any] = {}
        def client(i):
            try:
                results[i] = call(url, "POST", "/v1/chat/completions",
                                  {"messages": user(f"request {i}"), "stream": True, "temperature": 0})
            except Exception as e:  # reported below
                results[i] = e
        threads = [threading.Thread(target=client, args=(i,)) for i in range(32)]
        for t in threads:
            t.start()
        wait_for(lambda: worker.rejected == 8 and worker.running + worker.waiting == 24)
        assert worker.running == 1 and worker.waiting == 23  # the prefill being held is running
        gate.set()
        for t in threads:
            t.join(60)
        assert all(not t.is_alive() for t in threads)
        assert not [r for r in results.values() if isinstance(r, Exception)]
        admitted = [r for r in results.values() if r[0] == 200]
        refused = [r for r in results.values() if r[0] == 503]
        assert len(admitted) == 24 and len(refused) == 8
        for _, _, raw in admitted:
            events = sse_data(raw)
            assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "stop"
            assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == REPLY
        for _, headers, body in refused:
            assert headers["retry-after"].isdigit() and int(headers["retry-after"]) >= 1
            assert body["error"]["code"] == "server_busy" and body["error"]["type"] == "server_error"
            assert "8 requests are running and 16 are already waiting" in body["error"]["message"]
        wait_for(lambda: worker.running == 0 and worker.waiting == 0)  # the worker has counted them out
        health = call(url, "GET", "/health")[2]
        assert health["completed"] == 24 and health["rejected"] == 8 and health["failed"] == 0
        assert health["peak_batch"] == 8
        # Every place is free again.
        assert call(url, "POST", "/v1/chat/completions", {"messages": user("after"), "temperature": 0})[0] == 200


def test_a_client_that_disconnects_mid_stream_cancels_its_generation(endless):
    url, engine = endless
    before = dict(engine.stats)
    conn = connect(url)
    body = {"messages": user("go"), "stream": True, "max_tokens": 2000, "temperature": 0}
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    seen = b""
    while b'"content": " the"' not in seen:  # the first real token has streamed
        seen += response.fp.readline()
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    wait_for(lambda: engine.stats["cancelled"] == before["cancelled"] + 1)
    generated = engine.stats["completion_tokens"] - before["completion_tokens"]
    assert 1 <= generated < 2000
    # The worker is free again: the next request is answered.
    status, _, answer = call(url, "POST", "/v1/chat/completions", {"messages": user("hi"), "max_tokens": 3,
                                                                    "temperature": 0})
    assert status == 200 and answer["choices"][0]["message"]["content"] == " the the the"


def test_a_client_that_disconnects_while_waiting_for_a_whole_reply_cancels_it(endless):
    url, engine = endless
    before = dict(engine.stats)
    conn = connect(url)
    body = {"messages": user("go"), "max_tokens": 2000, "temperature": 0}
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    wait_for(lambda: engine.stats["completion_tokens"] > before["completion_tokens"]
             or call(url, "GET", "/health")[2]["busy"])
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    wait_for(lambda: engine.stats["cancelled"] == before["cancelled"] + 1)
    assert engine.stats["completion_tokens"] - before["completion_tokens"] < 2000


# --------------------------------------------------------------------------------------
# Load: 8 concurrent streaming clients, each with its own deterministic answer
# --------------------------------------------------------------------------------------

N_CLIENTS = 8


def stream_reply(url: str, body: dict, timeout_s: float) -> tuple[str, float]:
    """(streamed text, seconds to the first content chunk)."""
    start = time.monotonic()
    conn = connect(url, timeout=timeout_s)
    conn.request("POST", "/v1/chat/completions", body=json.dumps({**body, "stream": True}),
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200, response.read()
    text, first = "", None
    for event in sse_data(response.read().decode()):
        if event == "[DONE]":
            break
        assert "error" not in event, event
        piece = event["choices"][0]["delta"].get("content") if event["choices"] else None
        if piece:
            first = first if first is not None else time.monotonic() - start
            text += piece
    conn.close()
    return text, first


def test_eight_concurrent_streaming_clients_get_their_own_answers(tok, tmp_path):
    engine = save_chat_model(random_model(tok.vocab_size, seed=3), tok, tmp_path / "m")  # attention matters
    prompts = [f"Client {i} asks about {word}" for i, word in enumerate(
        ["lists", "tuples", "classes", "modules", "strings", "numbers", "files", "threads"])]
    expected = []
    for p in prompts:  # the same engine, called directly: what each client must receive
        ids = prompt_ids(tok, user(p), "chatml")
        expected.append(tok.decode([t for t in generate(engine.model, ids, 16) if t not in engine.special_ids]))
    assert len(set(expected)) == N_CLIENTS  # distinct answers: a crossed stream would show
    app = create_app(engine, ServeSettings(max_batch=N_CLIENTS))
    worker = app.state.worker
    gate = threading.Event()
    real_admit = worker.batch.admit
    worker.batch.admit = lambda job: (gate.wait(30), real_admit(job))  # the first waits for the others
    with running_server(app) as url:
        results: dict[int, Any] = {}
        def client(i):
            try:
                results[i] = stream_reply(url, {"messages": user(prompts[i]), "max_tokens": 16, "temperature": 0}, 60)
            except Exception as e:  # reported below
                results[i] = e
        threads = [threading.Thread(target=client, args=(i,)) for i in range(N_CLIENTS)]
        for t in threads:
            t.start()
        wait_for(lambda: worker.waiting == N_CLIENTS - 1)  # one is being admitted, the rest queue
        gate.set()
        for t in threads:
            t.join(90)
        assert all(not t.is_alive() for t in threads)
        for i in range(N_CLIENTS):
            assert not isinstance(results[i], Exception), results[i]
            assert results[i][0] == expected[i], f"client {i} got another stream"
        health = call(url, "GET", "/health")[2]
        assert health["failed"] == 0 and health["rejected"] == 0 and health["completed"] == N_CLIENTS
        assert health["peak_batch"] == N_CLIENTS  # all eight decoded together, each on its own row


def test_serve_context_is_capped_by_the_memory_the_kv_cache_would_take(tmp_path):
    from llm_maker.serve.server import KV_CACHE_SHARE, choose_context

    tok = make_tokenizer()
    engine = save_chat_model(random_model(tok.vocab_size), tok, tmp_path / "m")
    full = engine.model.context_len
    cfg = engine.model.config
    per_token = 2 * cfg.n_layers * 8 * cfg.n_kv_heads * cfg.head_dim * 4  # 8 rows, fp32 keys and values
    assert choose_context(engine, 8, None, free=10**12) == (full, "the model's context")
    ctx, why = choose_context(engine, 8, None, free=int(per_token * full / 2 / KV_CACHE_SHARE))
    assert ctx == full // 2 and "over 25% of the" in why and "--max-context" in why
    assert choose_context(engine, 8, 16) == (16, "--max-context")
    with pytest.raises(LLMMakerError, match=f"--max-context {full + 1} is more than the model's {full}-token"):
        choose_context(engine, 8, full + 1)
    engine.max_context = 16
    assert engine.context_len == 16
