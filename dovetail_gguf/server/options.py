"""From a surface's request to the engine: the one path every surface takes.

A surface maps its fields onto GenerateOptions' keywords (its own names, its own structure fields);
:func:`prepare` fills the server's default length, builds the options (checked there, once, against
the options table) and checks the request against the model before it waits for the engine. Any
broken rule raises a DovetailError, which each surface turns into its own error shape.
"""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool

from ..api import Dovetail
from ..engine import Request
from ..options import GenerateOptions


async def prepare(dt: Dovetail, tokens: list[int], fields: dict, default_max_tokens: int) -> Request:
    """The checked request of ``tokens`` with GenerateOptions keywords ``fields``; ``max_tokens``
    defaults to ``default_max_tokens`` and is capped at the context (a longer answer cannot fit)."""
    fields = dict(fields)
    max_tokens = fields.get("max_tokens")
    fields["max_tokens"] = default_max_tokens if max_tokens is None else max_tokens
    if isinstance(fields["max_tokens"], int) and fields["max_tokens"] > dt.target.n_ctx:
        fields["max_tokens"] = dt.target.n_ctx

    def build() -> Request:  # a JSON schema's grammar and the prediction's tokens take a moment: off the loop
        return dt.prepare(tokens, GenerateOptions(**fields))

    return await run_in_threadpool(build)
