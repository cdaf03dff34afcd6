"""The FastAPI app: its engine worker, API key, body-size limit, CORS, error handlers, and the routes
of each surface (OpenAI's ``/v1``, llama.cpp server's extensions, Ollama's ``/api``)."""

from __future__ import annotations

import secrets
from typing import Sequence

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..api import Dovetail
from ..errors import DovetailError, InvalidArgumentError
from ..embed import Embedder
from . import llamacpp, ollama, openai
from .errors import error_response
from ..options import LIMITS
from .worker import EngineWorker, Metrics, QueueFullError

MAX_BODY_BYTES = 4 * 2**20  # a request body larger than this gets a 413


def create_app(dt: Dovetail, model_name: str, api_key: str | None = None, default_max_tokens: int = LIMITS["served_max_tokens"].default,
               max_queue: int = LIMITS["max_queue"].default, cors_origins: Sequence[str] = (),
               embedder: Embedder | None = None) -> FastAPI:
    """The FastAPI app; its engine worker starts now and stops when the app shuts down.

    ``cors_origins``: browser origins allowed to call the API (``"*"`` for any); none by default.
    ``embedder``: a separate embedding model for the embedding routes (None: the target's own weights);
    the app closes it when it shuts down.
    """
    if api_key is not None and not api_key:
        raise InvalidArgumentError("the API key is empty; give a non-empty key or none")
    metrics = Metrics()
    worker = EngineWorker(dt, max_queue, metrics)
    app = FastAPI(title="dovetail-gguf", version=__version__,
                  description="OpenAI-compatible API over Dovetail speculative decoding (GGUF target on the CPU).")
    app.state.worker = worker
    app.router.on_shutdown.append(worker.stop)
    if embedder is not None:
        app.router.on_shutdown.append(embedder.close)
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

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_name, "draft": dt.drafter is not None,
                "queue_depth": worker.queue_depth, "busy": worker.busy, "max_queue": worker.max_queue,
                "in_flight": worker.in_flight, "parallel": worker.parallel,
                "live_prefix_tokens": dt.target.n_past,
                "prefix_cache": dt.prefixes.state() if dt.prefixes is not None else None}

    keyed = [Depends(check_key)]
    app.include_router(openai.router(dt, worker, model_name, default_max_tokens, embedder), dependencies=keyed)
    app.include_router(llamacpp.router(dt, worker, model_name, default_max_tokens), dependencies=keyed)
    app.include_router(ollama.router(dt, worker, model_name, default_max_tokens, embedder), dependencies=keyed)

    @app.get("/")
    async def root() -> PlainTextResponse:  # Ollama clients look for this line to find a server
        return PlainTextResponse("Ollama is running")
    return app


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
            return await error_response(413, f"the request body is larger than {self.limit} bytes")(
                scope, receive, send)
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
            await error_response(413, f"the request body is larger than {self.limit} bytes")(scope, receive, send)


class _TooLarge(Exception):
    pass


def _install_handlers(app: FastAPI) -> None:
    def answer(request: Request, status: int, message: str, kind: str = "invalid_request_error", headers=None):
        """Each surface's error shape: Ollama's under /api/, OpenAI's elsewhere."""
        if request.url.path.startswith("/api/"):
            return ollama.ollama_error(status, message, headers)
        return error_response(status, message, kind, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        msg = str(first.get("msg", "invalid request")).encode("utf-8", "replace").decode()
        return answer(request, 400, f"{where}: {msg}" if where else msg)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = "authentication_error" if exc.status_code == 401 else "invalid_request_error"
        return answer(request, exc.status_code, str(exc.detail), kind)

    @app.exception_handler(QueueFullError)
    async def _full(request: Request, exc: QueueFullError):
        return answer(request, 429, str(exc), "rate_limit_error", headers={"Retry-After": "2"})

    @app.exception_handler(DovetailError)
    async def _dovetail(request: Request, exc: DovetailError):
        return answer(request, 400, str(exc))
