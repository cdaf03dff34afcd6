"""Choosing tokens from target logits: sampling settings, greedy and lossless tree acceptance.

Pure functions over numpy arrays; they know nothing of llama.cpp or torch.

Greedy: accept the deepest node whose whole path matches the target's argmax,
then the target's argmax after it (the bonus token).

Sampling: recursive rejection over the tree's candidates. This is SpecInfer's
multi-step speculative sampling (Miao et al., 2024) with every candidate taken
as a one-point draft distribution q = δ_x, which is what a tree whose children
are picked deterministically (top-k, as EAGLE-2 and Dovetail draft them)
amounts to: the ratio min(1, p(x) / q(x)) becomes p(x), and the residual
norm(max(p - q, 0)) is p with x removed. At node u with target distribution p,
try u's children in order; accept child x with probability p(x); on rejection
set p(x) = 0 and renormalise. If every child is rejected, sample the bonus token from what is
left of p. The emitted token then has exactly distribution p: P(x1) = p(x1),
and any other y is reached with (1 - p(x1)) * p(y) / (1 - p(x1)) = p(y), and so
on down the siblings. The draft's own probabilities choose the candidates and
their order; they never enter the acceptance test, so no draft can bias it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InvalidArgumentError


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings. temperature 0 means greedy (argmax)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None

    def validate(self) -> None:
        if not (0.0 <= self.temperature <= 100.0) or self.temperature != self.temperature:
            raise InvalidArgumentError(f"temperature must be in [0, 100], got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidArgumentError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidArgumentError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def target_distribution(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The distribution the target samples from: softmax(logits / T), cut by top-k, then top-p."""
    x = np.asarray(logits, dtype=np.float64) / params.temperature
    n = x.shape[-1]
    if 0 < params.top_k < n:
        kth = np.partition(x, n - params.top_k)[n - params.top_k]
        x = np.where(x >= kth, x, -np.inf)
    x = x - x.max()
    p = np.exp(x)
    p /= p.sum()
    if params.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        sorted_p = p[order]
        cum = np.cumsum(sorted_p)
        n_keep = int(np.searchsorted(cum, params.top_p)) + 1  # smallest set reaching top_p
        keep = np.zeros(n, dtype=bool)
        keep[order[:n_keep]] = True
        p = np.where(keep, p, 0.0)
        p /= p.sum()
    return p


def sample_token(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """One token from ``logits`` (argmax when greedy)."""
    if params.greedy:
        return int(np.argmax(logits))
    p = target_distribution(logits, params)
    return int(rng.choice(p.shape[0], p=p))


@dataclass(frozen=True)
class Acceptance:
    path: np.ndarray  # accepted node indices, root first
    next_token: int  # the target's token after the last accepted node (bonus)


def accept_greedy(tokens: np.ndarray, parents: np.ndarray, ancestors: np.ndarray, logits: np.ndarray) -> Acceptance:
    """Longest path whose every token is the target's argmax at its parent."""
    best = np.argmax(logits, axis=1)  # [n] target's choice after each node
    match = np.ones(tokens.shape[0], dtype=bool)
    match[1:] = tokens[1:] == best[parents[1:]]
    ok = ~(ancestors & ~match[None, :]).any(axis=1)  # every node on the path matches
    depth = ancestors.sum(axis=1)
    last = int(np.argmax(np.where(ok, depth, -1)))  # deepest; ties: earliest in node order
    path = np.flatnonzero(ancestors[last])  # ancestors come before descendants in node order
    return Acceptance(path, int(best[last]))


def accept_sampling(
    tokens: np.ndarray,
    parents: np.ndarray,
    logits: np.ndarray,
    params: SamplingParams,
    rng: np.random.Generator,
) -> Acceptance:
    """Lossless recursive rejection sampling over a tree with deterministically chosen children."""
    n = tokens.shape[0]
    node, path = 0, [0]
    while True:
        p = target_distribution(logits[node], params)
        children = np.flatnonzero(parents == node) if n > 1 else np.empty(0, dtype=np.int64)
        chosen = -1
        for child in children:
            x = int(tokens[child])
            if p[x] > 0.0 and rng.random() < p[x]:
                chosen = int(child)
                break
            mass = 1.0 - p[x]
            p[x] = 0.0
            if mass <= 0.0:
                break
            p /= mass
        if chosen < 0:
            total = p.sum()
            if total <= 0.0:  # all mass was on rejected candidates: cannot happen for p(x) = 1
                p = target_distribution(logits[node], params)
            else:
                p /= total
            return Acceptance(np.asarray(path, dtype=np.int64), int(rng.choice(p.shape[0], p=p)))
        path.append(chosen)
        node = chosen
