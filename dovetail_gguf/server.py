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
from typing import Any, AsyncIterator, Literal, Sequence

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .accept import TOP_LOGPROBS_MAX
from .api import Dovetail
from .errors import DovetailError, InvalidArgumentError
from .structured import json_object_grammar, json_schema_grammar, parse_tool_calls, tool_call_grammar

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


class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCallIn(BaseModel):
    """A tool call of an earlier assistant turn, sent back by the client."""

    model_config = ConfigDict(extra="forbid")
    id: str | None = None
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(_TextContent):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None  # None only for an assistant turn that called tools
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _content_or_calls(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise PydanticCustomError("content", "content is required (it may be null only for an assistant "
                                                 "message with tool_calls)")
        return self

    def text(self) -> str:
        return "" if self.content is None else super().text()

    def as_dict(self) -> dict:
        """The message for the chat template; tool-call arguments as objects (templates dump them as JSON)."""
        out: dict = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.function.name, "arguments": _json_or_text(c.function.arguments)}}
                                 for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            out["name"] = self.name
        return out


def _json_or_text(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None  # the output always matches the schema: a grammar enforces it


class ResponseFormat(BaseModel):
    """OpenAI's ``response_format``: text, any JSON object, or JSON validating against a schema."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise PydanticCustomError("json_schema", "response_format of type json_schema needs a json_schema")
        return self

    def grammar(self) -> str | None:
        if self.type == "json_object":
            return json_object_grammar()
        if self.type == "json_schema":
            return json_schema_grammar(self.json_schema.schema_ if self.json_schema.schema_ is not None else {})
        return None


# Request fields that change nothing in the answer: accepted and ignored. Any other field that is not
# one of the request model's own gets a 400 naming it, never silence.
IGNORED_FIELDS = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls"})


class StreamOptions(BaseModel):
    """OpenAI's ``stream_options``: ``include_usage`` adds a last chunk with ``usage`` (and ``choices: []``)."""

    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    include_obfuscation: bool = True  # OpenAI pads chunks against side channels; a local server has none to pad


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # only IGNORED_FIELDS get this far (see _known_fields)
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None  # negative: a random seed, as in OpenAI's API and llama.cpp
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = 1
    prediction: Prediction | None = None
    stream_options: StreamOptions | None = None
    # the rest of llama.cpp's sampling set (its server's names), in its chain's order
    logit_bias: dict[str, float] | None = None  # token id (as a string, as OpenAI sends it) -> bias in [-100, 100]
    repeat_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    repeat_last_n: int = Field(default=64, ge=-1)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    top_k: int = Field(default=0, ge=0)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    # structured output: OpenAI's response_format, or llama.cpp's grammar / json_schema fields
    response_format: ResponseFormat | None = None
    grammar: str | None = None
    json_schema: dict[str, Any] | None = None

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, v):
        for key, bias in (v or {}).items():
            if not key.lstrip("-").isdigit():
                raise ValueError(f"keys are token ids, got {key!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"biases are in [-100, 100], got {bias}")
        return v

    @model_validator(mode="after")
    def _one_structure(self):
        given = [name for name in ("grammar", "json_schema") if getattr(self, name) is not None]
        if self.response_format is not None and self.response_format.type != "text":
            given.append("response_format")
        if len(given) > 1:
            raise PydanticCustomError("structure", "give one of {fields}, not several", {"fields": " / ".join(given)})
        return self

    def structure(self) -> str | None:
        """The grammar the answer must match, if any (raises InvalidArgumentError for a bad schema)."""
        if self.grammar is not None:
            return self.grammar
        if self.json_schema is not None:
            return json_schema_grammar(self.json_schema)
        return self.response_format.grammar() if self.response_format is not None else None

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data):
        if isinstance(data, dict):
            known = set(cls.model_fields) | {f.alias for f in cls.model_fields.values() if f.alias} | IGNORED_FIELDS
            unknown = [k for k in data if k not in known]
            if unknown:
                raise PydanticCustomError("unsupported_field", "unsupported field {field}: the server cannot honour it",
                                          {"field": repr(unknown[0])})
        return data

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise PydanticCustomError("stream_options", "stream_options is only allowed when stream is true")
        return self

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
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=TOP_LOGPROBS_MAX)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None

    @model_validator(mode="after")
    def _consistent(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise PydanticCustomError("top_logprobs", "top_logprobs needs logprobs: true")
        if self.tool_choice is not None and self.tool_choice != "none" and not self.tools:
            raise PydanticCustomError("tool_choice", "tool_choice needs tools")
        return self

    def n_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def active_tools(self) -> list[dict] | None:
        """The tool definitions for the template (none when tool_choice is "none")."""
        if not self.tools or self.tool_choice == "none":
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools]

    def forced_tool(self) -> tuple[bool, str | None]:
        """(must the answer be a tool call, the function it must call or None for any)."""
        if isinstance(self.tool_choice, NamedToolChoice):
            return True, self.tool_choice.function.name
        return self.tool_choice == "required", None


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] = Field(min_length=1)
    logprobs: int | None = Field(default=None, ge=0, le=TOP_LOGPROBS_MAX)  # alternatives per token

    def n_logprobs(self) -> int | None:
        return self.logprobs

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

    def options(req: _Sampling, grammar: str | None = None) -> dict:
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


class TokenizeRequest(BaseModel):
    """llama.cpp server's ``/tokenize`` body."""

    model_config = ConfigDict(extra="forbid")
    content: str
    add_special: bool = False  # BOS where the model wants it
    parse_special: bool = True  # as llama.cpp: control-token text becomes control tokens
    with_pieces: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tokens: list[int]


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

    def __init__(self, model_name: str, chat: bool, include_usage: bool = False, tools: bool = False,
                 token_bytes=None):
        self.chat, self.model = chat, model_name
        self.include_usage = include_usage  # stream_options.include_usage: a last chunk carries the usage
        self.tools = tools  # the answer may hold tool calls: parsed out of the whole text
        self._token_bytes = token_bytes  # token id -> bytes, for logprobs
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def body(self, choice: dict | None, streaming: bool, result=None) -> dict:
        obj = ("chat.completion.chunk" if streaming else "chat.completion") if self.chat else "text_completion"
        out = {"id": self.id, "object": obj, "created": self.created, "model": self.model,
               "choices": [] if choice is None else [choice]}
        if result is not None:
            out["usage"], out["dovetail"] = _usage(result), _extension(result)
        elif streaming and self.include_usage:  # as OpenAI: every other chunk says usage: null
            out["usage"] = None
        return out

    def usage_chunk(self, result) -> dict:
        """The chunk after the finish chunk that stream_options.include_usage asks for: no choices, the usage."""
        return self.body(None, True, result)

    def message(self, result) -> tuple[dict, str]:
        """The assistant message of a finished chat answer (tool calls parsed out), and its finish reason."""
        content, calls = parse_tool_calls(result.text) if self.tools else (result.text, [])
        if not calls:
            return {"role": "assistant", "content": result.text}, _finish(result)
        return ({"role": "assistant", "content": content or None,
                 "tool_calls": [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                                 "function": {"name": c.name, "arguments": c.arguments}} for c in calls]},
                "tool_calls")

    def logprobs(self, result) -> dict | None:
        """OpenAI's logprobs object of a finished answer (chat or completions shape), or None."""
        if result.logprobs is None:
            return None

        def text(tok: int) -> str:
            return self._token_bytes(tok).decode("utf-8", errors="replace")

        if self.chat:
            return {"content": [
                {"token": text(r.token), "logprob": r.logprob, "bytes": list(self._token_bytes(r.token)),
                 "top_logprobs": [{"token": text(t), "logprob": lp, "bytes": list(self._token_bytes(t))}
                                  for t, lp in r.top]}
                for r in result.logprobs]}
        offsets, pos = [], 0
        for r in result.logprobs:
            offsets.append(pos)
            pos += len(text(r.token))
        return {"tokens": [text(r.token) for r in result.logprobs],
                "token_logprobs": [r.logprob for r in result.logprobs],
                "top_logprobs": [{text(t): lp for t, lp in r.top} for r in result.logprobs],
                "text_offset": offsets}

    def whole(self, result) -> dict:
        if self.chat:
            message, reason = self.message(result)
            choice = {"index": 0, "message": message, "finish_reason": reason, "logprobs": self.logprobs(result)}
        else:
            choice = {"index": 0, "text": result.text, "finish_reason": _finish(result), "logprobs": self.logprobs(result)}
        return self.body(choice, False, result)

    def last_chunk(self, result, first: bool) -> dict:
        """The finish chunk: with a tools request, the whole answer (content or tool calls), else
        empty; the logprobs of the whole answer when asked for."""
        if self.chat and self.tools:
            message, reason = self.message(result)
            delta = {k: v for k, v in message.items() if v is not None}
            choice = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": self.logprobs(result)}
            if "tool_calls" in delta:
                delta["tool_calls"] = [{"index": i, **c} for i, c in enumerate(delta["tool_calls"])]
            return self.body(choice, True)
        out = self.chunk("", _finish(result), first)
        out["choices"][0]["logprobs"] = self.logprobs(result)
        return out

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
                   model_name: str, chat: bool, tools: bool = False) -> Any:
    worker.dt.engine.check_prompt(tokens)  # a prompt that cannot fit is a 400 now, not an event later
    worker.dt.options(**opts)  # so are bad sampling settings
    job = Job(tokens, opts, asyncio.get_running_loop())
    worker.submit(job)  # QueueFullError -> 429
    shape = _Shape(model_name, chat, include_usage=bool(req.stream_options and req.stream_options.include_usage),
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
                return JSONResponse(status_code=400 if isinstance(value, DovetailError) else 500, content=_error_body(value))
    finally:
        worker.cancel(job)  # a no-op once done


async def _events(worker: EngineWorker, job: Job, shape: _Shape) -> AsyncIterator[str]:
    """Server-sent events: chunks, a final chunk with finish_reason, a usage chunk if the request asked for
    one (stream_options.include_usage), then [DONE]; or an error event."""
    first = True
    try:
        while True:
            kind, value = await job.events.get()
            if kind == "piece":
                if shape.tools:  # tool calls are parsed from the whole answer: it comes in the last chunk
                    continue
                yield "data: " + json.dumps(shape.chunk(value, None, first)) + "\n\n"
                first = False
            elif kind == "done":
                yield "data: " + json.dumps(shape.last_chunk(value, first)) + "\n\n"
                if shape.include_usage:
                    yield "data: " + json.dumps(shape.usage_chunk(value)) + "\n\n"
                yield "data: [DONE]\n\n"
                return
            else:
                yield "data: " + json.dumps(_error_body(value)) + "\n\n"
                return
    finally:  # a disconnect (or shutdown) cancels the task here: the engine is freed at the next round
        worker.cancel(job)
