"""The error shape of every surface: OpenAI's ``{"error": {message, type, param, code}}``."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from ..errors import DovetailError


def openai_error(message: str, kind: str = "invalid_request_error", code: str | None = None) -> dict:
    """OpenAI's error object, the one place it is built."""
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def error_response(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, headers=headers, content=openai_error(message, kind, code))


def failed_response(e: BaseException) -> JSONResponse:
    """The whole-response answer to a failed generation: 400 for a DovetailError, 500 for a bug."""
    return JSONResponse(status_code=400 if isinstance(e, DovetailError) else 500, content=error_body(e))


def error_body(e: BaseException) -> dict:
    """The error of a failed generation: its message for a DovetailError, none for a bug."""
    if isinstance(e, DovetailError):
        return openai_error(str(e))
    return openai_error("internal error in generation", "server_error")
