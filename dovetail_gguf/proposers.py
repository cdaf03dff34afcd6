"""The sources of draft tokens behind one small interface: ``propose`` a scored tree, ``observe`` the outcome.

- :class:`SuffixProposer` over the context (prompt and answer so far), or over
  a client's predicted output: continuations of the longest earlier match of
  the context's tail, each step's acceptance estimated from the match length
  it extends (a copy that has run 30 tokens tends to run on) and from how
  often the text branched there;
- :class:`DraftProposer` turns the draft model's tree into the same shape,
  its conditional draft probabilities calibrated against what the target
  accepted.

Each keeps an :class:`~dovetail_gguf.plan.AcceptanceModel` and learns from
every round, whether or not the planner verified its nodes (see
:func:`~dovetail_gguf.plan.tested_nodes`).
"""

from __future__ import annotations

import numpy as np

from .plan import CONTEXT, DRAFT, PREDICTION, AcceptanceModel, Proposal, tested_nodes, tree_depths  # noqa: F401 (AcceptanceModel: re-exported)
from .suffix import SuffixIndex, continuation_tree
from .types import DraftTree

# match length bucket edges: 1, 2, 3, 4-7, 8-15, 16-31, 32+
_EDGES = np.array([2, 3, 4, 8, 16, 32])
CONTEXT_PRIOR = (0.25, 0.4, 0.55, 0.7, 0.8, 0.88, 0.92)
PREDICTION_PRIOR = (0.5, 0.6, 0.7, 0.8, 0.88, 0.93, 0.96)  # a client's prediction is meant to be copied
MAX_MATCHES = 4  # continuations merged into one suffix proposal


def match_bucket(length) -> np.ndarray:
    return np.searchsorted(_EDGES, length, side="right")


class SuffixProposer:
    """Continuations, from a :class:`SuffixIndex`, of the context's longest earlier match."""

    def __init__(self, index: SuffixIndex, source: int = CONTEXT, prior=CONTEXT_PRIOR,
                 acceptance: AcceptanceModel | None = None):
        self.index = index
        self.source = source
        self.acceptance = acceptance or AcceptanceModel(np.asarray(prior))

    def propose(self, tail: list[int], max_depth: int) -> Proposal:
        """A tree below the root (the last token of ``tail``) of at most ``max_depth`` levels."""
        matches = self.index.find(tail, MAX_MATCHES) if max_depth > 0 else []
        tree = continuation_tree(self.index, matches, max_depth)
        # a node at depth d extends a match that, if its ancestors were accepted, is match_len + d - 1 long
        bucket = match_bucket(tree.match_len + np.maximum(tree.depth - 1, 0)).astype(np.int32)
        share = tree.count / np.maximum(tree.count[np.maximum(tree.parents, 0)], 1)  # how often the text went this way
        cond = np.minimum(self.acceptance.rate(bucket) * share, 1.0)
        cond[0] = 1.0
        return Proposal(self.source, tree.tokens, tree.parents, cond, bucket, share)

    def observe(self, proposal: Proposal, emitted: list[int]) -> None:
        """Learn from the round that emitted ``emitted`` after the root."""
        nodes, hit = tested_nodes(proposal.tokens, proposal.parents, emitted)
        self.acceptance.observe(proposal.bucket[nodes], hit, proposal.weight[nodes])


def prediction_proposer(prompt_tail: np.ndarray, prediction: np.ndarray) -> SuffixProposer:
    """A proposer over a client's predicted output. The prompt's last tokens go first, so the
    answer's very first tokens match the prediction's start."""
    index = SuffixIndex(np.concatenate([prompt_tail, prediction]).astype(np.int32))
    return SuffixProposer(index, PREDICTION, PREDICTION_PRIOR)


class DraftProposer:
    """The draft model's tree as a proposal: P(child | parent) = c * q, q the draft's own
    conditional probability and c a calibration by depth, learned from the target's choices."""

    MAX_BUCKET = 7

    def __init__(self):
        self.acceptance = AcceptanceModel(np.ones(self.MAX_BUCKET), prior_weight=2.0)

    def proposal(self, tree: DraftTree) -> Proposal:
        parents = tree.parents.astype(np.int32)
        scores = tree.scores.astype(np.float64)
        q = np.exp(np.minimum(scores - scores[np.maximum(parents, 0)], 0.0))
        bucket = np.minimum(np.maximum(tree_depths(parents) - 1, 0), self.MAX_BUCKET - 1).astype(np.int32)
        cond = np.minimum(1.0, self.acceptance.rate(bucket) * q)
        cond[0] = 1.0
        return Proposal(DRAFT, tree.tokens.astype(np.int32), parents, cond, bucket, q)

    def observe(self, proposal: Proposal, emitted: list[int]) -> None:
        nodes, hit = tested_nodes(proposal.tokens, proposal.parents, emitted)
        self.acceptance.observe(proposal.bucket[nodes], hit, proposal.weight[nodes])

