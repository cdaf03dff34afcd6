"""A suffix index over a token stream: where the context's tail occurred before, and what followed.

Where an answer repeats its context (an edited file, a quoted document, a
client's predicted output), the tokens that followed the longest earlier
occurrence of the context's tail are a near-certain continuation. SuffixDecoding
(arXiv 2411.04975) drafts from suffix trees for this; this index is the compact
form one request needs:

- every position of the stream is filed under the n tokens ending there, for
  n = 1..``max_ngram`` (a dict of lists, appended to: O(max_ngram) per token,
  no rebuild);
- a query takes the longest n-gram of the tail that occurred before, extends
  each match backwards to its full length (up to ``MAX_MATCH``), and returns
  the most recent few of the longest matches.

:func:`continuation_tree` turns those continuations into a small token tree
with counts: one chain where the text never branched, several where it did.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

MAX_MATCH = 64  # matches are measured back at most this far
RECENT = 32  # positions of one n-gram looked at per query (the most recent ones)


@dataclass(frozen=True)
class Match:
    """An earlier occurrence of the tail: it ends at stream position ``end`` and spans ``length`` tokens."""

    end: int
    length: int


class SuffixIndex:
    """Positions of a growing token stream, filed by the n-grams that end there."""

    def __init__(self, tokens: Sequence[int] = (), max_ngram: int = 8):
        if max_ngram < 1:
            raise ValueError("max_ngram must be at least 1")
        self.max_ngram = max_ngram
        self._buf = np.zeros(max(64, 2 * len(tokens)), dtype=np.int32)
        self._list: list[int] = []  # the same tokens as Python ints: tuple keys without conversions
        self._ends: dict[tuple[int, ...], list[int]] = {}
        self.extend(tokens)

    def __len__(self) -> int:
        return len(self._list)

    @property
    def tokens(self) -> np.ndarray:
        """The stream so far (a read-only view)."""
        view = self._buf[: len(self._list)]
        view.flags.writeable = False
        return view

    def append(self, token: int) -> None:
        """Add one token at the end: O(max_ngram), amortized over the buffer's doublings."""
        token = int(token)
        p = len(self._list)
        if p == self._buf.shape[0]:
            self._buf = np.concatenate([self._buf, np.zeros_like(self._buf)])
        self._buf[p] = token
        self._list.append(token)
        window = tuple(self._list[max(0, p + 1 - self.max_ngram) :])
        ends = self._ends
        for n in range(1, len(window) + 1):
            key = window[-n:]
            hit = ends.get(key)
            if hit is None:
                ends[key] = [p]
            else:
                hit.append(p)

    def extend(self, tokens: Sequence[int]) -> None:
        for tok in np.asarray(tokens, dtype=np.int64).tolist():
            self.append(tok)

    def find(self, tail: Sequence[int], max_matches: int = 4) -> list[Match]:
        """The longest earlier occurrences of ``tail``'s end that have a token after them, most recent
        first: the longest n-gram level found, then (at ``max_ngram``) each match's full length.
        Empty when not even the last token occurred before."""
        tail = list(tail[-MAX_MATCH:]) if not isinstance(tail, list) else tail[-MAX_MATCH:]
        size = len(self._list)
        for n in range(min(self.max_ngram, len(tail)), 0, -1):
            ends = self._ends.get(tuple(tail[-n:]))
            if not ends:
                continue
            cands = [e for e in ends[-RECENT:] if e + 1 < size]  # a continuation must exist
            if not cands:
                continue
            if n < self.max_ngram or len(tail) <= n:  # the match is exactly n long (else a longer level had hit)
                lengths = [n] * len(cands)
            else:
                lengths = self._full_lengths(np.asarray(cands), np.asarray(tail, dtype=np.int32), n)
            best = max(lengths)  # the longest matches only: a shorter one is a weaker guess, not a branch
            order = sorted((i for i in range(len(cands)) if lengths[i] == best), key=lambda i: -cands[i])
            return [Match(cands[i], best) for i in order[:max_matches]]
        return []

    def _full_lengths(self, ends: np.ndarray, tail: np.ndarray, known: int) -> list[int]:
        """How far back each match at ``ends`` agrees with ``tail`` (at least ``known``, at most MAX_MATCH)."""
        depth = min(MAX_MATCH, tail.size)
        back = np.arange(depth)  # 0 = the last token
        pos = ends[:, None] - back[None, :]  # [m, depth]
        valid = pos >= 0
        same = valid & (self._buf[np.maximum(pos, 0)] == tail[tail.size - 1 - back][None, :])
        same[:, :known] = True
        lengths = np.where(same.all(axis=1), depth, np.argmin(same, axis=1))
        return lengths.tolist()

    def continuation(self, match: Match, max_len: int) -> np.ndarray:
        """Up to ``max_len`` tokens that followed ``match`` in the stream."""
        return self._buf[match.end + 1 : min(match.end + 1 + max_len, len(self._list))]


@dataclass
class ContinuationTree:
    """Continuations of several matches merged into a tree below the root (node 0, no token of its own).

    ``count[i]`` matches pass through node i; ``match_len[i]`` is the longest of their match lengths.
    """

    tokens: np.ndarray  # [n] int32 (node 0: unused)
    parents: np.ndarray  # [n] int32, -1 for the root
    count: np.ndarray  # [n] int32
    match_len: np.ndarray  # [n] int32
    depth: np.ndarray  # [n] int32, root 0


def continuation_tree(index: SuffixIndex, matches: list[Match], max_depth: int) -> ContinuationTree:
    """The continuations of ``matches`` (each up to ``max_depth`` tokens) as one tree with counts."""
    conts = [tuple(index.continuation(m, max_depth).tolist()) for m in matches]
    if len(set(conts)) == 1:  # one chain (the common case): no merging to do
        chain, n = conts[0], len(conts[0])
        return ContinuationTree(np.array((0, *chain), dtype=np.int32), np.arange(-1, n, dtype=np.int32),
                                np.full(n + 1, len(matches), dtype=np.int32),
                                np.r_[0, np.full(n, max(m.length for m in matches))].astype(np.int32),
                                np.arange(n + 1, dtype=np.int32))
    tokens, parents, count, match_len, depth = [0], [-1], [len(matches)], [0], [0]
    children: dict[tuple[int, int], int] = {}
    for m, cont in zip(matches, conts):
        node = 0
        for d, tok in enumerate(cont, start=1):
            key = (node, tok)
            nxt = children.get(key)
            if nxt is None:
                nxt = len(tokens)
                children[key] = nxt
                tokens.append(tok)
                parents.append(node)
                count.append(0)
                match_len.append(0)
                depth.append(d)
            count[nxt] += 1
            match_len[nxt] = max(match_len[nxt], m.length)
            node = nxt
    return ContinuationTree(np.asarray(tokens, dtype=np.int32), np.asarray(parents, dtype=np.int32),
                            np.asarray(count, dtype=np.int32), np.asarray(match_len, dtype=np.int32),
                            np.asarray(depth, dtype=np.int32))
