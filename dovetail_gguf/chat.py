"""Chat prompts: a GGUF's chat template rendered in a sandbox, then tokenized so user text stays text.

One function, :func:`chat_tokens`, turns messages into token ids for every
caller: the API, the CLI, the server and training data. Only the template's own
markers (``<|im_start|>``, ...) become control tokens. Text inside a message
that looks like a marker is tokenized as plain text, so a user cannot inject a
role or end a turn by typing one. (llama.cpp's server parses special tokens in
the whole rendered prompt, so there such text becomes real control tokens.)
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

import numpy as np

from .errors import InvalidArgumentError

if TYPE_CHECKING:
    from .llama_handles import Vocab
    from .target import Target

Message = Mapping[str, str]

MAX_RENDERED_CHARS = 4_000_000  # a template may not blow up memory
MAX_RENDER_SECONDS = 5.0  # ... nor loop for long (checked between output chunks)
_SENTINEL = "\ue000dovetail-message-{}\ue001"  # private-use characters: no template writes these


def check_messages(messages: Iterable[Message]) -> list[dict]:
    """The messages as a list of {'role', 'content'} dicts (a generator is read once); raises for bad ones.

    An assistant message that carries ``tool_calls`` may have no content (None becomes "")."""
    if isinstance(messages, (str, bytes, Mapping)):
        raise InvalidArgumentError("messages must be a list of {'role': ..., 'content': ...} objects")
    try:
        items = list(messages)
    except TypeError as e:
        raise InvalidArgumentError("messages must be a list of {'role': ..., 'content': ...} objects") from e
    if not items:
        raise InvalidArgumentError("a chat needs at least one message")
    out = []
    for i, m in enumerate(items):
        if isinstance(m, Mapping) and m.get("content") is None and m.get("tool_calls"):
            m = {**m, "content": ""}
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise InvalidArgumentError(f"message {i} needs string 'role' and 'content' fields")
        out.append({**m, "role": m["role"], "content": m["content"]})
    return out


def supports_tools(template: str | None) -> bool:
    """Whether a chat template renders tool definitions (it reads a ``tools`` variable)."""
    return isinstance(template, str) and "tools" in template


def render_chat(template: str | None, messages: Iterable[Message], bos: str = "", eos: str = "",
                tools: Sequence[Mapping] | None = None) -> str:
    """Render chat messages with a GGUF's Jinja chat template, ready for the assistant's turn.

    ``tools``: OpenAI-shaped tool definitions, passed to the template as ``tools``.

    The template runs in Jinja's immutable sandbox (ranges capped), with its
    output capped at ``MAX_RENDERED_CHARS`` and its time at ``MAX_RENDER_SECONDS``.
    """
    if not isinstance(template, str) or not template:
        raise InvalidArgumentError("this model has no chat template; use plain generation instead")
    msgs = check_messages(messages)
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

    def raise_exception(msg: str):
        raise InvalidArgumentError(f"chat template: {msg}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    parts, size, t0 = [], 0, time.monotonic()
    try:
        for chunk in env.from_string(template).generate(
            messages=msgs, add_generation_prompt=True, bos_token=bos, eos_token=eos,
            **({"tools": list(tools)} if tools else {})
        ):
            parts.append(chunk)
            size += len(chunk)
            if size > MAX_RENDERED_CHARS:
                raise InvalidArgumentError(f"the chat template's output passed {MAX_RENDERED_CHARS:,} characters")
            if time.monotonic() - t0 > MAX_RENDER_SECONDS:
                raise InvalidArgumentError(f"the chat template ran longer than {MAX_RENDER_SECONDS:g} s")
    except (TemplateError, SecurityError, OverflowError, MemoryError, RecursionError, TypeError, ValueError) as e:
        if isinstance(e, InvalidArgumentError):
            raise
        raise InvalidArgumentError(f"the model's chat template failed: {type(e).__name__}: {e}") from e
    return "".join(parts)


def chat_tokens(vocab: "Vocab | Target", messages: Iterable[Message], tools: Sequence[Mapping] | None = None) -> np.ndarray:
    """Token ids of ``messages`` rendered with the model's chat template (int32).

    ``vocab``: the model's :class:`~dovetail_gguf.llama_handles.Vocab` (a
    :class:`~dovetail_gguf.target.Target` has the same methods).

    The template is rendered with a placeholder in place of each message's
    content; the template's text between placeholders is tokenized with
    special tokens parsed, each content without. If a template transforms the
    content so the placeholders do not survive, the whole text is tokenized at
    once, which is refused when some content holds special-token text.
    """
    msgs = check_messages(messages)
    facts = vocab.facts
    bos = vocab.detokenize_special(facts.bos_token_id) if facts.bos_token_id is not None else ""
    eos = vocab.detokenize_special(facts.eos_token_id) if facts.eos_token_id is not None else ""
    if tools and not supports_tools(vocab.chat_template):
        raise InvalidArgumentError("this model's chat template has no tool support")
    # tool definitions and earlier tool calls are rendered as template text (markers parsed): no marker text
    rendered = [json.dumps(list(tools or []), ensure_ascii=False)] + [
        json.dumps(m["tool_calls"], ensure_ascii=False, default=str) for m in msgs if m.get("tool_calls")]
    if any(_has_special_text(vocab, text) for text in rendered):
        raise InvalidArgumentError("tool definitions and tool calls may not contain special-token text such as "
                                   f"{vocab.detokenize_special(facts.eos_token_id or 0)!r}")
    # a placeholder per non-empty content (templates test content for emptiness)
    marked = [{**m, "content": _SENTINEL.format(i) if m["content"] else ""} for i, m in enumerate(msgs)]
    text = render_chat(vocab.chat_template, marked, bos, eos, tools)
    add_bos = not (bos and text.startswith(bos))
    pieces = _split_on_sentinels(text, [i for i, m in enumerate(msgs) if m["content"]])
    if pieces is None:  # the template rewrote the content: one tokenization of the real rendering
        for m in msgs:
            if _has_special_text(vocab, m["content"]):
                raise InvalidArgumentError("this model's chat template transforms message text, so a message "
                                           "may not contain special-token text such as "
                                           f"{vocab.detokenize_special(facts.eos_token_id or 0)!r}")
        full = render_chat(vocab.chat_template, msgs, bos, eos, tools)
        return vocab.tokenize(full, add_special=add_bos, parse_special=True)
    out = []
    for i, (template_text, msg_index) in enumerate(pieces):
        if template_text:
            out.append(vocab.tokenize(template_text, add_special=add_bos and i == 0, parse_special=True))
        elif i == 0 and add_bos:
            out.append(vocab.tokenize("", add_special=True, parse_special=False))
        if msg_index is not None and msgs[msg_index]["content"]:
            out.append(vocab.tokenize(msgs[msg_index]["content"], add_special=False, parse_special=False))
    return np.concatenate(out).astype(np.int32) if out else np.zeros(0, dtype=np.int32)


def _split_on_sentinels(text: str, indices: Sequence[int]) -> list[tuple[str, int | None]] | None:
    """[(template text, index of the message that follows it or None)], or None if a placeholder of
    one of ``indices`` is missing, repeated or out of order."""
    out, pos = [], 0
    for i in indices:
        mark = _SENTINEL.format(i)
        at = text.find(mark, pos)
        if at < 0 or text.count(mark) != 1:
            return None
        out.append((text[pos:at], i))
        pos = at + len(mark)
    if "\ue000" in text[pos:]:
        return None
    out.append((text[pos:], None))
    return out


def _has_special_text(vocab: "Vocab | Target", text: str) -> bool:
    plain = vocab.tokenize(text, add_special=False, parse_special=False)
    parsed = vocab.tokenize(text, add_special=False, parse_special=True)
    return plain.shape != parsed.shape or bool((plain != parsed).any())


__all__: Sequence[str] = ("Message", "check_messages", "render_chat", "chat_tokens")
