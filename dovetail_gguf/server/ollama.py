"""Ollama's API on the same engine: ``/api/chat``, ``/api/generate`` (NDJSON streams by default),
``/api/embed``, ``/api/embeddings``, ``/api/tags``, ``/api/show``, ``/api/ps``, ``/api/version``.

Requests map onto the same GenerateOptions (and so the same checks) as OpenAI's surface. Errors are
Ollama's shape, ``{"error": message}``. An option this server cannot honour (mirostat, tfs_z,
typical_p, images, thinking, a template of the request's own) is a 400 naming it; options that only
tune Ollama's runtime (num_thread, num_gpu, use_mmap, ...) and ``keep_alive`` are accepted and
change nothing: one model stays loaded for the server's life.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from datetime import datetime, timezone
from typing import Any, AsyncIterator, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, model_validator
from starlette.concurrency import run_in_threadpool

from .. import __version__
from ..api import Dovetail
from ..embed import Embedder
from ..errors import DovetailError, InvalidArgumentError
from ..structured import ToolCallHold, json_object_grammar, parse_tool_calls
from .options import prepare, refuse_unknown_fields
from .worker import EngineWorker, Job, final_event

# options of Ollama's runtime (memory, threads, GPUs): they change no answer here
RUNTIME_OPTIONS = frozenset({"numa", "num_batch", "num_gpu", "main_gpu", "low_vram", "f16_kv", "logits_all",
                             "vocab_only", "use_mmap", "use_mlock", "embedding_only", "num_thread", "num_keep",
                             "penalize_newline"})
# sampling options and their GenerateOptions names
SAMPLING_OPTIONS = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
                    "seed": "seed", "stop": "stop", "repeat_penalty": "repeat_penalty",
                    "repeat_last_n": "repeat_last_n", "presence_penalty": "presence_penalty",
                    "frequency_penalty": "frequency_penalty"}
# samplers llama.cpp's chain here lacks: only their neutral values are accepted
NEUTRAL = {"mirostat": 0, "mirostat_tau": None, "mirostat_eta": None, "tfs_z": 1.0, "typical_p": 1.0}


def ollama_error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    """Ollama's error shape, the one place it is built."""
    return JSONResponse(status_code=status, headers=headers, content={"error": message})


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


class _Body(BaseModel):
    """Fields every request has; a field no request model knows is a 400 naming it."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    keep_alive: float | str | None = None  # one model stays loaded: accepted, no effect

    @model_validator(mode="before")
    @classmethod
    def _known(cls, data):
        return refuse_unknown_fields(cls, data)


class _Generating(_Body):
    stream: bool = True
    options: dict[str, Any] | None = None
    format: Literal["", "json"] | dict[str, Any] | None = None
    think: bool | str | None = None

    def options_fields(self, n_ctx: int) -> dict:
        """``options`` and ``format`` as GenerateOptions keywords; raises InvalidArgumentError naming
        an option this server cannot honour."""
        if self.think not in (None, False):
            raise InvalidArgumentError("think: this server's models have no thinking mode")
        out: dict = {}
        for key, value in (self.options or {}).items():
            if value is None or key in RUNTIME_OPTIONS:
                continue
            if key in SAMPLING_OPTIONS:
                out[SAMPLING_OPTIONS[key]] = value
            elif key == "num_predict":
                # -1 (until the end) and -2 (fill the context): as long as the context allows
                out["max_tokens"] = n_ctx if isinstance(value, int) and value in (-1, -2) else value
            elif key == "num_ctx":
                if not isinstance(value, int) or value > n_ctx:
                    raise InvalidArgumentError(f"options.num_ctx: the loaded context holds {n_ctx} tokens; "
                                               "restart the server with a larger --ctx-size")
            elif key in NEUTRAL:
                if value != NEUTRAL[key]:
                    raise InvalidArgumentError(f"options.{key}: this server has no such sampler")
            else:
                raise InvalidArgumentError(f"options.{key}: unsupported option")
        if self.format == "json":
            out["grammar"] = json_object_grammar()
        elif isinstance(self.format, dict):
            out["json_schema"] = self.format
        return out


class OllamaMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = ""
    tool_calls: list[dict[str, Any]] | None = None
    tool_name: str | None = None
    images: list[Any] | None = None
    thinking: str | None = None

    def as_dict(self) -> dict:
        if self.images:
            raise InvalidArgumentError("messages.images: this server's models read text only")
        out: dict = {"role": self.role, "content": self.content or ""}
        if self.tool_calls:
            out["tool_calls"] = [{"type": "function", "function": c.get("function", {})} for c in self.tool_calls]
        if self.tool_name:
            out["name"] = self.tool_name
        return out


class ChatBody(_Generating):
    messages: list[OllamaMessage] = []
    tools: list[dict[str, Any]] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


class GenerateBody(_Generating):
    prompt: str | None = None
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    raw: bool = False
    context: list[int] | None = None
    images: list[Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None

    def refuse_unsupported(self) -> None:
        for name in ("template", "context", "images"):
            if getattr(self, name):
                raise InvalidArgumentError(f"{name}: unsupported field")


class EmbedBody(_Body):
    input: str | list[str]
    truncate: bool = True
    options: dict[str, Any] | None = None
    dimensions: int | None = None


class EmbeddingsBody(_Body):
    prompt: str
    options: dict[str, Any] | None = None


class ShowBody(_Body):
    name: str | None = None  # older clients send name
    verbose: bool | None = None


def _no_logprobs(body) -> None:
    if body.logprobs or body.top_logprobs:
        raise InvalidArgumentError("logprobs: not supported on this API; use /v1/chat/completions")


def _stats(result, started: float) -> dict:
    """The final chunk's counts and durations, in nanoseconds as Ollama reports them."""
    s = result.stats
    return {"done": True, "done_reason": "length" if result.finish_reason in ("length", "context_full") else "stop",
            "total_duration": int(1e9 * (time.perf_counter() - started)), "load_duration": 0,
            "prompt_eval_count": s.n_prompt_tokens, "prompt_eval_duration": int(1e9 * s.prefill_seconds),
            "eval_count": s.n_tokens, "eval_duration": int(1e9 * s.decode_seconds)}


class ModelCard:
    """What /api/tags, /api/show and /api/ps say of a loaded model."""

    def __init__(self, name: str, facts, capabilities: list[str], n_ctx: int):
        self.name, self.facts, self.capabilities, self.n_ctx = name, facts, capabilities, n_ctx
        st = os.stat(facts.path)
        self.modified_at = datetime.fromtimestamp(st.st_mtime, timezone.utc).isoformat().replace("+00:00", "Z")
        # an identifier of the file as loaded (name, size, time), not a hash of its bytes
        self.digest = hashlib.sha256(f"{facts.path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()

    def details(self) -> dict:
        f = self.facts
        quant = max(f.quant_types.items(), key=lambda kv: kv[1])[0] if f.quant_types else ""
        return {"parent_model": "", "format": "gguf", "family": f.architecture, "families": [f.architecture],
                "parameter_size": "", "quantization_level": quant}

    def entry(self) -> dict:
        return {"name": self.name, "model": self.name, "modified_at": self.modified_at, "size": self.facts.file_size,
                "digest": self.digest, "details": self.details()}

    def show(self) -> dict:
        f = self.facts
        arch = f.architecture
        info = {"general.architecture": arch, "general.name": f.name, f"{arch}.context_length": f.n_ctx_train,
                f"{arch}.embedding_length": f.n_embd, f"{arch}.block_count": f.n_layer,
                f"{arch}.attention.head_count": f.n_head, f"{arch}.attention.head_count_kv": f.n_head_kv,
                f"{arch}.feed_forward_length": f.n_ff, "tokenizer.ggml.model": f.tokenizer_model}
        return {"modelfile": f"FROM {f.path}\n", "parameters": f"num_ctx {self.n_ctx}", "template": f.chat_template or "",
                "details": self.details(), "model_info": info, "capabilities": self.capabilities,
                "modified_at": self.modified_at}


def router(dt: Dovetail, worker: EngineWorker, model_name: str, default_max_tokens: int,
           embedder: Embedder | None) -> APIRouter:
    """The ``/api`` routes over ``worker``'s engine; ``embedder``: a separate embedding model (None:
    the target's own weights)."""
    api = APIRouter(prefix="/api")
    n_ctx = dt.target.n_ctx
    caps = ["completion"] + (["tools"] if dt.target.facts.has_chat_template else [])
    try:
        from ..fim import FimTokens

        if FimTokens.of(dt.target.vocab).supported:
            caps.append("insert")
    except Exception:  # noqa: BLE001 - a vocabulary without FIM queries: no insert capability
        pass
    cards = [ModelCard(model_name, dt.target.facts, caps + ([] if embedder else ["embedding"]), n_ctx)]
    if embedder is not None:
        cards.append(ModelCard(embedder.name, embedder.model.facts, ["embedding"], embedder.n_ctx))

    def embedding_source() -> Embedder:
        return embedder if embedder is not None else dt.embedder()

    @api.get("/version")
    async def version() -> dict:
        return {"version": __version__}

    @api.get("/tags")
    async def tags() -> dict:
        return {"models": [c.entry() for c in cards]}

    @api.get("/ps")
    async def ps() -> dict:
        return {"models": [{**c.entry(), "expires_at": "2999-01-01T00:00:00Z", "size_vram": 0,
                            "context_length": c.n_ctx} for c in cards]}

    @api.post("/show")
    async def show(body: ShowBody) -> dict:
        # as on every route here, any model name is the served model (the embedding model by its own name)
        wanted = body.model or body.name
        return next((c for c in cards if c.name == wanted), cards[0]).show()

    @api.post("/chat")
    async def chat(body: ChatBody, request: Request) -> Any:
        _no_logprobs(body)
        messages = [m.as_dict() for m in body.messages]
        if not messages:  # Ollama's way to load a model: an empty chat answers at once
            return {"model": model_name, "created_at": _now(), "message": {"role": "assistant", "content": ""},
                    "done": True, "done_reason": "load"}
        tools = body.tools or None
        tokens = await run_in_threadpool(dt.chat_prompt_tokens, messages, tools)
        prepared = await prepare(dt, tokens, body.options_fields(n_ctx), default_max_tokens)
        names = [t.get("function", {}).get("name") for t in tools or ()]
        return await _respond(worker, request, body.stream, prepared, model_name, chat=True, tools=names if tools else None)

    @api.post("/generate")
    async def generate(body: GenerateBody, request: Request) -> Any:
        body.refuse_unsupported()
        _no_logprobs(body)
        if not body.prompt and body.suffix is None:  # loads the model: answers at once
            return {"model": model_name, "created_at": _now(), "response": "", "done": True, "done_reason": "load"}
        fields = body.options_fields(n_ctx)
        if body.suffix is not None:  # fill in the middle, as OpenAI's completions with suffix
            tokens = lambda n: dt.infill_tokens(body.prompt or "", body.suffix, max_tokens=n)  # noqa: E731
        elif body.raw:
            tokens = await run_in_threadpool(dt.tokenize_prompt, body.prompt)
        else:  # the model's chat template around the prompt (and the system message)
            messages = ([{"role": "system", "content": body.system}] if body.system else []) + \
                       [{"role": "user", "content": body.prompt}]
            tokens = await run_in_threadpool(dt.chat_prompt_tokens, messages)
        prepared = await prepare(dt, tokens, fields, default_max_tokens)
        return await _respond(worker, request, body.stream, prepared, model_name, chat=False)

    @api.post("/embed")
    async def embed(body: EmbedBody) -> Any:
        source = embedding_source()
        if body.dimensions is not None and body.dimensions != source.n_embd:
            raise InvalidArgumentError(f"dimensions: this model's vectors have {source.n_embd}")
        texts = [body.input] if isinstance(body.input, str) else body.input
        started = time.perf_counter()
        out = await run_in_threadpool(source.embed, texts, body.truncate)
        return {"model": body.model or source.name, "embeddings": out.vectors.tolist(),
                "total_duration": int(1e9 * (time.perf_counter() - started)), "load_duration": 0,
                "prompt_eval_count": out.total_tokens}

    @api.post("/embeddings")
    async def embeddings(body: EmbeddingsBody) -> Any:  # the older endpoint: one text, one vector
        out = await run_in_threadpool(embedding_source().embed, [body.prompt], True)
        return {"embedding": out.vectors[0].tolist()}

    return api


async def _respond(worker: EngineWorker, request: Request, stream: bool, prepared, model_name: str, chat: bool,
                   tools: list[str] | None = None) -> Any:
    job = Job(prepared, asyncio.get_running_loop())
    worker.submit(job)  # QueueFullError -> 429
    shape = _Shape(model_name, chat, tools)
    if stream:
        return StreamingResponse(_lines(worker, job, shape), media_type="application/x-ndjson")
    kind, value = await final_event(worker, job, request)
    if kind == "done":
        return shape.final(value)
    return ollama_error(499, "client closed the request") if kind == "gone" else _failed(value)


def _failed(e: BaseException) -> JSONResponse:
    if isinstance(e, DovetailError):
        return ollama_error(400, str(e))
    return ollama_error(500, "internal error in generation")


class _Shape:
    """The chunks of one Ollama answer: chat (``message``) or generate (``response``)."""

    def __init__(self, model_name: str, chat: bool, tools: list[str] | None):
        self.model, self.chat = model_name, chat
        self.tools = tools is not None  # the answer may be a tool call: parsed out of the whole text
        self.tool_names = tuple(tools or ())
        self.started = time.perf_counter()

    def chunk(self, text: str, calls: list | None = None) -> dict:
        out: dict = {"model": self.model, "created_at": _now()}
        if self.chat:
            out["message"] = {"role": "assistant", "content": text}
            if calls:
                out["message"]["tool_calls"] = calls
        else:
            out["response"] = text
        out["done"] = False
        return out

    def final(self, result) -> dict:
        """The whole answer (its text, or its tool calls where the request gave tools) with the counts:
        a whole response, or a stream's last chunk when all of it was held back."""
        text, calls = result.text, None
        if self.tools:
            text, parsed = parse_tool_calls(text, self.tool_names)
            calls = [{"function": {"name": c.name, "arguments": _arguments(c.arguments)}} for c in parsed] or None
        return {**self.chunk(text, calls), **_stats(result, self.started)}


def _arguments(text: str) -> dict:
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return {"arguments": text}
    return value if isinstance(value, dict) else {"value": value}


async def _lines(worker: EngineWorker, job: Job, shape: _Shape) -> AsyncIterator[str]:
    """NDJSON: a chunk per piece, then the final chunk with the counts; or an error line. With tools,
    an answer that starts as a tool call comes whole in the final chunk."""
    hold = ToolCallHold(shape.tool_names)
    try:
        while True:
            kind, value = await job.events.get()
            if kind == "piece":
                if shape.tools:
                    value = hold.feed(value)
                    if value is None:
                        continue
                    shape.tools = False  # plain text: streamed from here on
                yield json.dumps(shape.chunk(value)) + "\n"
            elif kind == "done":
                yield json.dumps(shape.final(value) if shape.tools else
                                 {**shape.chunk(""), **_stats(value, shape.started)}) + "\n"
                return
            else:
                message = str(value) if isinstance(value, DovetailError) else "internal error in generation"
                yield json.dumps({"error": message}) + "\n"
                return
    finally:
        worker.cancel(job)
