"""An OpenAI-compatible HTTP server over one loaded Dovetail engine.

One worker thread owns the engine and serves jobs from a bounded FIFO queue;
the event loop never waits on the engine, and tokenizing and template
rendering happen off the worker. A request past the queue's bound gets a 429
at once. A client that goes away is dropped from the queue, or frees the engine
at the next round of its generation. Errors come back in OpenAI's error shape,
as a final event once a stream has started, and never take the server down.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .api import Dovetail
from .errors import DovetailError, InvalidArgumentError

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 4 * 2**20  # a request body larger than this gets a 413
MAX_STOPS = 4  # as OpenAI's API
MAX_STOP_CHARS = 256
DEFAULT_MAX_QUEUE = 64


# ---------------------------------------------------------------------- request shapes
class TextPart(BaseModel):
    """One element of OpenAI's content-part array; only text parts are accepted."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class _TextContent(BaseModel):
    """A ``content`` field in OpenAI's shape: a string or an array of text parts."""

    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class Prediction(_TextContent):
    """OpenAI's Predicted Outputs: ``{"type": "content", "content": str | [text parts]}``."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["content"]


class ChatMessage(_TextContent):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # unknown OpenAI fields are accepted and ignored
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None  # negative: a random seed, as in OpenAI's API and llama.cpp
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = 1
    prediction: Prediction | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int) -> int:
        if v != 1:
            raise ValueError("only n = 1 is supported")
        return v

    @field_validator("stop")
    @classmethod
    def _bounded_stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop strings are at most {MAX_STOP_CHARS} characters")
        return v


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] = Field(min_length=1)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], str):
            if len(v) != 1:
                raise ValueError("one prompt per request (a list of several strings would need n > 1)")
            v = v[0]
        if isinstance(v, str) and not v:
            raise ValueError("the prompt is empty")
        return v


def _error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
           headers: dict | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, headers=headers,
                        content={"error": {"message": message, "type": kind, "param": None, "code": code}})


# ---------------------------------------------------------------------- the engine worker
class QueueFullError(DovetailError):
    """The request queue is at its bound; try again later."""


@dataclass
class Job:
    """One generation request: prompt tokens and options in, events out (on the event loop's queue).

    Events: ("piece", str), ("done", GenerationResult), ("error", DovetailError | Exception).
    """

    tokens: list[int]
    options: dict
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def send(self, kind: str, value) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening any more
            self.cancelled.set()


class EngineWorker:
    """The one thread that runs generations, in FIFO order, with at most ``max_queue`` waiting."""

    def __init__(self, dt: Dovetail, max_queue: int = DEFAULT_MAX_QUEUE):
        self.dt = dt
        self.max_queue = max_queue
        self._waiting: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._busy = False
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="dovetail-engine", daemon=True)
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def busy(self) -> bool:
        return self._busy

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopping:
                raise QueueFullError("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(f"{len(self._waiting)} requests are waiting (the bound is {self.max_queue}); retry later")
            self._waiting.append(job)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """Drop ``job`` from the queue, or stop its generation at the next round."""
        job.cancelled.set()
        with self._cond:
            try:
                self._waiting.remove(job)
            except ValueError:
                pass

    def stop(self) -> None:
        """Cancel everything; the worker ends after the current round."""
        with self._cond:
            self._stopping = True
            for job in self._waiting:
                job.cancelled.set()
            self._waiting.clear()
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._stopping:
                    self._cond.wait()
                if self._stopping and not self._waiting:
                    return
                job = self._waiting.popleft()
                self._busy = True
            try:
                self._serve(job)
            finally:
                self._busy = False

    def _serve(self, job: Job) -> None:
        if job.cancelled.is_set():
            return
        try:
            stream = self.dt.stream_tokens(job.tokens, **job.options)
            for piece in stream:
                if job.cancelled.is_set():
                    break
                job.send("piece", piece)
            stream.close()  # also frees the engine after a cancel
            if not job.cancelled.is_set():
                job.send("done", stream.result)
        except DovetailError as e:
            job.send("error", e)
        except Exception as e:  # noqa: BLE001 - a bug must not kill the worker; the client gets a 500 event
            log.exception("generation failed")
            job.send("error", e)


# ---------------------------------------------------------------------- the app
def create_app(dt: Dovetail, model_name: str, api_key: str | None = None, default_max_tokens: int = 512,
               max_queue: int = DEFAULT_MAX_QUEUE) -> FastAPI:
    """The FastAPI app; its engine worker starts now and stops when the app shuts down."""
    if api_key is not None and not api_key:
        raise InvalidArgumentError("the API key is empty; give a non-empty key or none")
    worker = EngineWorker(dt, max_queue)
    app = FastAPI(title="dovetail-gguf", version="0.1.0",
                  description="OpenAI-compatible API over Dovetail speculative decoding (GGUF target on the CPU).")
    app.state.worker = worker
    app.router.on_shutdown.append(worker.stop)
    _install_handlers(app)

    app.add_middleware(_BodyLimit, limit=MAX_BODY_BYTES)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        auth = request.headers.get("authorization", "")
        token = auth[7:] if auth.lower().startswith("bearer ") else ""
        if not secrets.compare_digest(token.encode(), api_key.encode()):
            raise StarletteHTTPException(401, "invalid or missing API key")

    def options(req: _Sampling) -> dict:
        max_tokens = min(req.max_tokens or default_max_tokens, dt.target.n_ctx)  # capped at the context
        return dict(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, seed=req.seed, stop=req.stop,
                    prediction=req.prediction.text() if req.prediction is not None else None)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_name, "draft": dt.drafter is not None,
                "queue_depth": worker.queue_depth, "busy": worker.busy, "max_queue": worker.max_queue}

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "local"}]}

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat(req: ChatRequest, request: Request) -> Any:
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        tokens = await run_in_threadpool(dt.chat_prompt_tokens, messages)
        return await _respond(worker, request, req, tokens, options(req), model_name, chat=True)

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(req: CompletionRequest, request: Request) -> Any:
        if isinstance(req.prompt, str):
            tokens = await run_in_threadpool(dt.tokenize_prompt, req.prompt)
        else:
            tokens = list(req.prompt)
            if min(tokens) < 0 or max(tokens) >= dt.target.n_vocab:
                raise InvalidArgumentError(f"prompt token ids must be in 0..{dt.target.n_vocab - 1}")
        return await _respond(worker, request, req, tokens, options(req), model_name, chat=False)

    return app


class _BodyLimit:
    """Refuses a request body over ``limit`` bytes with a 413 (a plain ASGI layer: it leaves the
    disconnect detection of the routes intact)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await _error(413, f"the request body is larger than {self.limit} bytes")(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await _error(413, f"the request body is larger than {self.limit} bytes")(scope, receive, send)


class _TooLarge(Exception):
    pass


def _install_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        msg = str(first.get("msg", "invalid request")).encode("utf-8", "replace").decode()
        return _error(400, f"{where}: {msg}" if where else msg)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = "authentication_error" if exc.status_code == 401 else "invalid_request_error"
        return _error(exc.status_code, str(exc.detail), kind)

    @app.exception_handler(QueueFullError)
    async def _full(request: Request, exc: QueueFullError):
        return _error(429, str(exc), "rate_limit_error", headers={"Retry-After": "2"})

    @app.exception_handler(DovetailError)
    async def _dovetail(request: Request, exc: DovetailError):
        return _error(400, str(exc))


def _finish(result) -> str:
    return "length" if result.finish_reason == "context_full" else result.finish_reason


def _usage(result) -> dict:
    s = result.stats
    return {"prompt_tokens": s.n_prompt_tokens, "completion_tokens": s.n_tokens, "total_tokens": s.n_prompt_tokens + s.n_tokens,
            "completion_tokens_details": {"accepted_prediction_tokens": s.accepted_prediction_tokens,
                                          "rejected_prediction_tokens": s.rejected_prediction_tokens}}


def _extension(result) -> dict:
    s = result.stats
    return {"tau": s.mean_accepted_tokens, "tokens_per_second": s.tokens_per_second, "rounds": s.rounds}


def _error_body(e: BaseException) -> dict:
    if isinstance(e, DovetailError):
        return {"error": {"message": str(e), "type": "invalid_request_error", "param": None, "code": None}}
    return {"error": {"message": "internal error in generation", "type": "server_error", "param": None, "code": None}}


class _Shape:
    """The OpenAI response shapes of one request: chat or text completion, whole or as chunks."""

    def __init__(self, model_name: str, chat: bool):
        self.chat, self.model = chat, model_name
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def body(self, choice: dict, streaming: bool, result=None) -> dict:
        obj = ("chat.completion.chunk" if streaming else "chat.completion") if self.chat else "text_completion"
        out = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [choice]}
        if result is not None:
            out["usage"], out["dovetail"] = _usage(result), _extension(result)
        return out

    def whole(self, result) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": result.text}, "finish_reason": _finish(result)}
        else:
            choice = {"index": 0, "text": result.text, "finish_reason": _finish(result), "logprobs": None}
        return self.body(choice, False, result)

    def chunk(self, text: str, reason: str | None, first: bool, result=None) -> dict:
        if self.chat:
            delta = {"content": text} if text or reason is None else {}
            if first:
                delta["role"] = "assistant"
            choice = {"index": 0, "delta": delta, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
        return self.body(choice, True, result)


async def _respond(worker: EngineWorker, request: Request, req: _Sampling, tokens: list[int], opts: dict,
                   model_name: str, chat: bool) -> Any:
    worker.dt.engine.check_prompt(tokens)  # a prompt that cannot fit is a 400 now, not an event later
    worker.dt.options(**opts)  # so are bad sampling settings
    job = Job(tokens, opts, asyncio.get_running_loop())
    worker.submit(job)  # QueueFullError -> 429
    shape = _Shape(model_name, chat)
    if req.stream:
        return StreamingResponse(_events(worker, job, shape), media_type="text/event-stream")
    try:
        checked = time.monotonic()
        while True:
            try:
                kind, value = await asyncio.wait_for(job.events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                kind = None
            if time.monotonic() - checked > 0.5:  # pieces keep coming while it runs: look at the client anyway
                checked = time.monotonic()
                if await request.is_disconnected():  # the client gave up: free its place or the engine
                    worker.cancel(job)
                    return _error(499, "client closed the request")
            if kind == "done":
                return shape.whole(value)
            if kind == "error":
                return JSONResponse(status_code=400 if isinstance(value, DovetailError) else 500, content=_error_body(value))
    finally:
        worker.cancel(job)  # a no-op once done


async def _events(worker: EngineWorker, job: Job, shape: _Shape) -> AsyncIterator[str]:
    """Server-sent events: chunks, a final chunk with finish_reason and usage, then [DONE]; or an error event."""
    first = True
    try:
        while True:
            kind, value = await job.events.get()
            if kind == "piece":
                yield "data: " + json.dumps(shape.chunk(value, None, first)) + "\n\n"
                first = False
            elif kind == "done":
                yield "data: " + json.dumps(shape.chunk("", _finish(value), first, value)) + "\n\n"
                yield "data: [DONE]\n\n"
                return
            else:
                yield "data: " + json.dumps(_error_body(value)) + "\n\n"
                return
    finally:  # a disconnect (or shutdown) cancels the task here: the engine is freed at the next round
        worker.cancel(job)
