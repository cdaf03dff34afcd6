"""One round plan from one cost model: which proposed nodes to verify, if any.

Every source of draft tokens (the draft model's tree, the suffix index over the
context, a client's predicted output) proposes a tree of scored nodes below the
round's root. A node's score is its estimated probability of being accepted:
the product, down its path, of each step's conditional acceptance, as the
source's :class:`AcceptanceModel` estimates it from how its past candidates
fared. The proposals merge into one tree (a node two sources propose keeps the
higher estimate), and :func:`plan_round` picks the subtree with the most
expected emitted tokens per millisecond:

    speed(S) = (1 + sum_{v in S} P(v)) / (t(|S| + 1) + overhead + P(off first path) * t_reeval)

where t(k) is the measured cost of verifying k rows, the overhead is the
measured per-round work outside the decode, and the last term prices commit's
re-evaluation of accepted nodes off the first path (t(2) unless told). Only the
row counts in ``ROW_SIZES`` are considered, so few sizes need measuring. Since P falls along every
path, the best subtree of each size is a prefix of the nodes sorted by P, so
the search is one cumsum. No subtree (plain decoding, speed 1 / t(1)) is the
answer when nothing pays.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .costs import ROW_SIZES


@dataclass
class Proposal:
    """A source's tree below the root: node 0 stands for the root (its token is not read); parents precede children.

    ``cond[i]`` is the estimated probability that node i is accepted once its parent is;
    ``bucket[i]`` is the :class:`AcceptanceModel` bucket that estimate came from.
    """

    source: int  # a bit: DRAFT, CONTEXT or PREDICTION
    tokens: np.ndarray  # [n] int32
    parents: np.ndarray  # [n] int32
    cond: np.ndarray  # [n] float64, root 1
    bucket: np.ndarray  # [n] int32 (root: unused)
    weight: np.ndarray  # [n] float64: the trial weight of each node when the source learns from it

    @property
    def size(self) -> int:
        return int(self.tokens.shape[0]) - 1


DRAFT, CONTEXT, PREDICTION = 1, 2, 4  # source bits


@dataclass
class AcceptanceModel:
    """Estimated acceptance per bucket: decayed hits over trials, starting from a prior.

    Buckets are whatever a source keys its estimate on (the match length so far for the
    suffix sources, the depth for the draft). ``decay`` forgets old rounds, so a text that
    turns repetitive (or stops being so) is noticed within a few rounds.
    """

    prior: np.ndarray  # [n_buckets] prior acceptance
    prior_weight: float = 4.0
    decay: float = 0.97  # per observed round
    hits: np.ndarray = field(default=None, repr=False)
    trials: np.ndarray = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.prior = np.asarray(self.prior, dtype=np.float64)
        self.hits = np.zeros_like(self.prior)
        self.trials = np.zeros_like(self.prior)

    def rate(self, bucket) -> np.ndarray:
        num = self.hits + self.prior_weight * self.prior
        return (num / (self.trials + self.prior_weight))[bucket]

    def observe(self, buckets: np.ndarray, outcomes: np.ndarray, weights: np.ndarray | None = None) -> None:
        """Tested nodes: their buckets and whether each was accepted (``weights``: the share of
        the node's estimate that was the source's to learn, e.g. 1 / its branching factor)."""
        self.hits *= self.decay
        self.trials *= self.decay
        if buckets.size:
            w = np.ones(buckets.shape) if weights is None else weights
            np.add.at(self.hits, buckets, outcomes * 1.0)
            np.add.at(self.trials, buckets, w)


def tested_nodes(tokens: np.ndarray, parents: np.ndarray, emitted: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Which nodes of a proposal the round tested, and which of those were accepted.

    ``emitted`` is what the round produced after the root: the accepted tokens, then the target's
    own next token. A node is tested when its parent lies on the emitted path, and accepted when
    its token is the next one emitted. That holds whether or not the planner verified it: the
    target's choice after an accepted node is known (greedy: its argmax; sampled: a draw with
    exactly the probability of accepting that child as a one-point draft).
    Returns (indices of tested nodes, accepted flags).
    """
    children: dict[int, list[int]] = {}
    for i, parent in enumerate(parents.tolist()[1:], start=1):
        children.setdefault(parent, []).append(i)
    toks = tokens.tolist()
    tested: list[int] = []
    hit: list[bool] = []
    node = 0
    for tok in emitted:
        kids = children.get(node)
        if not kids:
            break
        node = -1
        for k in kids:  # the first child with the token is the one on the path (a drafter may repeat a sibling)
            tested.append(k)
            hit.append(node < 0 and toks[k] == tok)
            if hit[-1]:
                node = k
        if node < 0:
            break
    return np.asarray(tested, dtype=np.int64), np.asarray(hit, dtype=bool)


@dataclass
class Candidates:
    """The merged proposals of one round: node 0 is the root token itself."""

    tokens: np.ndarray  # [n] int32
    parents: np.ndarray  # [n] int32
    prob: np.ndarray  # [n] float64: estimated P(node accepted), root 1
    sources: np.ndarray  # [n] uint8 bit mask of the sources that proposed the node

    @property
    def size(self) -> int:
        return int(self.tokens.shape[0]) - 1


def merge(root: int, proposals: list[Proposal]) -> Candidates:
    """One tree from several proposals; a node proposed twice keeps the higher probability."""
    props = [p for p in proposals if p.size]
    if not props:
        return Candidates(np.array([root], dtype=np.int32), np.array([-1], dtype=np.int32), np.ones(1),
                          np.zeros(1, dtype=np.uint8))
    base = props[0]  # taken whole (a proposal is a trie: no node twice), the others merged into it
    tokens = base.tokens.astype(np.int32)
    tokens[0] = root
    parents = base.parents.astype(np.int32)
    prob = _path_products(parents, np.minimum(base.cond, 1.0))
    sources = np.full(tokens.shape, base.source, dtype=np.uint8)
    sources[0] = 0
    if len(props) == 1:
        return Candidates(tokens, parents, prob, sources)
    tokens_l, parents_l, prob_l, sources_l = tokens.tolist(), parents.tolist(), prob.tolist(), sources.tolist()
    children = {(par, tok): i for i, (par, tok) in enumerate(zip(parents_l[1:], tokens_l[1:]), start=1)}
    for p in props[1:]:
        local = [0] * p.tokens.shape[0]
        for i, (tok, par, cond) in enumerate(zip(p.tokens.tolist()[1:], p.parents.tolist()[1:], p.cond.tolist()[1:]),
                                             start=1):
            parent = local[par]
            pr = prob_l[parent] * min(cond, 1.0)
            j = children.get((parent, tok))
            if j is None:
                j = len(tokens_l)
                children[(parent, tok)] = j
                tokens_l.append(tok)
                parents_l.append(parent)
                prob_l.append(pr)
                sources_l.append(p.source)
            else:
                prob_l[j] = max(prob_l[j], pr)
                sources_l[j] |= p.source
            local[i] = j
    # conditional estimates are at most 1 and a node's estimate only ever rises: P falls along every path
    return Candidates(np.asarray(tokens_l, dtype=np.int32), np.asarray(parents_l, dtype=np.int32),
                      np.asarray(prob_l, dtype=np.float64), np.asarray(sources_l, dtype=np.uint8))


def restrict(cands: Candidates, keep: np.ndarray) -> Candidates:
    """The candidates where ``keep`` (ancestor-closed, root kept) is set, in the same order."""
    if keep.all():
        return cands
    idx = np.flatnonzero(keep)
    remap = np.full(keep.shape[0], -1, dtype=np.int32)
    remap[idx] = np.arange(idx.size, dtype=np.int32)
    parents = np.where(cands.parents[idx] >= 0, remap[np.maximum(cands.parents[idx], 0)], -1).astype(np.int32)
    return Candidates(cands.tokens[idx], parents, cands.prob[idx], cands.sources[idx])


def _path_products(parents: np.ndarray, cond: np.ndarray) -> np.ndarray:
    """P(node) = the product of ``cond`` from the root down to it (root: 1)."""
    cond = cond.astype(np.float64)
    cond[0] = 1.0
    if (parents[1:] == np.arange(parents.shape[0] - 1)).all():  # a chain
        return np.cumprod(cond)
    prob = cond.tolist()
    for i, par in enumerate(parents.tolist()[1:], start=1):
        prob[i] *= prob[par]
    return np.asarray(prob)


_IS_ROW_SIZE = np.zeros(max(ROW_SIZES) + 2, dtype=bool)  # [rows]: a size rounds use (the last entry: past them)
_IS_ROW_SIZE[list(ROW_SIZES)] = True


@dataclass
class RoundPlan:
    """The nodes to verify (layout order: parents first, the most likely path first) and why."""

    nodes: np.ndarray  # [k + 1] indices into the candidates, node 0 (the root) first
    tokens: np.ndarray  # [k + 1] int32
    parents: np.ndarray  # [k + 1] int32, into ``nodes``
    sources: np.ndarray  # [k + 1] uint8
    expected_tokens: float  # emitted tokens the round should give, the bonus included
    expected_ms: float  # its predicted cost

    @property
    def rows(self) -> int:
        return int(self.nodes.shape[0])

    @property
    def plain(self) -> bool:
        return self.rows == 1


def plan_round(cands: Candidates, verify_ms, limit: int, overhead_ms: float = 0.0, take_all: bool = False,
               reeval_ms: float | None = None) -> RoundPlan:
    """The subtree of ``cands`` with the most expected tokens per ms, at most ``limit`` rows (root
    included); the root alone when nothing beats a plain step. ``verify_ms(k)`` is t(k) in ms and
    takes arrays; ``reeval_ms`` is what commit's re-evaluation of an accepted path that leaves the
    first path costs (default t(2)). ``take_all``: verify every candidate that fits (a fixed tree)."""
    n = cands.size
    k_max = max(0, min(n, limit - 1))
    order = np.argsort(-cands.prob[1:], kind="stable")[:k_max] + 1  # ties: parents (lower index) first
    if k_max == 0:
        best = 0
        expected = np.ones(1)
        cost = np.atleast_1d(np.asarray(verify_ms(np.ones(1)), dtype=np.float64)) + overhead_ms
    else:
        p = cands.prob[order]
        expected = np.concatenate([[1.0], 1.0 + np.cumsum(p)])  # [k_max + 1]
        rows = np.arange(1, k_max + 2)
        cost = np.asarray(verify_ms(rows), dtype=np.float64) + overhead_ms
        sized = _IS_ROW_SIZE[np.minimum(rows, _IS_ROW_SIZE.size - 1)]
        if not take_all and (expected / cost)[sized].max() <= expected[0] / cost[0]:
            # nothing beats a plain step before re-evaluation is priced: nothing will after
            return _layout(cands, np.zeros(1, dtype=np.int64), 1.0, float(cost[0]))
        # commit re-evaluates an accepted path that leaves the first path (a decode of its own)
        first = _first_path(cands)
        off = np.where(first[cands.parents[order]] & ~first[order], p, 0.0)
        if reeval_ms is None:
            reeval_ms = float(np.atleast_1d(verify_ms(np.array([2.0])))[0])
        cost = cost + np.concatenate([[0.0], np.cumsum(off)]) * reeval_ms
        speed = np.where(sized, expected / cost, 0.0)  # a few sizes: each is measured once
        speed[0] = expected[0] / cost[0]
        best = k_max if take_all else int(np.argmax(speed))
        if not take_all and speed[best] <= speed[0]:  # no margin: the costs are measured
            best = 0
    chosen = np.concatenate([[0], np.sort(order[:best])]) if best else np.zeros(1, dtype=np.int64)
    return _layout(cands, chosen, float(expected[best]), float(cost[best]))


def _first_path(cands: Candidates) -> np.ndarray:
    """Nodes on the chain that follows the most likely child from the root (a mask)."""
    on = np.zeros(cands.tokens.shape[0], dtype=bool)
    on[likeliest_path(cands)] = True
    return on


def likeliest_path(cands: Candidates) -> list[int]:
    """The root, then the most likely child at every level, as node indices."""
    n = cands.tokens.shape[0]
    if n == 1:
        return [0]
    kids = np.arange(1, n)
    order = kids[np.lexsort((-cands.prob[1:], cands.parents[1:]))]  # by parent, likeliest child first
    par = cands.parents[order]
    first = order[np.r_[True, par[1:] != par[:-1]]]  # the likeliest child of each parent
    best = dict(zip(cands.parents[first].tolist(), first.tolist()))
    path = [0]
    while path[-1] in best:
        path.append(best[path[-1]])
    return path


def tree_depths(parents: np.ndarray) -> np.ndarray:
    """Each node's depth (root 0) in a tree whose parents precede their children."""
    depth = [0] * parents.shape[0]
    for i, par in enumerate(parents.tolist()[1:], start=1):
        depth[i] = depth[par] + 1
    return np.asarray(depth, dtype=np.int32)


def _layout(cands: Candidates, chosen: np.ndarray, expected: float, cost: float) -> RoundPlan:
    """``chosen`` (ancestor-closed, root first) in depth-first order, likeliest child first."""
    local = {j: i for i, j in enumerate(chosen.tolist())}
    parents = np.array([-1] + [local[j] for j in cands.parents[chosen[1:]].tolist()], dtype=np.int32)
    if (parents[1:] == np.arange(parents.size - 1)).all():  # a chain: already in order
        return RoundPlan(chosen, cands.tokens[chosen], parents, cands.sources[chosen], expected, cost)
    order = order_best_first(parents, cands.prob[chosen])
    nodes = chosen[order]
    remap = np.empty(order.size, dtype=np.int32)
    remap[order] = np.arange(order.size)
    par = np.where(parents[order] >= 0, remap[np.maximum(parents[order], 0)], -1).astype(np.int32)
    return RoundPlan(nodes, cands.tokens[nodes], par, cands.sources[nodes], expected, cost)


def order_best_first(parents: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Depth-first order of a tree (node 0 the root), children visited best score first.

    The most likely path then comes first in the target's batch, so its KV
    cells stay contiguous when it is accepted.
    """
    n = parents.shape[0]
    children: list[list[int]] = [[] for _ in range(n)]
    for i in np.argsort(-scores, kind="stable"):
        if parents[i] >= 0:
            children[parents[i]].append(int(i))
    order, stack = [], [0]
    while stack:
        node = stack.pop()
        order.append(node)
        stack.extend(reversed(children[node]))
    return np.asarray(order, dtype=np.int64)
