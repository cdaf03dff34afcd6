"""From a surface's request to the engine: the one path every surface takes.

A surface maps its fields onto GenerateOptions' keywords (its own names, its own structure fields);
:func:`prepare` fills the server's default length, builds the options (checked there, once, against
the options table) and checks the request against the model before it waits for the engine. Any
broken rule raises a DovetailError, which each surface turns into its own error shape. A field no
surface model knows is refused the same way everywhere (:func:`refuse_unknown_fields`).
"""

from __future__ import annotations

from typing import Callable, Collection

from pydantic_core import PydanticCustomError
from starlette.concurrency import run_in_threadpool

from ..api import Dovetail
from ..engine import Request
from ..options import GenerateOptions


def refuse_unknown_fields(model, data, ignored: Collection[str] = ()):
    """A request body's check before its pydantic ``model`` reads it: a field that is neither the
    model's (or an alias) nor in ``ignored`` is a 400 naming it, never silence."""
    if isinstance(data, dict):
        known = set(model.model_fields) | {f.alias for f in model.model_fields.values() if f.alias} | set(ignored)
        unknown = [k for k in data if k not in known]
        if unknown:
            raise PydanticCustomError("unsupported_field", "unsupported field {field}: the server cannot honour it",
                                      {"field": repr(unknown[0])})
    return data


async def prepare(dt: Dovetail, tokens: list[int] | Callable[[int], list[int]], fields: dict,
                  default_max_tokens: int) -> Request:
    """The checked request of ``tokens`` with GenerateOptions keywords ``fields``; ``max_tokens``
    defaults to ``default_max_tokens`` and is capped at the context (a longer answer cannot fit).
    ``tokens`` may be a function of the answer's max_tokens (a fill-in-the-middle prompt is cut
    to leave it room)."""
    fields = dict(fields)
    max_tokens = fields.get("max_tokens")
    fields["max_tokens"] = default_max_tokens if max_tokens is None else max_tokens
    if isinstance(fields["max_tokens"], int) and fields["max_tokens"] > dt.target.n_ctx:
        fields["max_tokens"] = dt.target.n_ctx

    def build() -> Request:  # a JSON schema's grammar and the prompt's tokens take a moment: off the loop
        options = GenerateOptions(**fields)
        return dt.prepare(tokens(options.max_tokens) if callable(tokens) else tokens, options)

    return await run_in_threadpool(build)
