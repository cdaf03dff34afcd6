"""The generation fields of a request, whatever its surface: their checks, and the one mapping to the
engine's options.

A surface's request model subclasses :class:`SamplingRequest` (or a surface with other names fills one
in) and calls :func:`generation_options`, so a field means the same, and is checked the same, everywhere.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError
from starlette.concurrency import run_in_threadpool

from ..api import Dovetail
from ..errors import InvalidArgumentError
from ..structured import json_object_grammar, json_schema_grammar

MAX_STOPS = 4  # as OpenAI's API
MAX_STOP_CHARS = 256


class TextPart(BaseModel):
    """One element of OpenAI's content-part array; only text parts are accepted."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class TextContent(BaseModel):
    """A ``content`` field in OpenAI's shape: a string or an array of text parts."""

    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class Prediction(TextContent):
    """OpenAI's Predicted Outputs: ``{"type": "content", "content": str | [text parts]}``."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["content"]


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None  # the output always matches the schema: a grammar enforces it


class ResponseFormat(BaseModel):
    """OpenAI's ``response_format``: text, any JSON object, or JSON validating against a schema."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise PydanticCustomError("json_schema", "response_format of type json_schema needs a json_schema")
        return self

    def grammar(self) -> str | None:
        if self.type == "json_object":
            return json_object_grammar()
        if self.type == "json_schema":
            return json_schema_grammar(self.json_schema.schema_ if self.json_schema.schema_ is not None else {})
        return None


# Request fields that change nothing in the answer: accepted and ignored. Any other field that is not
# one of the request model's own gets a 400 naming it, never silence.
IGNORED_FIELDS = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls"})


class StreamOptions(BaseModel):
    """OpenAI's ``stream_options``: ``include_usage`` adds a last chunk with ``usage`` (and ``choices: []``)."""

    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    include_obfuscation: bool = True  # OpenAI pads chunks against side channels; a local server has none to pad


class SamplingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # only IGNORED_FIELDS get this far (see _known_fields)
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None  # negative: a random seed, as in OpenAI's API and llama.cpp
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = 1
    prediction: Prediction | None = None
    stream_options: StreamOptions | None = None
    # the rest of llama.cpp's sampling set (its server's names), in its chain's order
    logit_bias: dict[str, float] | None = None  # token id (as a string, as OpenAI sends it) -> bias in [-100, 100]
    repeat_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    repeat_last_n: int = Field(default=64, ge=-1)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    top_k: int = Field(default=0, ge=0)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    # structured output: OpenAI's response_format, or llama.cpp's grammar / json_schema fields
    response_format: ResponseFormat | None = None
    grammar: str | None = None
    json_schema: dict[str, Any] | None = None

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, v):
        for key, bias in (v or {}).items():
            if not key.lstrip("-").isdigit():
                raise ValueError(f"keys are token ids, got {key!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"biases are in [-100, 100], got {bias}")
        return v

    @model_validator(mode="after")
    def _one_structure(self):
        given = [name for name in ("grammar", "json_schema") if getattr(self, name) is not None]
        if self.response_format is not None and self.response_format.type != "text":
            given.append("response_format")
        if len(given) > 1:
            raise PydanticCustomError("structure", "give one of {fields}, not several", {"fields": " / ".join(given)})
        return self

    def structure(self) -> str | None:
        """The grammar the answer must match, if any (raises InvalidArgumentError for a bad schema)."""
        if self.grammar is not None:
            return self.grammar
        if self.json_schema is not None:
            return json_schema_grammar(self.json_schema)
        return self.response_format.grammar() if self.response_format is not None else None

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data):
        if isinstance(data, dict):
            known = set(cls.model_fields) | {f.alias for f in cls.model_fields.values() if f.alias} | IGNORED_FIELDS
            unknown = [k for k in data if k not in known]
            if unknown:
                raise PydanticCustomError("unsupported_field", "unsupported field {field}: the server cannot honour it",
                                          {"field": repr(unknown[0])})
        return data

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise PydanticCustomError("stream_options", "stream_options is only allowed when stream is true")
        return self

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int) -> int:
        if v != 1:
            raise ValueError("only n = 1 is supported")
        return v

    @field_validator("stop")
    @classmethod
    def _bounded_stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop strings are at most {MAX_STOP_CHARS} characters")
        return v

    def n_logprobs(self) -> int | None:
        """Alternatives per token to report, or None for no logprobs."""
        return None


async def generation_options(dt: Dovetail, req: SamplingRequest, tokens: list[int], default_max_tokens: int,
                             grammar: str | None = None) -> dict:
    """The ``Dovetail.options`` keywords of ``req`` on the prompt ``tokens`` (``grammar``: one a forced
    tool call brings), checked before the request waits for the engine: a prompt that cannot fit, bad
    sampling settings, token ids outside the vocabulary and a grammar llama.cpp refuses raise a
    DovetailError (a 400)."""
    max_tokens = min(req.max_tokens or default_max_tokens, dt.target.n_ctx)  # capped at the context
    structure = req.structure()
    if grammar is not None and structure is not None:
        raise InvalidArgumentError("a forced tool call and a response format / grammar cannot be combined")
    opts = dict(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, seed=req.seed, stop=req.stop,
                prediction=req.prediction.text() if req.prediction is not None else None,
                top_k=req.top_k, min_p=req.min_p, repeat_penalty=req.repeat_penalty,
                repeat_last_n=req.repeat_last_n, presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty,
                logit_bias={int(k): v for k, v in (req.logit_bias or {}).items()},
                grammar=grammar if grammar is not None else structure, logprobs=req.n_logprobs())
    dt.engine.check_prompt(tokens)
    await run_in_threadpool(dt.engine.check_options, dt.options(**opts))
    return opts
