"""Incremental detokenization and stop strings."""

from __future__ import annotations

import pytest

from dovetail_gguf.text import Detokenizer, StopMatcher


def test_multibyte_characters_are_never_split(target):
    text = " Héllo wörld, 你好世界 🦙🚀 naïve café — ✓"
    tokens = target.tokenize(text, add_special=False)
    pieces = [target.token_bytes(int(t)) for t in tokens]
    assert any(len(p) and not _is_complete_utf8(p) for p in pieces), "want a token that splits a character"
    detok = Detokenizer(target.token_bytes)
    out = [detok.push(int(t)) for t in tokens] + [detok.flush()]
    assert all("\ufffd" not in piece for piece in out)
    assert "".join(out) == text


def _is_complete_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


@pytest.mark.parametrize(
    "chunks, stops, emitted, stopped",
    [
        (["Hello wor", "ld! END", "more"], ["END"], "Hello world! ", True),
        (["abc", "E", "N", "D"], ["END"], "abc", True),
        (["abc", "E", "N", "x"], ["END"], "abcENx", False),
        (["one\n\nUser:", " hi"], ["\nUser:", "\n\n"], "one", True),
        (["no stops here"], [], "no stops here", False),
    ],
)
def test_stop_strings_across_chunks(chunks, stops, emitted, stopped):
    m = StopMatcher(stops)
    out, hit = [], False
    for c in chunks:
        piece, hit = m.feed(c)
        out.append(piece)
        if hit:
            break
    if not hit:
        out.append(m.flush())
    assert "".join(out) == emitted
    assert hit == stopped
