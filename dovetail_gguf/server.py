"""An OpenAI-compatible HTTP server over one loaded Dovetail engine.

Requests queue on the engine and are served one at a time; a client that goes
away mid-stream frees the engine at once. Errors come back in OpenAI's error
shape and never take the server down.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
import uuid
from typing import Any, Iterator, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .api import Dovetail, Stream
from .errors import DovetailError

log = logging.getLogger(__name__)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # unknown OpenAI fields are accepted and ignored
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(_Sampling):
    prompt: str = Field(min_length=1)


def _error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": None, "code": code}})


class _Driver:
    """Pulls pieces from a Stream in worker threads; closing waits for an in-flight pull."""

    def __init__(self, stream: Stream):
        self.stream = stream
        self._it = iter(stream)
        self._lock = threading.Lock()

    def next(self) -> str | None:
        with self._lock:
            return next(self._it, None)

    def close(self) -> None:
        with self._lock:
            self.stream.close()


def create_app(dt: Dovetail, model_name: str, api_key: str | None = None, default_max_tokens: int = 512) -> FastAPI:
    app = FastAPI(title="dovetail-gguf", version="0.1.0",
                  description="OpenAI-compatible API over Dovetail speculative decoding (GGUF target on the CPU).")

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(400, f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = "authentication_error" if exc.status_code == 401 else "invalid_request_error"
        return _error(exc.status_code, str(exc.detail), kind)

    @app.exception_handler(DovetailError)
    async def _dovetail(request: Request, exc: DovetailError):
        return _error(400, str(exc))

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        auth = request.headers.get("authorization", "")
        token = auth[7:] if auth.lower().startswith("bearer ") else ""
        if not secrets.compare_digest(token.encode(), api_key.encode()):
            raise StarletteHTTPException(401, "invalid or missing API key")

    def options(req: _Sampling) -> dict:
        return dict(max_tokens=req.max_tokens or default_max_tokens, temperature=req.temperature, top_p=req.top_p,
                    seed=req.seed, stop=req.stop)

    def extension(result) -> dict:
        s = result.stats
        return {"tau": s.mean_accepted_tokens, "tokens_per_second": s.tokens_per_second, "rounds": s.rounds}

    def usage(result) -> dict:
        s = result.stats
        return {"prompt_tokens": s.n_prompt_tokens, "completion_tokens": s.n_tokens,
                "total_tokens": s.n_prompt_tokens + s.n_tokens}

    def finish(result) -> str:
        return "length" if result.finish_reason == "context_full" else result.finish_reason

    def sse(stream: Stream, chunk) -> StreamingResponse:
        driver = _Driver(stream)

        async def events() -> Iterator[str]:
            try:
                first = True
                while True:
                    piece = await run_in_threadpool(driver.next)
                    if piece is None:
                        break
                    yield "data: " + json.dumps(chunk(piece, None, first)) + "\n\n"
                    first = False
                result = stream.result
                yield "data: " + json.dumps(chunk("", finish(result), first, result)) + "\n\n"
                yield "data: [DONE]\n\n"
            finally:  # also on a client disconnect: free the engine as soon as the pull in flight returns
                threading.Thread(target=driver.close, daemon=True).start()

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_name, "draft": dt.drafter is not None}

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "local"}]}

    async def respond(req: _Sampling, tokens, prefix: str, kind: str, chunk_kind: str, choice) -> Any:
        """Run one request; ``choice(text, finish_reason, first, streaming)`` shapes its one choice."""
        cid, created = f"{prefix}-{uuid.uuid4().hex}", int(time.time())

        def body(obj: str, one_choice: dict, result=None) -> dict:
            out = {"id": cid, "object": obj, "created": created, "model": model_name, "choices": [one_choice]}
            if result is not None:
                out["usage"], out["dovetail"] = usage(result), extension(result)
            return out

        if req.stream:
            stream = dt.stream_tokens(tokens, **options(req))
            return sse(stream, lambda piece, reason, first, result=None:
                       body(chunk_kind, choice(piece, reason, first, True), result))
        result = await run_in_threadpool(lambda: dt.generate_tokens(tokens, **options(req)))
        return body(kind, choice(result.text, finish(result), True, False), result)

    def chat_choice(text: str, reason: str | None, first: bool, streaming: bool) -> dict:
        if not streaming:
            return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
        delta = {"content": text} if text or reason is None else {}
        if first:
            delta["role"] = "assistant"
        return {"index": 0, "delta": delta, "finish_reason": reason}

    def completion_choice(text: str, reason: str | None, first: bool, streaming: bool) -> dict:
        return {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat(req: ChatRequest) -> Any:
        tokens = await run_in_threadpool(dt.chat_prompt_tokens, [m.model_dump() for m in req.messages])
        return await respond(req, tokens, "chatcmpl", "chat.completion", "chat.completion.chunk", chat_choice)

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(req: CompletionRequest) -> Any:
        tokens = await run_in_threadpool(dt.tokenize_prompt, req.prompt)
        return await respond(req, tokens, "cmpl", "text_completion", "text_completion", completion_choice)

    return app
