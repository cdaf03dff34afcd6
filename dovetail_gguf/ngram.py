"""Free draft candidates: continuations of the last few tokens found earlier in the context.

Prompt lookup (n-gram) drafting costs no model: if the last ``n`` tokens of the
context appeared before, the tokens that followed them then are a likely
continuation now (code that repeats a signature, an answer that quotes its
question). The engine adds such a chain to the draft tree as one more branch,
so one verification covers both; with no draft model it is a mode of its own.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def lookup(context: np.ndarray, max_len: int, max_ngram: int = 4, min_ngram: int = 2) -> np.ndarray:
    """Up to ``max_len`` tokens that followed the most recent earlier occurrence of the context's
    last n tokens, trying n = ``max_ngram`` down to ``min_ngram``; empty when none matches.

    ``context`` is every token so far, the last one included (int32, 1-D).
    """
    size = context.shape[0]
    if max_len < 1:
        return context[:0]
    for n in range(min(max_ngram, size - 1), min_ngram - 1, -1):
        # windows starting at 0 .. size-n-1: each has at least one token after it
        windows = sliding_window_view(context[: size - 1], n)  # [size - n, n]
        hits = np.flatnonzero((windows == context[size - n :]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n  # the most recent match
            return context[start : start + max_len]
    return context[:0]


def merge_chain(tokens: np.ndarray, parents: np.ndarray, chain: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A tree (node 0 the root, parents before children) with ``chain`` added below the root as a path.

    Nodes the tree already has are shared; the rest are appended. Returns
    (tokens, parents, chain_nodes): the node index of every chain token.
    """
    tokens, parents = list(map(int, tokens)), list(map(int, parents))
    children: dict[int, dict[int, int]] = {}
    for i in range(1, len(tokens)):
        children.setdefault(parents[i], {})[tokens[i]] = i
    node, nodes = 0, []
    for tok in map(int, chain):
        nxt = children.get(node, {}).get(tok)
        if nxt is None:
            nxt = len(tokens)
            tokens.append(tok)
            parents.append(node)
            children.setdefault(node, {})[tok] = nxt
        nodes.append(nxt)
        node = nxt
    return (np.asarray(tokens, dtype=np.int32), np.asarray(parents, dtype=np.int32),
            np.asarray(nodes, dtype=np.int64))
