"""Free draft candidates: continuations of the last few tokens found earlier in the context.

Prompt lookup (n-gram) drafting costs no model: if the last ``n`` tokens of the
context appeared before, the tokens that followed them then are a likely
continuation now (code that repeats a signature, an answer that quotes its
question). The engine adds such a chain to the draft tree as one more branch,
so one verification covers both; with no draft model it is a mode of its own.
"""

from __future__ import annotations

import numpy as np


def lookup(context: np.ndarray, max_len: int, max_ngram: int = 4, min_ngram: int = 2) -> np.ndarray:
    """Up to ``max_len`` tokens that followed the most recent earlier occurrence of the context's
    last n tokens, trying n = ``max_ngram`` down to ``min_ngram``; empty when none matches.

    ``context`` is every token so far, the last one included (int32, 1-D).
    """
    size = context.shape[0]
    if max_len < 1 or size < 2:
        return context[:0]
    # an earlier match ends where the last token occurred before: only those places are compared
    ends = np.flatnonzero(context[: size - 1] == context[size - 1])  # each has a token after it
    for n in range(min(max_ngram, size - 1), min_ngram - 1, -1):
        hits = ends[ends >= n - 1]  # room for n tokens up to the end
        for back in range(1, n):
            hits = hits[context[hits - back] == context[size - 1 - back]]
        if hits.size:
            start = int(hits[-1]) + 1  # the most recent match
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
