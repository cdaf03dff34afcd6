"""The types the engine, the drafters, the API and the server share.

Configs and results as dataclasses, and the :class:`Drafter` protocol that
a draft model implements. Nothing here runs a model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Protocol

import numpy as np

from .accept import TokenLogprob
from .errors import InvalidArgumentError
from .options import LIMITS, check


@dataclass
class TreeConfig:
    """Size of the draft tree. Defaults are Dovetail's: 16 draft tokens, depth 7, top-k 10."""

    tokens: int = LIMITS["tree_tokens"].default  # draft nodes, the root not counted
    depth: int = LIMITS["tree_depth"].default
    topk: int = LIMITS["tree_topk"].default

    def validate(self, max_nodes: int | None = None) -> None:
        """Check against the limits table, and (``max_nodes``) against what the target verifies in one call."""
        self.tokens = check("tree_tokens", self.tokens)
        self.depth = check("tree_depth", self.depth)
        self.topk = check("tree_topk", self.topk)
        if max_nodes is not None and self.tokens + 1 > max_nodes:
            raise InvalidArgumentError(f"a tree of {self.tokens} draft tokens exceeds the target's {max_nodes - 1}")


@dataclass
class DraftTree:
    """A proposed tree: node 0 is the root (the last accepted token), parents precede children."""

    tokens: np.ndarray  # [n] int32 target token ids
    parents: np.ndarray  # [n] int32, -1 for the root
    scores: np.ndarray  # [n] float32 cumulative draft log-probability (root 0)


class Drafter(Protocol):
    """What the engine needs from a draft model.

    Lossless sampling relies on one requirement: the tree's children must be a
    deterministic function of the drafter's state (its top-k, say), never
    sampled, because acceptance treats each child as a one-point draft (see
    accept.py). ``max_positions`` is how many committed pairs the drafter can
    hold; past it the engine decodes plainly. A drafter may also offer
    ``skip_to(n_pairs) -> int``: hold nothing and take pairs from ``n_pairs`` on
    (a window of the context); the engine then computes a long prompt's
    features only for its last positions (engine.DRAFT_WINDOW).
    """

    max_positions: int

    def trim(self, n_pairs: int) -> int:
        """Keep at most the first ``n_pairs`` committed (feature, token) pairs; return how many it holds."""

    def propose(self, features: np.ndarray, tokens: np.ndarray, tree: TreeConfig) -> DraftTree:
        """Commit the new pairs (feature of position t-1, token at t), the last one being the
        root, and draft a tree below the root token ``tokens[-1]``."""


@dataclass
class RoundRecord:
    """One planned round as the planner saw it and as it ran."""

    rows: int  # rows verified (1: a plain step)
    drafted: bool  # whether the draft model ran
    predicted_ms: float  # the cost model's time for the round (drafting, verification, overhead)
    measured_ms: float  # the round's own work, by the clock
    expected_tokens: float  # tokens the planner expected the round to emit, the bonus included
    emitted: int  # tokens it emitted


@dataclass
class GenerationStats:
    n_prompt_tokens: int = 0
    n_cached_tokens: int = 0  # prompt tokens reused from the KV cache (not evaluated again)
    n_tokens: int = 0
    rounds: int = 0
    accepted_tokens: int = 0  # tokens emitted by rounds (bonus included)
    verified_rows: int = 0  # target rows evaluated by rounds (1 for a plain step)
    reevaluated_rows: int = 0  # rows commit decoded again (accepted nodes off the batch's first path)
    draft_rounds: int = 0  # rounds that ran the draft model
    # Predicted Outputs (OpenAI's meaning): prediction tokens the answer took from the prediction,
    # and prediction tokens verified and refused
    accepted_prediction_tokens: int = 0
    rejected_prediction_tokens: int = 0
    # per draft-tree depth d (index d - 1): rounds whose draft tree reached depth d, and those
    # that accepted at least d of its tokens; their ratio is the acceptance by depth
    depth_drafted: list[int] = field(default_factory=list)
    depth_accepted: list[int] = field(default_factory=list)
    # every planned round (calibration rounds excluded): what the planner predicted, what happened
    round_log: list[RoundRecord] = field(default_factory=list)
    prefill_seconds: float = 0.0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    total_seconds: float = 0.0
    peak_gpu_memory_bytes: int | None = None

    @property
    def decode_seconds(self) -> float:
        return self.total_seconds - self.prefill_seconds

    @property
    def other_seconds(self) -> float:
        return max(0.0, self.decode_seconds - self.draft_seconds - self.verify_seconds)

    @property
    def tokens_per_second(self) -> float:
        return self.n_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0

    @property
    def mean_accepted_tokens(self) -> float:
        """τ: tokens a round emits on average, the target's bonus token included."""
        return self.accepted_tokens / self.rounds if self.rounds else 0.0

    def record_tree(self, reached: int, accepted: int) -> None:
        """A round verified a draft tree ``reached`` levels deep and accepted ``accepted`` of its tokens."""
        grow = reached - len(self.depth_drafted)
        if grow > 0:
            self.depth_drafted.extend([0] * grow)
            self.depth_accepted.extend([0] * grow)
        for d in range(reached):
            self.depth_drafted[d] += 1
            self.depth_accepted[d] += d < accepted

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(
            decode_seconds=self.decode_seconds,
            other_seconds=self.other_seconds,
            tokens_per_second=self.tokens_per_second,
            mean_accepted_tokens=self.mean_accepted_tokens,
        )
        return d


@dataclass
class GenerationResult:
    text: str
    tokens: list[int]
    finish_reason: str  # "stop" (EOS or stop string), "length" (max_tokens), "context_full",
    # or, for a generation that did not end by itself, "cancelled" (closed early) or "error"
    stats: GenerationStats = field(default_factory=GenerationStats)
    logprobs: list[TokenLogprob] | None = None  # one per token, when asked for
