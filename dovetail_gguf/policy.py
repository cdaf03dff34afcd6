"""Sizing each round's tree from what it costs on this machine and how much of it gets accepted.

On a CPU, verifying k tree nodes costs t(k) = r(k) * t(1) with r growing
quickly (SmolLM2 on 2 threads: r(16) is about 5.6), and the draft costs time
per depth. A round that drafts depth D and verifies n nodes emits on average
E(D) = 1 + sum_{d=1..D} P(accepted length >= d) tokens, so its speed is
E(D) / (draft(D) + t(n)). The policy picks the tree with the best speed and
falls back to plain decoding (speed 1 / t(1)) when no tree beats it,
re-trying speculation now and then so its estimates stay fresh.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from .costs import estimate_ms

log = logging.getLogger(__name__)

PROBE_MAX_TOKENS = 3  # draft tokens a probe may verify: enough to see acceptance, cheap where nothing pays
# a probe (drafting, often after catching the draft up on every position decoded plainly since the last
# one) costs one to two plain steps on a CPU; where even a draft accepted whole would be less than this
# much faster than plain decoding, a real one (levels accepted at 0.6-0.9) would not be: probes are rare
PROBE_MIN_GAIN = 1.15


@dataclass
class TreePolicy:
    """Chooses a tree size per round; ``None`` means a plain one-token step."""

    max_nodes: int  # draft nodes a tree may hold, the root not counted
    max_depth: int
    topk: int
    costs_ms: dict[int, float]  # measured t(k) in ms for some k (1 included): the cost model's table
    probe_every: int = 16  # plain steps between speculative probes
    draft_ms_per_depth: float = 0.0  # running estimate
    draft_ms_fixed: float = 0.0
    _reach: np.ndarray = field(default=None, repr=False)  # P(accepted length >= d), d = 0..max_depth
    _plain_steps: int = 0
    _rounds: int = 0
    _draft_samples: int = 0
    _best: tuple[int, int] | None = None  # cached until the next observation
    _probe_gap: int = 0
    _chosen_at: dict = field(default_factory=dict)  # costs_ms when _best was chosen

    def __post_init__(self) -> None:
        self._reach = np.array([1.0] + [0.7 ** d for d in range(1, self.max_depth + 1)])  # optimistic start
        self._probe_gap = self.probe_every

    def verify_cost(self, n):
        """t(n) in ms (a number or an array), by the planner's own estimator."""
        return estimate_ms(self.costs_ms, n)

    def costs_changed(self, n: int) -> None:
        """t(n) in ``costs_ms`` was refined: choose again if it moved since the last choice."""
        old = self._chosen_at.get(n)
        if old is None or abs(self.costs_ms[n] - old) > 0.05 * old:
            self._best = None

    def expected(self, depth: int) -> float:
        """Tokens a round with a tree of ``depth`` levels emits on average (the bonus token included)."""
        return float(self._reach[: depth + 1].sum())

    def draft_ms(self, depth):
        """Drafting ``depth`` levels (a number or an array), as estimated so far."""
        return self.draft_ms_fixed + self.draft_ms_per_depth * depth

    def round_ms(self, depth, tokens):
        """Drafting ``depth`` levels and verifying ``tokens`` draft nodes plus the root (numbers or arrays)."""
        return self.draft_ms(depth) + self.verify_cost(tokens + 1)

    def speed(self, depth, tokens):
        """Expected tokens per ms of a tree (numbers or arrays)."""
        return np.cumsum(self._reach)[depth] / self.round_ms(depth, tokens)

    def perfect_speed(self) -> float:
        """Tokens per ms of the best candidate tree if every level were accepted: no draft beats it.
        (All candidates, not only chains: measured t(k) need not grow with k.)"""
        depth, tokens = self.candidates()
        return float(((depth + 1) / self.round_ms(depth, tokens)).max())

    def candidates(self) -> tuple[np.ndarray, np.ndarray]:
        """(depths, draft tokens) of the trees considered: 1 to 3 nodes per level, in that order."""
        depth = np.repeat(np.arange(1, self.max_depth + 1), 3)
        tokens = np.minimum(self.max_nodes, depth * np.tile([1, 2, 3], self.max_depth))
        keep = tokens >= depth
        return depth[keep], tokens[keep]

    def _fastest(self, depth: np.ndarray, tokens: np.ndarray) -> tuple[tuple[int, int], float]:
        speed = self.speed(depth, tokens)
        i = int(np.argmax(speed))
        return (int(depth[i]), int(tokens[i])), float(speed[i])

    def choose(self) -> tuple[int, int] | None:
        """(depth, tokens) of the next tree, or None for a plain step."""
        if self._best is None:
            best, speed = self._fastest(*self.candidates())
            self._best = best if speed > 1.0 / self.verify_cost(1) else (0, 0)
            self._chosen_at = dict(self.costs_ms)
        if self._best != (0, 0):
            self._plain_steps, self._probe_gap = 0, self.probe_every
            return self._best
        self._plain_steps += 1
        if self._plain_steps >= self._probe_gap:  # look again, less often while probes keep failing
            self._plain_steps = 0
            longest = 16 * self.probe_every
            if self._probe_gap < longest and self.perfect_speed() <= PROBE_MIN_GAIN / self.verify_cost(1):
                self._probe_gap = longest  # not even a perfect draft would pay enough: look again only rarely
                return None
            self._probe_gap = min(2 * self._probe_gap, longest)
            depth, tokens = self.candidates()
            small = tokens <= PROBE_MAX_TOKENS  # probes stay cheap
            return self._fastest(depth[small], tokens[small])[0]
        return None

    def observe(self, depth: int, accepted: int, draft_ms: float | None) -> None:
        """Update after a speculative round: tree depth, accepted draft tokens (bonus excluded).

        ``draft_ms`` is None for a round whose drafting cost is not typical: one
        that first caught the draft up on many positions decoded plainly (or
        on the prompt), a one-time cost that steady speculation does not pay.
        """
        self._rounds += 1
        self._reach = update_reach(self._reach, depth, accepted, self._update_rate(self._rounds))
        self._best = None
        if draft_ms is None:
            return
        self._draft_samples += 1
        rate = 1.0 if self._draft_samples == 1 else self._update_rate(self._draft_samples)  # the first sample replaces the guess
        self.draft_ms_per_depth += rate * (draft_ms / max(depth, 1) - self.draft_ms_per_depth)

    @staticmethod
    def _update_rate(n_samples: int) -> float:
        """Weight of the newest of ``n_samples`` observations in a running estimate: fast at first, then steadier."""
        return 0.5 if n_samples <= 5 else 0.2


def update_reach(reach: np.ndarray, depth: int, accepted: int, rate: float) -> np.ndarray:
    """P(accepted length >= d) after a round that proposed ``depth`` levels and had ``accepted`` accepted."""
    reach = reach.copy()
    hit = (np.arange(1, depth + 1) <= accepted).astype(float)
    reach[1 : depth + 1] += rate * (hit - reach[1 : depth + 1])
    # depths beyond this tree were not seen: assume they keep the last level's survival rate
    # (so a fully accepted tree makes deeper ones worth trying)
    max_depth = reach.shape[0] - 1
    survive = reach[depth] / max(reach[depth - 1], 1e-9) if depth >= 1 else 1.0
    beyond = reach[depth] * survive ** np.arange(1, max_depth - depth + 1)
    reach[depth + 1 :] = np.maximum(reach[depth + 1 :], beyond)
    reach[1:] = np.minimum.accumulate(reach[1:])  # P(length >= d) falls with d
    return reach
