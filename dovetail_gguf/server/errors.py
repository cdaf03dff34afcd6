"""The error shape of every surface: OpenAI's ``{"error": {message, type, param, code}}``."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from ..errors import DovetailError


def error_response(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, headers=headers,
                        content={"error": {"message": message, "type": kind, "param": None, "code": code}})


def error_body(e: BaseException) -> dict:
    """The error of a failed generation: its message for a DovetailError, none for a bug."""
    if isinstance(e, DovetailError):
        return {"error": {"message": str(e), "type": "invalid_request_error", "param": None, "code": None}}
    return {"error": {"message": "internal error in generation", "type": "server_error", "param": None, "code": None}}
