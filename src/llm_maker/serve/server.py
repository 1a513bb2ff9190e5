"""An OpenAI-compatible chat server and the web chat, over one model directory.

    llm-maker serve runs/demo            # http://127.0.0.1:8000/ (web chat)

    POST /v1/chat/completions   messages, temperature, top_p, max_tokens, stop, seed, stream
                                (server-sent events in OpenAI's chunk format); extensions:
                                top_k, repetition_penalty, rolling_window
    GET  /v1/models             the one model served
    GET  /health                model, context, queue and counters

Requests are checked before any work: malformed JSON, an unknown role, a field of the wrong
JSON type (strictly: "10" is not an integer), a prompt that does not fit the context,
max_tokens over the bound, a body over the size limit, each a 4xx with OpenAI's error body
({"error": {"message", "type", "param", "code"}}). Generation runs on a worker thread
(serve/batching.py) that batches concurrent requests (continuous batching); up to max_batch
running plus max_waiting waiting are admitted, and the rest get 503 with Retry-After at once.
A client that disconnects cancels its generation.
`rolling_window: true` drops the oldest turns instead of refusing a long conversation (the web
chat sets it) and reports how many in the `X-Dropped-Messages` header.
"""
from __future__ import annotations

import asyncio
import json
import os
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Literal, Optional, Union

import torch
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from llm_maker.errors import LLMMakerError
from llm_maker.serve.batching import GenerationWorker, QueueFull
from llm_maker.serve.chat import fit_history
from llm_maker.serve.engine import ChatEngine, Job, SamplingParams
from llm_maker.sft.templates import prompt_ids

WEB_DIR = Path(__file__).parent / "web"
DISCONNECT_POLL_S = 0.1  # how often a non-streaming request checks that its client is still there
RETRY_AFTER_S = 1  # a 503's Retry-After: a row frees as soon as any running reply ends


@dataclass(frozen=True)
class ServeSettings:
    host: str = "127.0.0.1"  # loopback only unless asked: the server has no authentication
    port: int = 8000
    max_batch: int = 8  # requests generating together (continuous batching); 1 runs them one by one
    max_waiting: int = 16  # requests queued behind the running ones; more get 503
    max_tokens_limit: int = 1024  # the largest max_tokens a request may ask for
    default_max_tokens: int = 256  # when a request does not say
    max_body_bytes: int = 1 << 20
    max_context: Optional[int] = None  # tokens a request may hold; None: the model's, capped by KV_CACHE_SHARE

    def validate(self) -> None:
        """Refuse impossible settings before the model is loaded."""
        if not 0 <= self.port <= 65535:
            raise LLMMakerError(f"port must be in [0, 65535], got {self.port}")
        if self.max_context is not None and self.max_context < 2:
            raise LLMMakerError(f"max_context must be at least 2, got {self.max_context}")
        for name in ("max_batch", "max_waiting", "max_tokens_limit", "default_max_tokens", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise LLMMakerError(f"{name} must be at least 1, got {getattr(self, name)}")


class ApiError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# --------------------------------------------------------------------------------------
# The request, as OpenAI's API defines it (plus three extensions)
# --------------------------------------------------------------------------------------
# Strict: each field takes its JSON type only ("10" is not an integer, 1 is not a boolean);
# an integer is still a number, so `temperature: 1` is fine.

class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)  # extra: e.g. OpenAI's optional `name`
    role: Literal["system", "user", "assistant"]
    content: str


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # an unsupported parameter is an error, not ignored
    model: Optional[str] = None
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    seed: Optional[int] = None
    n: int = 1  # one choice only (see _one_choice); an int, not Literal[1], which takes `true`
    user: Optional[str] = None
    presence_penalty: float = 0.0  # accepted at their neutral value only (see _neutral_penalty)
    frequency_penalty: float = 0.0
    top_k: Optional[int] = Field(None, ge=1)  # extension
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)  # extension
    rolling_window: bool = False  # extension: drop the oldest turns to fit the context

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int) -> int:
        if v != 1:
            raise ValueError("Input should be 1 (one choice per request)")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _neutral_penalty(cls, v: float) -> float:
        if v != 0.0:
            raise ValueError("only 0 is supported; use repetition_penalty (an extension) instead")
        return v

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ApiError(400, f"stop must be up to 4 non-empty strings, got {stops!r:.100}", param="stop")
        return tuple(stops)


def validation_message(e: ValidationError) -> tuple[str, Optional[str]]:
    """('messages[1].role: Input should be ...', 'messages[1].role') from pydantic's first error."""
    err = e.errors()[0]
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".") or None
    if err["type"] == "extra_forbidden":
        return f"unsupported parameter {param!r}", param
    msg = err["msg"].removeprefix("Value error, ")
    return f"{param}: {msg}" if param else msg, param


# --------------------------------------------------------------------------------------
# From a request to a job
# --------------------------------------------------------------------------------------

async def read_json(request: Request, limit: int) -> Any:
    """The request body parsed as JSON, refused past `limit` bytes without reading the rest."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {int(declared):,} bytes is over the limit of {limit:,}",
                       code="body_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"request body is over the limit of {limit:,} bytes", code="body_too_large")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"malformed JSON in the request body: {e}", code="invalid_json") from None


def plan_request(engine: ChatEngine, settings: ServeSettings, req: ChatRequest) -> tuple[list[int], int, int]:
    """(prompt ids, max new tokens, messages dropped) for a validated request, or ApiError."""
    if req.model is not None and req.model != engine.name:
        raise ApiError(404, f"model {req.model!r} is not served here; this server serves {engine.name!r}",
                       param="model", code="model_not_found")
    asked = req.max_completion_tokens or req.max_tokens
    if asked is not None and asked > settings.max_tokens_limit:
        raise ApiError(400, f"max_tokens={asked} is over this server's bound of {settings.max_tokens_limit}",
                       param="max_tokens")
    context = engine.context_len
    messages = [m.model_dump(include={"role", "content"}) for m in req.messages]
    dropped = 0
    try:
        if req.rolling_window:
            reply_budget = asked or min(settings.default_max_tokens, context // 2)
            messages, dropped = fit_history(engine.tokenizer, messages, engine.template, context - reply_budget)
        ids = prompt_ids(engine.tokenizer, messages, engine.template)
    except LLMMakerError as e:  # e.g. content that spells a special token
        raise ApiError(400, str(e), param="messages") from None
    max_new = asked if asked is not None else min(settings.default_max_tokens, context - len(ids))
    if len(ids) + max(max_new, 1) > context:
        raise ApiError(400, context_exceeded_message(context, len(ids), asked, req.rolling_window, messages, dropped),
                       param="messages", code="context_length_exceeded")
    return ids, max_new, dropped


def context_exceeded_message(context: int, n_prompt: int, asked: Optional[int], rolling_window: bool,
                             kept: list[dict], dropped: int) -> str:
    """Why a prompt does not fit and what the client can change. With rolling_window set, only the
    last message (and a leading system message) is left, so setting it is not the advice."""
    reply = f"max_tokens asks for {asked} more" if asked is not None else "no room is left for a reply"
    if not rolling_window:
        return (f"this model's maximum context length is {context} tokens, but the messages take {n_prompt} and "
                f"{reply}; shorten the conversation, lower max_tokens or set rolling_window")
    after = (f"even after rolling_window dropped every earlier turn ({dropped} message{'s' * (dropped != 1)}), "
             if dropped else "")
    with_system = len(kept) > 1 and kept[0]["role"] == "system"  # fit_history keeps it
    what = "the system message and the last message take" if with_system else "the last message alone takes"
    shorten = "the system message or the last message" if with_system else "the last message"
    lower = " or lower max_tokens" if asked is not None and n_prompt < context else ""  # when that would help
    return (f"this model's maximum context length is {context} tokens, but {after}{what} {n_prompt} tokens and "
            f"{reply}; shorten {shorten}{lower}")


def sampling_params(req: ChatRequest, max_new: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_new, temperature=req.temperature, top_k=req.top_k,
                          top_p=None if req.top_p >= 1.0 else req.top_p,
                          repetition_penalty=req.repetition_penalty, seed=req.seed, stop=req.stop_strings())


# --------------------------------------------------------------------------------------
# Responses: OpenAI's chat.completion and chat.completion.chunk objects
# --------------------------------------------------------------------------------------

def usage(info: dict[str, Any]) -> dict[str, int]:
    p, c = info["prompt_tokens"], info["completion_tokens"]
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def completion_body(job: Job, model: str, text: str, info: dict[str, Any]) -> dict[str, Any]:
    return {"id": job.id, "object": "chat.completion", "created": job.created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": info["finish_reason"], "logprobs": None}],
            "usage": usage(info)}


def sse_chunk(job: Job, model: str, delta: dict[str, Any], finish_reason: Optional[str] = None,
              usage_: Optional[dict[str, int]] = None, choices: bool = True) -> str:
    chunk: dict[str, Any] = {"id": job.id, "object": "chat.completion.chunk", "created": job.created, "model": model,
                             "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                                          "logprobs": None}] if choices else []}
    if usage_ is not None:
        chunk["usage"] = usage_
    return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"


async def stream_events(job: Job, model: str, include_usage: bool) -> AsyncIterator[str]:
    """SSE lines for a job; leaving early (the client disconnected) cancels the generation."""
    try:
        yield sse_chunk(job, model, {"role": "assistant", "content": ""})
        async for kind, value in job.stream():
            if kind == "text":
                yield sse_chunk(job, model, {"content": value})
            elif kind == "error":
                yield f"data: {json.dumps(ApiError(500, value, kind='server_error').body())}\n\n"
                return
            else:
                yield sse_chunk(job, model, {}, finish_reason=value["finish_reason"])
                if include_usage:
                    yield sse_chunk(job, model, {}, usage_=usage(value), choices=False)
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()  # a no-op after "done"; otherwise the worker stops at the next token


async def watch_disconnect(request: Request, job: Job) -> None:
    """Cancel `job` as soon as its client goes away (polled: a plain request has no other signal)."""
    while not job.cancelled.is_set():
        if await request.is_disconnected():
            job.cancel()
            return
        await asyncio.sleep(DISCONNECT_POLL_S)


async def collect(job: Job, request: Request) -> tuple[str, dict[str, Any]]:
    """The whole reply of a non-streaming request; cancelled if the client goes away."""
    watcher = asyncio.create_task(watch_disconnect(request, job))
    pieces: list[str] = []
    info: dict[str, Any] = {}
    try:
        async for kind, value in job.stream():
            if kind == "text":
                pieces.append(value)
            elif kind == "error":
                raise ApiError(500, value, kind="server_error")
            else:
                info = value
        return "".join(pieces), info
    finally:
        job.cancel()
        watcher.cancel()


# --------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------

def create_app(engine: ChatEngine, settings: ServeSettings = ServeSettings()) -> FastAPI:
    """The FastAPI app serving `engine`; its worker thread starts and stops with the app."""
    worker = GenerationWorker(engine, max_batch=settings.max_batch, max_waiting=settings.max_waiting)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            worker.stop()

    app = FastAPI(title="llm-maker", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine, app.state.worker, app.state.settings = engine, worker, settings

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        headers = {"Retry-After": str(RETRY_AFTER_S)} if e.status == 503 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": engine.name, "stage": engine.stage, "template": engine.template,
                "precision": engine.precision, "device": str(engine.model.embed_tokens.weight.device),
                "parameters": engine.model.num_parameters(), "context_length": engine.context_len,
                "trained_context_length": engine.rope.trained_len if engine.rope else engine.context_len,
                "rope_scaling": engine.rope.factor if engine.rope else None,
                "max_tokens_limit": settings.max_tokens_limit, "busy": worker.busy, "running": worker.running,
                "max_batch": settings.max_batch, "peak_batch": worker.peak_batch, "waiting": worker.waiting,
                "max_waiting": settings.max_waiting, "rejected": worker.rejected, "failed": worker.failed,
                **engine.stats}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "owned_by": "llm-maker",
                                            "created": int(engine.model_dir.stat().st_mtime),
                                            "context_length": engine.context_len}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        raw = await read_json(request, settings.max_body_bytes)
        try:
            req = ChatRequest.model_validate(raw)
        except ValidationError as e:
            message, param = validation_message(e)
            raise ApiError(400, message, param=param) from None
        ids, max_new, dropped = plan_request(engine, settings, req)
        job = Job(ids, sampling_params(req, max_new), asyncio.get_running_loop())
        try:
            worker.submit(job)
        except QueueFull as e:
            raise ApiError(503, str(e), code="server_busy", kind="server_error") from None
        headers = {"X-Dropped-Messages": str(dropped)}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(stream_events(job, engine.name, include_usage), media_type="text/event-stream",
                                     headers={**headers, "Cache-Control": "no-cache"})
        text, info = await collect(job, request)
        return JSONResponse(completion_body(job, engine.name, text, info), headers=headers)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html")

    app.mount("/web", StaticFiles(directory=WEB_DIR), name="web")
    return app


KV_CACHE_SHARE = 0.25  # the most of the free RAM (or VRAM) the batch's KV cache may take unless --max-context says


def free_memory_bytes(device: torch.device) -> Optional[int]:
    """What the device has free now: VRAM on CUDA, available RAM on Linux; None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def choose_context(engine: ChatEngine, max_batch: int, asked: Optional[int],
                   free: Optional[int] = None) -> tuple[int, str]:
    """(the context to serve, why): `asked` (--max-context, at most the model's), else the model's
    whole context, shortened when its KV cache for `max_batch` rows would take more than
    KV_CACHE_SHARE of `free` memory (default: the device's, now)."""
    cfg, full = engine.model.config, engine.model.context_len
    elem = engine.model.embed_tokens.weight.element_size()  # the cache is in the weights' dtype
    per_token = 2 * cfg.n_layers * max_batch * cfg.n_kv_heads * cfg.head_dim * elem  # keys and values
    if asked is not None:
        if asked > full:
            raise LLMMakerError(f"--max-context {asked} is more than the model's {full}-token context"
                                " (--rope-scaling stretches it)")
        return asked, "--max-context"
    free = free if free is not None else free_memory_bytes(engine.model.embed_tokens.weight.device)
    if free is None or per_token * full <= KV_CACHE_SHARE * free:
        return full, "the model's context"
    fit = max(2, int(KV_CACHE_SHARE * free // per_token))
    return fit, (f"a full {full}-token context for {max_batch} rows would take {per_token * full / 2**30:.1f} GB "
                 f"of KV cache, over {KV_CACHE_SHARE:.0%} of the {free / 2**30:.1f} GB free; --max-context to choose")


def serve(model_dir: str | Path, settings: ServeSettings = ServeSettings(), rope_scaling: Optional[float] = None,
          name: Optional[str] = None, device: str = "auto", precision: str = "auto") -> None:
    """Load the model and serve it with uvicorn until interrupted."""
    import uvicorn

    settings.validate()
    engine = ChatEngine.load(model_dir, name=name, rope_scaling=rope_scaling, device=device,
                             precision=precision)
    engine.max_context, why = choose_context(engine, settings.max_batch, settings.max_context)
    print(f"context: {engine.context_len} tokens a request ({why})", flush=True)
    app = create_app(engine, settings)  # allocates the batch's KV cache now, not at the first request
    cache = app.state.worker.batch.cache
    cache_mb = (cache.k.nbytes + cache.v.nbytes) / 2**20
    print(f"Serving {engine.name} ({engine.model.num_parameters():,} parameters, {engine.context_len}-token "
          f"context, {engine.precision}, up to {settings.max_batch} requests at once: "
          f"{cache_mb:,.0f} MB of KV cache) on "
          f"http://{settings.host}:{settings.port}/  (OpenAI API at /v1)", flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")
