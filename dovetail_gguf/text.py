"""Tokens to text as they are generated: UTF-8 safe pieces and stop strings."""

from __future__ import annotations

import codecs
from typing import Callable, Sequence


class Detokenizer:
    """Turns a stream of token byte pieces into text, never splitting a UTF-8 character.

    ``push`` returns the text that is complete so far; bytes of a character that
    is not finished yet wait for the next token. ``flush`` returns what is left
    (an unfinished character at the very end becomes U+FFFD).
    """

    def __init__(self, token_bytes: Callable[[int], bytes]):
        self._token_bytes = token_bytes
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self._decoder.decode(self._token_bytes(int(token)))

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


class StopMatcher:
    """Finds user stop strings in streamed text, even across token boundaries.

    ``feed`` returns (text safe to emit, stopped). Text that could still be the
    start of a stop string is held back until it is ruled out.
    """

    def __init__(self, stops: Sequence[str] = ()):
        self.stops = [s for s in stops if s]
        self._held = ""
        self._hold = max((len(s) for s in self.stops), default=1) - 1

    def feed(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        buf = self._held + text
        cut = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self._held = ""
            return buf[:cut], True
        keep = 0
        for s in self.stops:  # longest suffix of buf that is a proper prefix of a stop string
            for k in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:k]):
                    keep = k
                    break
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held
