"""OpenAI's API: ``/v1/models``, ``/v1/chat/completions`` and ``/v1/completions``, whole or streamed, and
``/v1/embeddings``."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any, AsyncIterator, Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, model_validator
from starlette.concurrency import run_in_threadpool

from ..api import Dovetail
from ..embed import Embedder
from ..engine import Request as EngineRequest
from ..errors import InvalidArgumentError
from ..structured import ToolCallHold, tool_call_grammar
from .errors import error_body, error_response, failed_response
from .openai_shapes import ChatRequest, CompletionRequest, ResponseShape, SamplingRequest
from .options import prepare, refuse_unknown_fields
from .worker import EngineWorker, Job, final_event


class EmbeddingRequest(BaseModel):
    """OpenAI's embeddings request: text, or a list of texts (token-id inputs are refused)."""

    model_config = ConfigDict(extra="forbid")
    input: str | list[str]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data):
        return refuse_unknown_fields(cls, data)


def router(dt: Dovetail, worker: EngineWorker, model_name: str, default_max_tokens: int,
           embedder: Embedder | None = None) -> APIRouter:
    """The ``/v1`` routes over ``worker``'s engine; ``default_max_tokens`` where a request gives none;
    ``embedder``: a separate embedding model (None: the target's own weights)."""
    api = APIRouter(prefix="/v1")

    @api.post("/embeddings")
    async def embeddings(req: EmbeddingRequest) -> dict:
        source = embedder if embedder is not None else dt.embedder()
        if req.dimensions is not None and req.dimensions != source.n_embd:
            raise InvalidArgumentError(f"dimensions: this model's vectors have {source.n_embd}")
        texts = [req.input] if isinstance(req.input, str) else req.input
        out = await run_in_threadpool(source.embed, texts)
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode() if req.encoding_format == "base64"
                 else v.tolist()} for i, v in enumerate(out.vectors)]
        return {"object": "list", "data": data, "model": req.model or source.name,
                "usage": {"prompt_tokens": out.total_tokens, "total_tokens": out.total_tokens}}

    @api.get("/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "local"}]}

    @api.post("/chat/completions")
    async def chat(req: ChatRequest, request: Request) -> Any:
        messages = [m.as_dict() for m in req.messages]
        tools = req.active_tools()
        tokens = await run_in_threadpool(dt.chat_prompt_tokens, messages, tools)
        forced, name = req.forced_tool()
        grammar = await run_in_threadpool(tool_call_grammar, tools, name) if forced else None
        prepared = await prepare(dt, tokens, req.options_fields(tool_grammar=grammar), default_max_tokens)
        return await _respond(worker, request, req, prepared, model_name, chat=True, tools=tools)

    @api.post("/completions")
    async def completions(req: CompletionRequest, request: Request) -> Any:
        if req.suffix is not None:  # fill in the middle: the model's FIM layout of prompt and suffix
            if not isinstance(req.prompt, str):
                raise InvalidArgumentError("suffix needs the prompt as text (the code before the gap)")
            tokens = lambda n: dt.infill_tokens(req.prompt, req.suffix, max_tokens=n)  # noqa: E731
        elif isinstance(req.prompt, str):
            tokens = await run_in_threadpool(dt.tokenize_prompt, req.prompt)
        else:
            tokens = req.prompt
        prepared = await prepare(dt, tokens, req.options_fields(), default_max_tokens)  # checks token ids too
        return await _respond(worker, request, req, prepared, model_name, chat=False)

    return api


async def _respond(worker: EngineWorker, request: Request, req: SamplingRequest, prepared: EngineRequest,
                   model_name: str, chat: bool, tools: list[dict] | None = None) -> Any:
    job = Job(prepared, asyncio.get_running_loop())
    worker.submit(job)  # QueueFullError -> 429
    shape = ResponseShape(model_name, chat, include_usage=bool(req.stream_options and req.stream_options.include_usage),
                          tools=tools is not None, token_bytes=worker.dt.target.token_bytes,
                          tool_names=[t["function"]["name"] for t in tools or ()])
    if req.stream:
        return StreamingResponse(_events(worker, job, shape), media_type="text/event-stream")
    kind, value = await final_event(worker, job, request)
    if kind == "done":
        return shape.whole(value)
    return error_response(499, "client closed the request") if kind == "gone" else failed_response(value)


async def _events(worker: EngineWorker, job: Job, shape: ResponseShape) -> AsyncIterator[str]:
    """Server-sent events: chunks, a final chunk with finish_reason, a usage chunk if the request asked for
    one (stream_options.include_usage), then [DONE]; or an error event."""
    first = True
    hold = ToolCallHold(shape.tool_names)  # with tools: a possible tool call's start is held back
    try:
        while True:
            kind, value = await job.events.get()
            if kind == "piece":
                if shape.tools:
                    value = hold.feed(value)
                    if value is None:  # parsed from the whole answer, sent in the last chunk
                        continue
                    shape.tools = False  # plain text: streamed from here on
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
