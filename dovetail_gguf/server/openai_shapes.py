"""The OpenAI API's request and response shapes, as the server reads and writes them.

Requests are pydantic models over :class:`SamplingRequest`'s generation fields,
typed here and mapped onto GenerateOptions' keywords (whose bounds and defaults
are the options table's): a field the server cannot honour is a 400 that names
it, a malformed value a 400 naming its field. Responses are built by :class:`ResponseShape` from a
finished (or streaming) generation: chat or text completion, whole or as chunks,
tool calls parsed out, logprobs in OpenAI's shape.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from ..options import one_of
from .options import refuse_unknown_fields
from ..structured import json_object_grammar, parse_tool_calls


# ---------------------------------------------------------------------- request shapes
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

    def structure(self) -> dict:
        """GenerateOptions keywords for this format (none for text)."""
        if self.type == "json_object":
            return {"grammar": json_object_grammar()}
        if self.type == "json_schema":
            return {"json_schema": self.json_schema.schema_ if self.json_schema.schema_ is not None else {}}
        return {}


# Request fields that change nothing in the answer: accepted and ignored. Any other field that is not
# one of the request model's own gets a 400 naming it, never silence.
IGNORED_FIELDS = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls"})


class StreamOptions(BaseModel):
    """OpenAI's ``stream_options``: ``include_usage`` adds a last chunk with ``usage`` (and ``choices: []``)."""

    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    include_obfuscation: bool = True  # OpenAI pads chunks against side channels; a local server has none to pad


class SamplingRequest(BaseModel):
    """The generation fields OpenAI's requests share (and llama.cpp's server's extras). Values are
    only typed here: their bounds and defaults are the options table's (dovetail_gguf.options), checked
    when :meth:`options_fields` becomes a GenerateOptions. None: not given."""

    model_config = ConfigDict(extra="ignore")  # only IGNORED_FIELDS get this far (see _known_fields)
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None  # negative: a random seed, as in OpenAI's API and llama.cpp
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = 1
    prediction: Prediction | None = None
    stream_options: StreamOptions | None = None
    # the rest of llama.cpp's sampling set (its server's names), in its chain's order
    logit_bias: dict[str, float] | None = None  # token id (as a string, as OpenAI sends it) -> bias
    repeat_penalty: float | None = None
    repeat_last_n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    # structured output: OpenAI's response_format, or llama.cpp's grammar / json_schema fields
    response_format: ResponseFormat | None = None
    grammar: str | None = None
    json_schema: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data):
        return refuse_unknown_fields(cls, data, IGNORED_FIELDS)

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

    def n_logprobs(self) -> int | None:
        """Alternatives per token to report, or None for no logprobs."""
        return None

    def options_fields(self, tool_grammar: str | None = None) -> dict:
        """This request as GenerateOptions keywords (fields not given are left to the table's defaults);
        ``tool_grammar``: the grammar a forced tool call brings. Raises InvalidArgumentError when two
        fields each set the answer's structure."""
        out = {k: getattr(self, k) for k in SAMPLING_FIELDS if getattr(self, k) is not None}
        if self.prediction is not None:
            out["prediction"] = self.prediction.text()
        if self.n_logprobs() is not None:
            out["logprobs"] = self.n_logprobs()
        formatted = self.response_format if self.response_format and self.response_format.type != "text" else None
        kind, _ = one_of(grammar=self.grammar, json_schema=self.json_schema, response_format=formatted,
                         tool_choice=tool_grammar)
        if kind == "grammar":
            out["grammar"] = self.grammar
        elif kind == "json_schema":
            out["json_schema"] = self.json_schema
        elif kind == "response_format":
            out.update(formatted.structure())
        elif kind == "tool_choice":
            out["grammar"] = tool_grammar
        return out


# request fields that are GenerateOptions fields under the same name
SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "min_p", "repeat_penalty",
                   "repeat_last_n", "presence_penalty", "frequency_penalty", "logit_bias")


class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCallIn(BaseModel):
    """A tool call of an earlier assistant turn, sent back by the client."""

    model_config = ConfigDict(extra="forbid")
    id: str | None = None
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(TextContent):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None  # None only for an assistant turn that called tools
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _content_or_calls(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise PydanticCustomError("content", "content is required (it may be null only for an assistant "
                                                 "message with tool_calls)")
        return self

    def text(self) -> str:
        return "" if self.content is None else super().text()

    def as_dict(self) -> dict:
        """The message for the chat template; tool-call arguments as objects (templates dump them as JSON)."""
        out: dict = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.function.name, "arguments": _json_or_text(c.function.arguments)}}
                                 for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            out["name"] = self.name
        return out


def _json_or_text(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: NamedFunction


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None

    @model_validator(mode="after")
    def _consistent(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise PydanticCustomError("top_logprobs", "top_logprobs needs logprobs: true")
        if self.tool_choice is not None and self.tool_choice != "none" and not self.tools:
            raise PydanticCustomError("tool_choice", "tool_choice needs tools")
        return self

    def n_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def active_tools(self) -> list[dict] | None:
        """The tool definitions for the template (none when tool_choice is "none")."""
        if not self.tools or self.tool_choice == "none":
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools]

    def forced_tool(self) -> tuple[bool, str | None]:
        """(must the answer be a tool call, the function it must call or None for any)."""
        if isinstance(self.tool_choice, NamedToolChoice):
            return True, self.tool_choice.function.name
        return self.tool_choice == "required", None


class CompletionRequest(SamplingRequest):
    prompt: str | list[int] | list[str] = Field(min_length=1)
    suffix: str | None = None  # fill in the middle between prompt and suffix (a model with FIM tokens)
    logprobs: int | None = None  # alternatives per token

    def n_logprobs(self) -> int | None:
        return self.logprobs

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], str):
            if len(v) != 1:
                raise ValueError("one prompt per request (a list of several strings would need n > 1)")
            v = v[0]
        if isinstance(v, str) and not v:
            raise ValueError("the prompt is empty")
        return v


# ---------------------------------------------------------------------- response shapes
def finish_reason(result) -> str:
    return "length" if result.finish_reason == "context_full" else result.finish_reason


def usage_of(result) -> dict:
    s = result.stats
    return {"prompt_tokens": s.n_prompt_tokens, "completion_tokens": s.n_tokens, "total_tokens": s.n_prompt_tokens + s.n_tokens,
            "completion_tokens_details": {"accepted_prediction_tokens": s.accepted_prediction_tokens,
                                          "rejected_prediction_tokens": s.rejected_prediction_tokens}}


def extension_of(result) -> dict:
    s = result.stats
    return {"tau": s.mean_accepted_tokens, "tokens_per_second": s.tokens_per_second, "rounds": s.rounds}


class ResponseShape:
    """The OpenAI response shapes of one request: chat or text completion, whole or as chunks."""

    def __init__(self, model_name: str, chat: bool, include_usage: bool = False, tools: bool = False,
                 token_bytes=None, tool_names: Sequence[str] = ()):
        self.chat, self.model = chat, model_name
        self.include_usage = include_usage  # stream_options.include_usage: a last chunk carries the usage
        self.tools = tools  # the answer may hold tool calls: parsed out of the whole text
        self.tool_names = tuple(tool_names)
        self._token_bytes = token_bytes  # token id -> bytes, for logprobs
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def body(self, choice: dict | None, streaming: bool, result=None) -> dict:
        obj = ("chat.completion.chunk" if streaming else "chat.completion") if self.chat else "text_completion"
        out = {"id": self.id, "object": obj, "created": self.created, "model": self.model,
               "choices": [] if choice is None else [choice]}
        if result is not None:
            out["usage"], out["dovetail"] = usage_of(result), extension_of(result)
        elif streaming and self.include_usage:  # as OpenAI: every other chunk says usage: null
            out["usage"] = None
        return out

    def usage_chunk(self, result) -> dict:
        """The chunk after the finish chunk that stream_options.include_usage asks for: no choices, the usage."""
        return self.body(None, True, result)

    def message(self, result) -> tuple[dict, str]:
        """The assistant message of a finished chat answer (tool calls parsed out), and its finish reason."""
        content, calls = parse_tool_calls(result.text, self.tool_names) if self.tools else (result.text, [])
        if not calls:
            return {"role": "assistant", "content": result.text}, finish_reason(result)
        return ({"role": "assistant", "content": content or None,
                 "tool_calls": [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                                 "function": {"name": c.name, "arguments": c.arguments}} for c in calls]},
                "tool_calls")

    def logprobs(self, result) -> dict | None:
        """OpenAI's logprobs object of a finished answer (chat or completions shape), or None."""
        if result.logprobs is None:
            return None

        def text(tok: int) -> str:
            return self._token_bytes(tok).decode("utf-8", errors="replace")

        if self.chat:
            return {"content": [
                {"token": text(r.token), "logprob": r.logprob, "bytes": list(self._token_bytes(r.token)),
                 "top_logprobs": [{"token": text(t), "logprob": lp, "bytes": list(self._token_bytes(t))}
                                  for t, lp in r.top]}
                for r in result.logprobs]}
        offsets, pos = [], 0
        for r in result.logprobs:
            offsets.append(pos)
            pos += len(text(r.token))
        return {"tokens": [text(r.token) for r in result.logprobs],
                "token_logprobs": [r.logprob for r in result.logprobs],
                "top_logprobs": [{text(t): lp for t, lp in r.top} for r in result.logprobs],
                "text_offset": offsets}

    def whole(self, result) -> dict:
        if self.chat:
            message, reason = self.message(result)
            choice = {"index": 0, "message": message, "finish_reason": reason, "logprobs": self.logprobs(result)}
        else:
            choice = {"index": 0, "text": result.text, "finish_reason": finish_reason(result), "logprobs": self.logprobs(result)}
        return self.body(choice, False, result)

    def last_chunk(self, result, first: bool) -> dict:
        """The finish chunk: with a tools request, the whole answer (content or tool calls), else
        empty; the logprobs of the whole answer when asked for."""
        if self.chat and self.tools:
            message, reason = self.message(result)
            delta = {k: v for k, v in message.items() if v is not None}
            choice = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": self.logprobs(result)}
            if "tool_calls" in delta:
                delta["tool_calls"] = [{"index": i, **c} for i, c in enumerate(delta["tool_calls"])]
            return self.body(choice, True)
        out = self.chunk("", finish_reason(result), first)
        out["choices"][0]["logprobs"] = self.logprobs(result)
        return out

    def chunk(self, text: str, reason: str | None, first: bool, result=None) -> dict:
        if self.chat:
            delta = {"content": text} if text or reason is None else {}
            if first:
                delta["role"] = "assistant"
            choice = {"index": 0, "delta": delta, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
        return self.body(choice, True, result)
