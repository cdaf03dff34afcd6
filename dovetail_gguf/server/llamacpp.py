"""llama.cpp server's surface: ``/infill`` (fill-in-the-middle, as llama.vim and llama.vscode send it),
``/tokenize``, ``/detokenize`` and ``/metrics`` (Prometheus)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, field_validator, model_validator
from starlette.concurrency import run_in_threadpool

from ..api import Dovetail
from .errors import error_body, error_response, failed_response
from .options import prepare, refuse_unknown_fields
from .worker import EngineWorker, Job, job_events

# llama.cpp's sampler names this server's fixed chain covers; "infill" (llama.cpp's end-of-middle
# heuristic) is accepted and not applied: the middle ends where the target emits an end token
SAMPLERS = frozenset({"penalties", "top_k", "top_p", "min_p", "temperature", "infill"})
# request fields that change nothing here: accepted and ignored
INFILL_IGNORED = frozenset({"cache_prompt", "id_slot", "t_max_prompt_ms", "n_probs", "model"})


class ExtraChunk(BaseModel):
    """One element of ``input_extra``: another file of the project. Other keys (llama.vim's ``time``)
    are ignored, as llama.cpp's server does."""

    model_config = ConfigDict(extra="ignore")
    text: str = ""
    filename: str = "tmp"


class InfillRequest(BaseModel):
    """llama.cpp server's ``/infill`` body. Bounds and defaults of the generation fields are the
    options table's; ``n_predict`` is its max_tokens (-1 or absent: the server's default)."""

    model_config = ConfigDict(extra="ignore")  # only INFILL_IGNORED gets this far (see _known_fields)
    input_prefix: str = ""
    input_suffix: str = ""
    input_extra: list[ExtraChunk] = []
    prompt: str = ""  # continues the prefix (the start of the current line, say)
    n_predict: int | None = None
    n_indent: int = 0  # stop at a line indented less than this (the first line excepted)
    t_max_predict_ms: int | None = None  # stop once this long has passed and a line has ended
    samplers: list[str] | None = None
    stream: bool = False
    response_fields: list[str] | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: list[str] | None = None
    repeat_penalty: float | None = None
    repeat_last_n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    # Predicted Outputs (this server's extension): the middle it is expected to repeat, e.g. the previous
    # completion when an editor re-completes after a small edit; it never changes the answer
    prediction: str | None = None
    n_cmpl: int = 1  # completions per request (llama.vscode sends its setting); one is what this server gives

    @field_validator("n_cmpl")
    @classmethod
    def _one_completion(cls, v: int) -> int:
        if v != 1:
            raise ValueError("only n_cmpl = 1 is supported (one completion per request)")
        return v

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data):
        return refuse_unknown_fields(cls, data, INFILL_IGNORED)

    @field_validator("samplers")
    @classmethod
    def _known_samplers(cls, v):
        other = [name for name in v or () if name not in SAMPLERS]
        if other:
            raise ValueError(f"sampler {other[0]!r} is not supported (supported: {', '.join(sorted(SAMPLERS))})")
        return v

    def options_fields(self) -> dict:
        out = {k: getattr(self, k) for k in ("temperature", "top_k", "top_p", "min_p", "seed", "stop", "repeat_penalty",
                                             "repeat_last_n", "presence_penalty", "frequency_penalty", "prediction")
               if getattr(self, k) is not None}
        if self.n_predict is not None and self.n_predict >= 0:
            out["max_tokens"] = self.n_predict
        return out


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


def router(dt: Dovetail, worker: EngineWorker, model_name: str, default_max_tokens: int) -> APIRouter:
    """The routes over ``dt``'s vocabulary and ``worker``'s engine and counters."""
    api = APIRouter()

    @api.post("/infill")
    async def infill(req: InfillRequest, request: Request) -> Any:
        fields = req.options_fields()
        warm = fields.get("max_tokens") == 0  # n_predict 0: only bring the new context into the cache
        if warm:
            fields["max_tokens"] = 1
        extra = [c.model_dump() for c in req.input_extra]
        prepared = await prepare(dt, lambda n: dt.infill_tokens(req.input_prefix, req.input_suffix, extra, req.prompt, n),
                                 fields, default_max_tokens)
        job = Job(prepared, asyncio.get_running_loop(), warm_only=warm)
        worker.submit(job)  # QueueFullError -> 429
        shape = InfillShape(model_name, req)
        if req.stream and not warm:
            return StreamingResponse(_infill_events(worker, job, shape), media_type="text/event-stream")
        try:
            async for kind, value in _infill_run(worker, job, shape, request):
                if kind == "error":
                    return failed_response(value)
                if kind == "gone":
                    return error_response(499, "client closed the request")
                if kind == "done":
                    return shape.body(value, warm)
        finally:
            worker.cancel(job)  # a no-op once done

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


class InfillStops:
    """llama.cpp's infill stop rules over the middle's text: a line indented less than ``n_indent``
    (the first line excepted) ends it before that line; past ``t_max_predict_ms``, the end of a line does."""

    def __init__(self, n_indent: int, t_max_predict_ms: int | None):
        self.n_indent = n_indent
        self.deadline = time.monotonic() + t_max_predict_ms / 1000 if t_max_predict_ms and t_max_predict_ms > 0 else None
        self.text = ""
        self.sent = 0  # characters of ``text`` released so far
        self.done = False

    def feed(self, piece: str) -> tuple[str, bool]:
        """(text to release now, whether the middle ends here); nothing more once it ended."""
        if self.done:
            return "", True
        self.text += piece
        end = len(self.text)
        stop = False
        if self.n_indent > 0:
            start = self.text.find("\n") + 1
            while start > 0:  # every line after the first: its indentation, once it has content
                nxt = self.text.find("\n", start)
                line = self.text[start: nxt if nxt >= 0 else len(self.text)]
                body = line.lstrip(" \t")
                if body and len(line) - len(body) < self.n_indent:
                    end, stop = start, True
                    break
                start = nxt + 1 if nxt >= 0 else 0
        if not stop and self.deadline is not None and time.monotonic() > self.deadline and "\n" in self.text:
            end, stop = self.text.rfind("\n") + 1, True
        if stop:
            self.text, self.done = self.text[:end], True
        out = self.text[self.sent: max(end, self.sent)] if stop else self.text[self.sent:]
        self.sent += len(out)
        return out, stop


class InfillShape:
    """llama.cpp's /infill (and /completion) response: whole, or as server-sent event chunks."""

    def __init__(self, model_name: str, req: InfillRequest):
        self.model_name = model_name
        self.fields = req.response_fields
        self.stops = InfillStops(req.n_indent, req.t_max_predict_ms)
        self.cut = False  # an infill rule ended the middle

    def chunk(self, text: str) -> dict:
        return {"index": 0, "content": text, "tokens": [], "stop": False, "id_slot": 0}

    def body(self, result, warm: bool = False) -> dict:
        """The final response; ``result``: the generation's, or a warm-up's GenerationStats."""
        text = "" if warm or result is None else self.stops.text if self.cut else result.text
        s = result if warm else result.stats if result is not None else None
        prompt_n = s.n_prompt_tokens - s.n_cached_tokens if s else 0
        prompt_ms = 1000 * s.prefill_seconds if s else 0.0
        predicted_n = s.n_tokens if s else 0
        predicted_ms = 1000 * s.decode_seconds if s else 0.0
        stop_type = "none" if warm else "limit" if self.cut or (result is not None and result.finish_reason != "stop") else "eos"
        out = {
            "index": 0, "content": text, "tokens": [], "id_slot": 0, "stop": True, "model": self.model_name,
            "tokens_predicted": predicted_n, "tokens_evaluated": s.n_prompt_tokens if s else 0,
            "tokens_cached": (s.n_prompt_tokens + predicted_n) if s else 0, "truncated": False,
            "has_new_line": "\n" in text, "stop_type": stop_type, "stopping_word": "",
            "accepted_prediction_tokens": s.accepted_prediction_tokens if s else 0,
            "timings": {"prompt_n": prompt_n, "prompt_ms": prompt_ms,
                        "prompt_per_token_ms": prompt_ms / prompt_n if prompt_n else 0.0,
                        "prompt_per_second": 1000 * prompt_n / prompt_ms if prompt_ms else 0.0,
                        "predicted_n": predicted_n, "predicted_ms": predicted_ms,
                        "predicted_per_token_ms": predicted_ms / predicted_n if predicted_n else 0.0,
                        "predicted_per_second": 1000 * predicted_n / predicted_ms if predicted_ms else 0.0},
        }
        if self.fields is None:
            return out
        return {path: _at(out, path) for path in self.fields if _at(out, path) is not None}


def _at(doc: dict, path: str):
    """The value at a ``a/b`` path of ``doc`` (llama.cpp's response_fields), or None."""
    for key in path.split("/"):
        if not isinstance(doc, dict) or key not in doc:
            return None
        doc = doc[key]
    return doc


async def _infill_run(worker: EngineWorker, job: Job, shape: InfillShape, request: Request | None):
    """The job's events with the infill rules applied: ("piece", text), then ("done", result) or
    ("error", e), or ("gone", None) once the client left. A rule that ends the middle cancels the job."""
    async for kind, value in job_events(worker, job, request):
        if kind == "piece" and not shape.cut:
            text, stop = shape.stops.feed(value)
            if text:
                yield "piece", text
            if stop:  # the middle ends here: free the engine; its result still comes ("done")
                shape.cut = True
                worker.cancel(job)
                await run_in_threadpool(job.finished.wait, 60)
                yield "done", job.result
                return
        elif kind != "piece":
            yield kind, value
            return


async def _infill_events(worker: EngineWorker, job: Job, shape: InfillShape) -> AsyncIterator[str]:
    """llama.cpp's stream: ``data: {chunk}`` lines, the last with ``stop: true`` and the timings."""
    try:
        async for kind, value in _infill_run(worker, job, shape, None):
            if kind == "piece":
                yield "data: " + json.dumps(shape.chunk(value)) + "\n\n"
            elif kind == "done":
                yield "data: " + json.dumps(shape.body(value)) + "\n\n"
                return
            else:
                yield "data: " + json.dumps(error_body(value)) + "\n\n"
                return
    finally:
        worker.cancel(job)
