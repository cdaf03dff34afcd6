"""Fill-in-the-middle prompts: the model's FIM tokens from its GGUF, and the layout it was trained on.

A code model such as Qwen2.5-Coder completes the middle of a file from the text before the cursor
(``prefix``) and after it (``suffix``), and, at the repository level, from other files of the project
(``extra`` chunks). The prompt, as llama.cpp's server lays it out (the repository-level pattern of
Qwen2.5-Coder's report, arXiv 2409.12186)::

    [REPO]project\\n [SEP]file0\\n chunk0 [SEP]file1\\n chunk1 ... [SEP]filename\\n
    [BOS] [PRE] prefix prompt [SUF] suffix [MID]

The answer is the middle. A model without the repository tokens gets the chunks behind a plain-text
separator. What does not fit the context is cut: the prefix from its start, the suffix from its end,
the extra chunks from the oldest; the prefix keeps three quarters of the room the file may take.
Every token of this prompt is in the suffix index, so a middle that repeats code from anywhere in it
is proposed in long chains.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import llama_cpp
import numpy as np

from .errors import InvalidArgumentError

NULL = -1  # LLAMA_TOKEN_NULL
PROJECT = "myproject"  # the repository name llama.cpp's server sends
CURRENT_FILE = "filename"  # ... and the current file's
PLAIN_SEPARATOR = "\n\n--- snippet ---\n\n"  # between chunks, for a model without a file separator


@dataclass(frozen=True)
class FimTokens:
    """The FIM token ids a vocabulary declares (-1: none)."""

    pre: int
    suf: int
    mid: int
    pad: int
    rep: int  # the repository name's marker
    sep: int  # the file separator

    @classmethod
    def of(cls, vocab) -> "FimTokens":
        get = lambda name: int(getattr(llama_cpp, f"llama_vocab_fim_{name}")(vocab.handle))  # noqa: E731
        return cls(*(get(n) for n in ("pre", "suf", "mid", "pad", "rep", "sep")))

    @property
    def supported(self) -> bool:
        return NULL not in (self.pre, self.suf, self.mid)


@dataclass(frozen=True)
class Chunk:
    """Another file of the project (llama.cpp's ``input_extra`` element)."""

    text: str
    filename: str = "tmp"


def fim_tokens(target) -> FimTokens:
    """The target's FIM tokens; raises InvalidArgumentError when it has none."""
    fim = FimTokens.of(target.vocab)
    if not fim.supported:
        raise InvalidArgumentError(
            f"{target.path.name} has no fill-in-the-middle tokens (FIM prefix, suffix and middle): "
            "use a code model trained for it, such as --target qwen2.5-coder-0.5b")
    return fim


def infill_prompt(target, prefix: str, suffix: str, extra: Sequence[Chunk] = (), prompt: str = "",
                  max_tokens: int = 0) -> np.ndarray:
    """The FIM prompt's token ids (int32) for ``target``, cut to leave ``max_tokens`` of the context
    for the middle. ``prompt``: text that continues the prefix (llama.cpp's ``prompt`` field)."""
    fim = fim_tokens(target)
    for name, text in (("prefix", prefix), ("suffix", suffix), ("prompt", prompt)):
        if not isinstance(text, str):
            raise InvalidArgumentError(f"the FIM {name} must be text")
    tok = lambda text: target.tokenize(text, add_special=False, parse_special=False)  # noqa: E731
    head = tok(prefix + prompt) if prefix or prompt else np.zeros(0, np.int32)
    tail = tok(suffix) if suffix else np.zeros(0, np.int32)
    bos = [target.vocab.bos_token_id] if llama_cpp.llama_vocab_get_add_bos(target.vocab.handle) else []
    fixed = len(bos) + 3  # [BOS] PRE SUF MID
    reserve = min(max(int(max_tokens), 1), target.n_ctx // 2)  # the answer's room; a long one may fill the context
    room = target.n_ctx - reserve - fixed - 1
    if room < 2:
        raise InvalidArgumentError(f"the context ({target.n_ctx} tokens) leaves no room for a FIM prompt "
                                   f"and {max_tokens} new tokens")
    n_head = min(head.size, max(3 * room // 4, room - tail.size))  # the prefix keeps 3/4 when both are long
    n_tail = min(tail.size, room - n_head)
    head, tail = head[head.size - n_head:], tail[:n_tail]
    context = _extra_tokens(fim, tok, extra)
    context = context[max(0, context.size - (room - n_head - n_tail)):]  # the newest chunks, when cut
    parts = [context, np.array(bos + [fim.pre], np.int32), head, np.array([fim.suf], np.int32), tail,
             np.array([fim.mid], np.int32)]
    return np.concatenate([p.astype(np.int32, copy=False) for p in parts])


def _extra_tokens(fim: FimTokens, tok, extra: Sequence[Chunk]) -> np.ndarray:
    """The project's other files, before the FIM prefix."""
    out: list[np.ndarray] = []
    if fim.rep != NULL:
        out += [np.array([fim.rep], np.int32), tok(PROJECT + "\n")]
    for chunk in extra:
        if fim.sep != NULL:
            out += [np.array([fim.sep], np.int32), tok(chunk.filename + "\n")]
        else:
            out.append(tok(PLAIN_SEPARATOR))
        if chunk.text:
            out.append(tok(chunk.text))
    if fim.sep != NULL:
        out += [np.array([fim.sep], np.int32), tok(CURRENT_FILE + "\n")]
    return np.concatenate(out).astype(np.int32) if out else np.zeros(0, np.int32)
