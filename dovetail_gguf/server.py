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
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Sequence

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .api import Dovetail
from .errors import DovetailError, InvalidArgumentError
from .openai_shapes import (ChatRequest, CompletionRequest, DetokenizeRequest, ResponseShape, SamplingRequest,
                            TokenizeRequest, error_body)
from .structured import could_be_tool_call, tool_call_grammar

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 4 * 2**20  # a request body larger than this gets a 413
DEFAULT_MAX_QUEUE = 64


def _error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
           headers: dict | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, headers=headers,
                        content={"error": {"message": message, "type": kind, "param": None, "code": code}})


# ---------------------------------------------------------------------- metrics
class Metrics:
    """Counters for ``GET /metrics``, in Prometheus's text format. The engine worker counts generations,
    a middleware counts responses by status; one lock serves both threads."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: collections.Counter[int] = collections.Counter()
        self.generations = self.prompt_tokens = self.completion_tokens = self.rounds = self.accepted_tokens = 0
        self.tokens_per_second = 0.0  # of the last generation that finished (not cancelled)

    def request(self, status: int) -> None:
        with self._lock:
            self.requests[status] += 1

    def generation(self, result) -> None:
        """Count a generation that ended or was cancelled (its tokens were computed either way)."""
        if result is None:
            return
        s = result.stats
        with self._lock:
            self.generations += 1
            self.prompt_tokens += s.n_prompt_tokens
            self.completion_tokens += s.n_tokens
            self.rounds += s.rounds
            self.accepted_tokens += s.accepted_tokens
            if result.finish_reason not in ("cancelled", "error") and s.n_tokens:
                self.tokens_per_second = s.tokens_per_second

    def text(self, worker: "EngineWorker") -> str:
        """The exposition text (format 0.0.4)."""
        with self._lock:
            rows = [
                ("requests_total", "counter", "HTTP responses, by status code.",
                 [(f'{{status="{k}"}}', v) for k, v in sorted(self.requests.items())]),
                ("generations_total", "counter", "Generations that ended or were cancelled.", [("", self.generations)]),
                ("prompt_tokens_total", "counter", "Prompt tokens of those generations.", [("", self.prompt_tokens)]),
                ("completion_tokens_total", "counter", "Tokens generated.", [("", self.completion_tokens)]),
                ("rounds_total", "counter", "Decoding rounds (one target call each); tokens per round is "
                 "accepted_tokens_total / rounds_total.", [("", self.rounds)]),
                ("accepted_tokens_total", "counter", "Tokens emitted by rounds, the target's own token included.",
                 [("", self.accepted_tokens)]),
                ("tokens_per_second", "gauge", "Decode speed of the last finished generation.",
                 [("", round(self.tokens_per_second, 3))]),
                ("queue_depth", "gauge", "Requests waiting for the engine.", [("", worker.queue_depth)]),
                ("max_queue", "gauge", "The queue's bound; past it a request gets 429.", [("", worker.max_queue)]),
                ("busy", "gauge", "1 while the engine runs a generation.", [("", int(worker.busy))]),
            ]
        out = []
        for name, kind, help_text, samples in rows:
            out += [f"# HELP dovetail_{name} {help_text}", f"# TYPE dovetail_{name} {kind}"]
            out += [f"dovetail_{name}{labels} {value}" for labels, value in samples]
        return "\n".join(out) + "\n"


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

    def __init__(self, dt: Dovetail, max_queue: int = DEFAULT_MAX_QUEUE, metrics: Metrics | None = None):
        self.dt = dt
        self.max_queue = max_queue
        self.metrics = metrics if metrics is not None else Metrics()
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
            self.metrics.generation(stream.result)
            if not job.cancelled.is_set():
                job.send("done", stream.result)
        except DovetailError as e:
            job.send("error", e)
        except Exception as e:  # noqa: BLE001 - a bug must not kill the worker; the client gets a 500 event
            log.exception("generation failed")
            job.send("error", e)


# ---------------------------------------------------------------------- the app
def create_app(dt: Dovetail, model_name: str, api_key: str | None = None, default_max_tokens: int = 512,
               max_queue: int = DEFAULT_MAX_QUEUE, cors_origins: Sequence[str] = ()) -> FastAPI:
    """The FastAPI app; its engine worker starts now and stops when the app shuts down.

    ``cors_origins``: browser origins allowed to call the API (``"*"`` for any); none by default.
    """
    if api_key is not None and not api_key:
        raise InvalidArgumentError("the API key is empty; give a non-empty key or none")
    metrics = Metrics()
    worker = EngineWorker(dt, max_queue, metrics)
    app = FastAPI(title="dovetail-gguf", version="0.1.0",
                  description="OpenAI-compatible API over Dovetail speculative decoding (GGUF target on the CPU).")
    app.state.worker = worker
    app.router.on_shutdown.append(worker.stop)
    _install_handlers(app)

    app.add_middleware(_BodyLimit, limit=MAX_BODY_BYTES)
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["*"])
    app.add_middleware(_CountStatus, metrics=metrics)  # the outermost layer: it sees every status

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        auth = request.headers.get("authorization", "")
        token = auth[7:] if auth.lower().startswith("bearer ") else ""
        if not secrets.compare_digest(token.encode(), api_key.encode()):
            raise StarletteHTTPException(401, "invalid or missing API key")

    def options(req: SamplingRequest, grammar: str | None = None) -> dict:
        """Dovetail.options keywords of a request (``grammar``: one a tool choice forces)."""
        max_tokens = min(req.max_tokens or default_max_tokens, dt.target.n_ctx)  # capped at the context
        structure = req.structure()
        if grammar is not None and structure is not None:
            raise InvalidArgumentError("a forced tool call and a response format / grammar cannot be combined")
        return dict(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, seed=req.seed, stop=req.stop,
                    prediction=req.prediction.text() if req.prediction is not None else None,
                    top_k=req.top_k, min_p=req.min_p, repeat_penalty=req.repeat_penalty,
                    repeat_last_n=req.repeat_last_n, presence_penalty=req.presence_penalty,
                    frequency_penalty=req.frequency_penalty,
                    logit_bias={int(k): v for k, v in (req.logit_bias or {}).items()},
                    grammar=grammar if grammar is not None else structure, logprobs=req.n_logprobs())

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_name, "draft": dt.drafter is not None,
                "queue_depth": worker.queue_depth, "busy": worker.busy, "max_queue": worker.max_queue}

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "local"}]}

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat(req: ChatRequest, request: Request) -> Any:
        messages = [m.as_dict() for m in req.messages]
        tools = req.active_tools()
        tokens = await run_in_threadpool(dt.chat_prompt_tokens, messages, tools)
        forced, name = req.forced_tool()
        grammar = await run_in_threadpool(tool_call_grammar, tools, name) if forced else None
        return await _respond(worker, request, req, tokens, options(req, grammar), model_name, chat=True,
                              tools=tools is not None)

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(req: CompletionRequest, request: Request) -> Any:
        if isinstance(req.prompt, str):
            tokens = await run_in_threadpool(dt.tokenize_prompt, req.prompt)
        else:
            tokens = list(req.prompt)
            if min(tokens) < 0 or max(tokens) >= dt.target.n_vocab:
                raise InvalidArgumentError(f"prompt token ids must be in 0..{dt.target.n_vocab - 1}")
        return await _respond(worker, request, req, tokens, options(req), model_name, chat=False)

    @app.post("/tokenize", dependencies=[Depends(check_key)])
    async def tokenize(req: TokenizeRequest) -> dict:
        ids = (await run_in_threadpool(dt.target.tokenize, req.content, req.add_special, req.parse_special)).tolist()
        if not req.with_pieces:
            return {"tokens": ids}
        pieces = await run_in_threadpool(lambda: [_token_piece(dt, t) for t in ids])
        return {"tokens": [{"id": t, "piece": _piece_json(b)} for t, b in zip(ids, pieces)]}

    @app.post("/detokenize", dependencies=[Depends(check_key)])
    async def detokenize(req: DetokenizeRequest) -> dict:
        if req.tokens and (min(req.tokens) < 0 or max(req.tokens) >= dt.target.n_vocab):
            raise InvalidArgumentError(f"token ids must be in 0..{dt.target.n_vocab - 1}")
        data = await run_in_threadpool(lambda: b"".join(_token_piece(dt, t) for t in req.tokens))
        return {"content": data.decode("utf-8", errors="replace")}

    @app.get("/metrics", dependencies=[Depends(check_key)])
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.text(worker), media_type="text/plain; version=0.0.4")

    return app


def _token_piece(dt: Dovetail, token: int) -> bytes:
    """A token's bytes, control tokens rendered as their text (as llama.cpp's server does)."""
    return dt.target.token_bytes(token) or dt.target.detokenize_special(token).encode("utf-8")


def _piece_json(piece: bytes) -> str | list[int]:
    """The piece as text, or as its byte values where it is not whole UTF-8 (as llama.cpp's server does)."""
    try:
        return piece.decode("utf-8")
    except UnicodeDecodeError:
        return list(piece)


class _CountStatus:
    """Counts every response's status into :class:`Metrics` (a plain ASGI layer, like :class:`_BodyLimit`)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def counting(message):
            nonlocal started
            if message["type"] == "http.response.start" and not started:
                started = True
                self.metrics.request(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counting)
        except Exception:
            if not started:  # the server's error layer answers 500
                self.metrics.request(500)
            raise


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


async def _respond(worker: EngineWorker, request: Request, req: SamplingRequest, tokens: list[int], opts: dict,
                   model_name: str, chat: bool, tools: bool = False) -> Any:
    worker.dt.engine.check_prompt(tokens)  # a prompt that cannot fit is a 400 now, not an event later
    # so are bad sampling settings, token ids outside the vocabulary and a grammar llama.cpp refuses
    await run_in_threadpool(worker.dt.engine.check_options, worker.dt.options(**opts))
    job = Job(tokens, opts, asyncio.get_running_loop())
    worker.submit(job)  # QueueFullError -> 429
    shape = ResponseShape(model_name, chat, include_usage=bool(req.stream_options and req.stream_options.include_usage),
                   tools=tools, token_bytes=worker.dt.target.token_bytes)
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
                return JSONResponse(status_code=400 if isinstance(value, DovetailError) else 500, content=error_body(value))
    finally:
        worker.cancel(job)  # a no-op once done


async def _events(worker: EngineWorker, job: Job, shape: ResponseShape) -> AsyncIterator[str]:
    """Server-sent events: chunks, a final chunk with finish_reason, a usage chunk if the request asked for
    one (stream_options.include_usage), then [DONE]; or an error event."""
    first = True
    held = ""  # with tools: the answer's start, held back while it may still be a tool call
    try:
        while True:
            kind, value = await job.events.get()
            if kind == "piece":
                if shape.tools:
                    held += value
                    if could_be_tool_call(held):  # parsed from the whole answer, sent in the last chunk
                        continue
                    shape.tools, value, held = False, held, ""  # plain text: streamed from here on
                yield "data: " + json.dumps(shape.chunk(value, None, first)) + "\n\n"
                first = False
            elif kind == "done":
                yield "data: " + json.dumps(shape.last_chunk(value, first)) + "\n\n"
                if shape.include_usage:
                    yield "data: " + json.dumps(shape.usage_chunk(value)) + "\n\n"
                yield "data: [DONE]\n\n"
                return
            else:
                yield "data: " + json.dumps(error_body(value)) + "\n\n"
                return
    finally:  # a disconnect (or shutdown) cancels the task here: the engine is freed at the next round
        worker.cancel(job)
