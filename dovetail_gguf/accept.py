"""Choosing tokens from target logits: sampling settings, the sampler, and lossless tree acceptance.

Numpy over logits rows; the only llama.cpp object here is an optional grammar
state (llama_handles.GrammarState), asked which tokens it allows.

The sampler applies llama.cpp's default chain, in its order: logit bias,
repetition penalties (over the last ``repeat_last_n`` tokens of the context,
prompt included), then top-k, top-p, min-p (computed at temperature 1), then
temperature, then one draw. Greedy (temperature 0) takes the argmax after bias
and penalties. A grammar keeps only the tokens it allows (see :meth:`Sampler.choose`).
The candidate steps work on the few tokens they keep, never sorting the vocabulary.

Acceptance walks the verified tree from its root: at each node the sampler
chooses the target's token exactly as plain decoding would (with that node's
own context: the committed tokens plus the node's ancestors); if a child of
the node carries that token the walk descends, else the token is the round's
bonus. Every emitted token is therefore drawn from the target's distribution
given its own prefix: the output law is the target's, whatever was drafted.
For trees whose children are chosen deterministically (top-k drafts, suffix
matches) this is the same law as SpecInfer's multi-candidate rejection
sampling with one-point draft distributions (accept child x with p(x), else
renormalise without x), and the same acceptance rate, with one uniform draw
per emitted token. So with a fixed seed, speculative and plain decoding draw
the same numbers, and where their logits agree bit for bit (exact mode) they
give the same tokens under sampling too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from .errors import InvalidArgumentError

@dataclass(frozen=True)
class SamplingParams:
    """The sampler's settings, with llama.cpp's meanings (temperature 0: greedy). Built from a checked
    :class:`~dovetail_gguf.options.GenerateOptions` (its ``sampling()``); the bounds live there."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None
    min_p: float = 0.0  # keep tokens with p >= min_p * p(likeliest); 0: off
    repeat_penalty: float = 1.0  # > 1 divides positive logits (multiplies negative ones) of recent tokens
    repeat_last_n: int = 64  # how many recent tokens the penalties look at; 0: none, -1: the whole context
    presence_penalty: float = 0.0  # subtracted once from the logit of every recent token
    frequency_penalty: float = 0.0  # subtracted per occurrence
    logit_bias: Mapping[int, float] = field(default_factory=dict)  # token id -> added to its logit

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        return self.repeat_last_n != 0 and (
            self.repeat_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0)

    @property
    def penalty_window(self) -> int:
        """How many recent tokens the penalties see (0: no penalty applies)."""
        if not self.penalized:
            return 0
        return 1 << 30 if self.repeat_last_n == -1 else self.repeat_last_n

    @property
    def adjusts_logits(self) -> bool:
        return self.penalized or bool(self.logit_bias)


# ---------------------------------------------------------------------- the chain, as functions
def adjust_logits(logits: np.ndarray, params: SamplingParams, recent: np.ndarray) -> np.ndarray:
    """Logit bias, then llama.cpp's penalties over the ``recent`` tokens; ``logits`` itself when neither applies."""
    x = logits
    if params.logit_bias:
        x = np.array(logits, dtype=np.float32)
        ids = np.fromiter(params.logit_bias.keys(), dtype=np.int64)
        x[ids] += np.fromiter(params.logit_bias.values(), dtype=np.float32)
    if params.penalized and recent.size:
        ids, counts = np.unique(recent, return_counts=True)
        if x is logits:
            x = np.array(logits, dtype=np.float32)
        v = x[ids]
        if params.repeat_penalty != 1.0:
            v = np.where(v <= 0, v * params.repeat_penalty, v / params.repeat_penalty)
        x[ids] = v - counts * params.frequency_penalty - params.presence_penalty
    return x


def candidates(x: np.ndarray, params: SamplingParams) -> tuple[np.ndarray | None, np.ndarray]:
    """The tokens top-k, top-p and min-p keep from logits ``x``, and their unnormalised
    probabilities at the sampling temperature: (ids, weights), ids None meaning the whole vocabulary."""
    n = x.shape[0]
    ids: np.ndarray | None = None
    v = x
    if 0 < params.top_k < n:
        ids = np.argpartition(x, n - params.top_k)[n - params.top_k:]
        v = x[ids]
    top = float(v.max())
    if params.top_p < 1.0:
        e = np.exp(v - top)
        total = float(e.sum(dtype=np.float64))
        keep = _nucleus(v, e, total, params.top_p)
        ids = keep if ids is None else ids[keep]
        v = x[ids]
    if params.min_p > 0.0:
        keep = np.flatnonzero(v >= top + math.log(params.min_p))
        ids = keep if ids is None else ids[keep]
        v = x[ids]
    w = np.exp((v.astype(np.float64) - top) / params.temperature)
    return ids, w


def _nucleus(v: np.ndarray, e: np.ndarray, total: float, top_p: float) -> np.ndarray:
    """Indices into ``v`` of the smallest set of likeliest tokens whose mass reaches ``top_p``:
    sorts only the head, widening it until it holds that mass."""
    n = v.shape[0]
    m = min(n, 64)
    while True:
        head = np.argsort(-v)[:m] if m >= n else np.argpartition(-v, m - 1)[:m]
        head = head[np.argsort(-v[head], kind="stable")]
        cum = np.cumsum(e[head], dtype=np.float64) / total
        if cum[-1] >= top_p or m >= n:
            return head[: min(m, int(np.searchsorted(cum, top_p)) + 1)]
        m = min(n, m * 8)


def _draw(w: np.ndarray, u: float) -> int:
    """Index of the draw with uniform ``u`` from weights ``w`` (inverse CDF)."""
    cdf = np.cumsum(w)
    return min(int(np.searchsorted(cdf, u * cdf[-1], side="right")), w.shape[0] - 1)


# ---------------------------------------------------------------------- acceptance
@dataclass(frozen=True)
class Acceptance:
    path: np.ndarray  # accepted node indices, root first
    next_token: int  # the target's token after the last accepted node (bonus)


def accept_greedy(tokens: np.ndarray, parents: np.ndarray, ancestors: np.ndarray, logits: np.ndarray) -> Acceptance:
    """Longest path whose every token is the target's argmax at its parent (plain greedy: no bias,
    penalty or grammar; vectorized over the tree)."""
    best = np.argmax(logits, axis=1)  # [n] target's choice after each node
    match = np.ones(tokens.shape[0], dtype=bool)
    match[1:] = tokens[1:] == best[parents[1:]]
    ok = ~(ancestors & ~match[None, :]).any(axis=1)  # every node on the path matches
    depth = ancestors.sum(axis=1)
    last = int(np.argmax(np.where(ok, depth, -1)))  # deepest; ties: earliest in node order
    path = np.flatnonzero(ancestors[last])  # ancestors come before descendants in node order
    return Acceptance(path, int(best[last]))


@dataclass
class TokenLogprob:
    """OpenAI's logprobs entry of one emitted token: its log-probability under the target's
    distribution at temperature 1 (before bias, penalties and cuts), and the likeliest alternatives."""

    token: int
    logprob: float
    top: list[tuple[int, float]]  # (token, logprob), likeliest first


class Sampler:
    """Chooses the target's tokens for one generation: the settings, the random stream, the
    recent tokens the penalties see, the grammar's state, and logprobs when asked for.

    ``history``: the context so far (the prompt); ``is_eog``: end-of-generation test (a tree
    walk stops there); ``grammar``: a GrammarState (owned by the sampler from now on);
    ``logprobs``: None, or how many alternatives to record per emitted token (0..20).
    """

    def __init__(self, params: SamplingParams, history: Sequence[int] = (), is_eog: Callable[[int], bool] | None = None,
                 grammar=None, logprobs: int | None = None):
        self.params = params
        self.rng = np.random.default_rng(params.seed)
        self._window = params.penalty_window
        self._recent: list[int] = list(history)[-self._window:] if self._window else []
        self._is_eog = is_eog or (lambda tok: False)
        self.grammar = grammar
        self.logprobs = logprobs
        self.records: list[TokenLogprob] = []
        # the vectorized walk applies: plain greedy, nothing to record
        self.plain_greedy = params.greedy and not params.adjusts_logits and grammar is None and logprobs is None

    def close(self) -> None:
        if self.grammar is not None:
            self.grammar.close()

    # ------------------------------------------------------------------ one token
    def choose(self, logits: np.ndarray, ahead: Sequence[int] = (), grammar=None) -> int:
        """The target's token after the committed context plus ``ahead`` (a tree path's tokens),
        given that position's ``logits``; ``grammar``: the grammar's state there (default: the
        committed one). Draws one uniform number when sampling (more only where a grammar
        refuses a draw)."""
        p = self.params
        grammar = grammar if grammar is not None else self.grammar
        recent = self._recent_with(ahead) if self._window else _NO_TOKENS
        x = adjust_logits(logits, p, recent)
        if p.greedy:
            tok = int(np.argmax(x))
            if grammar is not None and not grammar.allows(tok):
                tok = self._greedy_allowed(x, grammar)
        else:
            tok = self._sample(x, grammar)
        if self.logprobs is not None:
            self.records.append(_logprob_record(logits, tok, self.logprobs))
        return tok

    def _recent_with(self, ahead: Sequence[int]) -> np.ndarray:
        return np.asarray((self._recent + list(ahead))[-self._window:], dtype=np.int64)

    def _sample(self, x: np.ndarray, grammar) -> int:
        ids, w = candidates(x, self.params)
        i = _draw(w, self.rng.random())
        tok = int(ids[i]) if ids is not None else i
        if grammar is None or grammar.allows(tok):
            return tok
        # the chain's distribution restricted to what the grammar allows: mask once, draw again
        all_ids = ids if ids is not None else np.arange(x.shape[0])
        allowed = grammar.allowed(all_ids)
        if not allowed.any():  # none of the chain's candidates fits: apply the chain to the allowed tokens
            masked = np.where(grammar.allowed(np.arange(x.shape[0])), x, -np.inf).astype(np.float32)
            if not np.isfinite(masked).any():
                raise InvalidArgumentError("the grammar allows no token here")
            ids, w = candidates(masked, self.params)
            all_ids = ids if ids is not None else np.arange(x.shape[0])
            allowed = np.isfinite(masked[all_ids])
        w = np.where(allowed, w, 0.0)
        return int(all_ids[_draw(w, self.rng.random())])

    @staticmethod
    def _greedy_allowed(x: np.ndarray, grammar, head: int = 32) -> int:
        """The likeliest token the grammar allows: the head of the ranking first, then everything."""
        ids = np.argpartition(-x, head)[:head]
        ids = ids[np.argsort(-x[ids], kind="stable")]
        ok = np.flatnonzero(grammar.allowed(ids))
        if ok.size:
            return int(ids[ok[0]])
        allowed = grammar.allowed(np.arange(x.shape[0]))
        if not allowed.any():
            raise InvalidArgumentError("the grammar allows no token here")
        return int(np.argmax(np.where(allowed, x, -np.inf)))

    # ------------------------------------------------------------------ a verified tree
    def walk(self, tokens: np.ndarray, parents: np.ndarray, logits: np.ndarray) -> Acceptance:
        """Accept down a verified tree (nodes in layout order, node 0 the root): at each node the
        target's own choice (:meth:`choose`) descends to the child carrying it, or is the bonus."""
        node, path, ahead = 0, [0], []
        state = None
        while True:
            tok = self.choose(logits[node], ahead, state)
            if self._is_eog(tok):
                break
            kids = np.flatnonzero((parents == node) & (tokens == tok))
            if not kids.size:
                break
            node = int(kids[0])
            path.append(node)
            ahead.append(tok)
            if self.grammar is not None:
                if state is None:
                    state = self.grammar.clone()
                state.accept(tok)
        if state is not None:
            state.close()
        return Acceptance(np.asarray(path, dtype=np.int64), tok)

    def prune(self, tokens: np.ndarray, parents: np.ndarray) -> np.ndarray:
        """Which nodes (parents first, node 0 the root) the grammar allows after their ancestors:
        a refused node and everything below it can never be accepted (free acceptance work)."""
        keep = np.ones(tokens.shape[0], dtype=bool)
        if self.grammar is None:
            return keep
        states = {0: self.grammar}
        try:
            for i in range(1, tokens.shape[0]):
                parent = int(parents[i])
                # below a refused node, or below an end (never verified further): refused
                if parent not in states or not states[parent].allows(int(tokens[i])):
                    keep[i] = False
                    continue
                if self._is_eog(int(tokens[i])):
                    continue  # nothing is verified below an end
                state = states[parent].clone()
                state.accept(int(tokens[i]))
                states[i] = state
        finally:
            for i, state in states.items():
                if i:
                    state.close()
        return keep

    # ------------------------------------------------------------------ committing
    def accept(self, tokens: Sequence[int]) -> None:
        """The tokens emitted after the committed context (the walk's choices): the penalties and
        the grammar move on."""
        for tok in tokens:
            if self._window:
                self._recent.append(int(tok))
            if self.grammar is not None and not self._is_eog(int(tok)):
                self.grammar.accept(int(tok))
        if self._window and len(self._recent) > 2 * self._window:
            del self._recent[: -self._window]


_NO_TOKENS = np.zeros(0, dtype=np.int64)


def _logprob_record(logits: np.ndarray, tok: int, n_top: int) -> TokenLogprob:
    x = np.asarray(logits, dtype=np.float32)
    top = float(x.max())
    log_z = top + math.log(float(np.exp(x - top).sum(dtype=np.float64)))
    alts: list[tuple[int, float]] = []
    if n_top:
        ids = np.argpartition(-x, n_top - 1)[:n_top]
        ids = ids[np.argsort(-x[ids], kind="stable")]
        alts = [(int(i), float(x[i]) - log_z) for i in ids]
    return TokenLogprob(tok, float(x[tok]) - log_z, alts)
