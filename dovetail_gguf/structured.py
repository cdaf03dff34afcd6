"""Structured output: the GBNF grammars behind ``json_schema``, ``json_object`` and forced tool
calls, and the parsing of tool calls out of an answer.

The grammars are llama.cpp's own: its JSON grammar, and its JSON-schema-to-GBNF
converter as llama-cpp-python ships it. They are text; the sampler compiles
them into a llama.cpp grammar state (llama_handles.GrammarState).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from .errors import InvalidArgumentError


def json_object_grammar() -> str:
    """Any JSON object (OpenAI's ``response_format: {"type": "json_object"}``)."""
    from llama_cpp.llama_grammar import JSON_GBNF

    return JSON_GBNF


def json_schema_grammar(schema: dict | str) -> str:
    """A grammar whose language is the JSON documents ``schema`` describes (llama.cpp's converter:
    most of JSON Schema, including $ref, enums, patterns and min/max items)."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    text = schema if isinstance(schema, str) else _dumps(schema)
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidArgumentError(f"the JSON schema is not valid JSON: {e}") from None
    if not isinstance(parsed, (dict, bool)):
        raise InvalidArgumentError("a JSON schema is an object (or true / false)")
    try:
        return json_schema_to_gbnf(json.dumps(parsed))
    except Exception as e:  # noqa: BLE001 - the converter raises bare Exceptions and KeyErrors for what it lacks
        raise InvalidArgumentError(f"the JSON schema cannot be turned into a grammar: {e}") from None


def _dumps(value: Any) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError) as e:
        raise InvalidArgumentError(f"the JSON schema cannot be serialised: {e}") from None


# ---------------------------------------------------------------------- tool calls
# Hermes-style tool calls, as Qwen2.5's template asks for them:
#   <tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>
_OPEN = "<tool_call>"
_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text of an object, as OpenAI returns it


def tool_call_grammar(tools: Sequence[Mapping], name: str | None = None) -> str:
    """A grammar for one tool call (``name``: that function; None: any of ``tools``), its arguments
    validating against the function's parameter schema."""
    options = []
    for tool in tools:
        fn = tool["function"]
        if name is None or fn["name"] == name:
            options.append({"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                            "properties": {"name": {"const": fn["name"]},
                                           "arguments": fn.get("parameters") or {"type": "object"}}})
    if not options:
        raise InvalidArgumentError(f"tool_choice names the function {name!r}, which is not among the tools")
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    body = re.sub(r"^root ::=", "tool-call ::=", json_schema_grammar(schema), count=1, flags=re.MULTILINE)
    return body + '\nroot ::= "<tool_call>\\n" tool-call "\\n</tool_call>"\n'


def could_be_tool_call(text: str, bare: bool = False) -> bool:
    """Whether an answer that starts with ``text`` may still be a tool call (a stream holds it back);
    ``bare``: a JSON object alone counts too (see :func:`parse_tool_calls`)."""
    head = text.lstrip()
    return head.startswith(_OPEN) or _OPEN.startswith(head) or (bare and head.startswith("{"))


class ToolCallHold:
    """A streamed answer to a request with tools: its start is held back while it may still be a tool
    call, then it streams as plain text. ``names``: the request's functions."""

    def __init__(self, names: Sequence[str]):
        self.names, self.held = tuple(names), ""

    def feed(self, piece: str) -> str | None:
        """The text to stream now, or None while the answer may still be a tool call."""
        self.held += piece
        if could_be_tool_call(self.held, bare=bool(self.names)):
            return None
        out, self.held = self.held, ""
        return out


def parse_tool_calls(text: str, names: Sequence[str] = ()) -> tuple[str, list[ToolCall]]:
    """(the text outside tool calls, the calls) of a model's answer; a block that is not a JSON
    object with a string ``name`` stays in the text. With ``names`` (the request's functions), an
    answer that is nothing but a JSON object ``{"name": one of names, "arguments": {...}}`` is a call
    too: small models often leave out the ``<tool_call>`` tags their template asks for."""
    if names and "<tool_call>" not in text:
        try:
            obj = json.loads(text)
        except ValueError:
            obj = None
        if isinstance(obj, dict) and obj.get("name") in names and isinstance(obj.get("arguments", {}), dict) \
                and set(obj) <= {"name", "arguments"}:
            return "", [ToolCall(obj["name"], json.dumps(obj.get("arguments", {}), ensure_ascii=False))]
    calls: list[ToolCall] = []
    kept: list[str] = []
    pos = 0
    for m in _CALL.finditer(text):
        try:
            obj = json.loads(m.group(1))
        except json.JSONDecodeError:
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            continue
        args = obj.get("arguments", {})
        if isinstance(args, str):  # some models quote the arguments: keep them if they are JSON
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                continue
        kept.append(text[pos : m.start()])
        pos = m.end()
        calls.append(ToolCall(obj["name"], json.dumps(args, ensure_ascii=False)))
    kept.append(text[pos:])
    return "".join(kept).strip() if calls else text, calls
