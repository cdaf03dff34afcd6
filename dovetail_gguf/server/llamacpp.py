"""llama.cpp server's extensions: ``/tokenize``, ``/detokenize`` and ``/metrics`` (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool

from ..api import Dovetail
from .worker import EngineWorker


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


def router(dt: Dovetail, worker: EngineWorker) -> APIRouter:
    """The routes over ``dt``'s vocabulary and ``worker``'s counters."""
    api = APIRouter()

    @api.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> dict:
        ids = (await run_in_threadpool(dt.target.tokenize, req.content, req.add_special, req.parse_special)).tolist()
        if not req.with_pieces:
            return {"tokens": ids}
        pieces = await run_in_threadpool(lambda: [_token_piece(dt, t) for t in ids])
        return {"tokens": [{"id": t, "piece": _piece_json(b)} for t, b in zip(ids, pieces)]}

    @api.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> dict:
        dt.target.vocab.check_ids(req.tokens)  # a 400 for an id outside the vocabulary
        data = await run_in_threadpool(lambda: b"".join(_token_piece(dt, t) for t in req.tokens))
        return {"content": data.decode("utf-8", errors="replace")}

    @api.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(worker.metrics.text(worker), media_type="text/plain; version=0.0.4")

    return api


def _token_piece(dt: Dovetail, token: int) -> bytes:
    """A token's bytes, control tokens rendered as their text (as llama.cpp's server does)."""
    return dt.target.token_bytes(token) or dt.target.detokenize_special(token).encode("utf-8")


def _piece_json(piece: bytes) -> str | list[int]:
    """The piece as text, or as its byte values where it is not whole UTF-8 (as llama.cpp's server does)."""
    try:
        return piece.decode("utf-8")
    except UnicodeDecodeError:
        return list(piece)
