"""The suffix index against brute force, and the round planner on synthetic cost tables (pure, no model)."""

from __future__ import annotations

import numpy as np
import pytest

from dovetail_gguf.costs import CostModel
from dovetail_gguf.plan import CONTEXT, AcceptanceModel, Proposal, merge, plan_round
from dovetail_gguf.plan import tested_nodes as nodes_tested
from dovetail_gguf.proposers import SuffixProposer
from dovetail_gguf.suffix import MAX_MATCH, SuffixIndex, continuation_tree


def brute_force(stream: list[int], max_ngram: int) -> tuple[int, set[int]]:
    """Longest n-gram level (<= max_ngram) of the stream's tail that occurred earlier with a token
    after it, and every position where that occurrence ends."""
    size = len(stream)
    for n in range(min(max_ngram, size), 0, -1):
        ends = {e for e in range(n - 1, size - 1) if stream[e - n + 1 : e + 1] == stream[size - n :]}
        if ends:
            return n, ends
    return 0, set()


def full_length(stream: list[int], end: int) -> int:
    size, k = len(stream), 0
    while k < min(MAX_MATCH, size) and end - k >= 0 and stream[end - k] == stream[size - 1 - k]:
        k += 1
    return k


@pytest.mark.parametrize("symbols", [2, 4, 30])
def test_index_finds_what_a_brute_force_scan_finds(symbols):
    rng = np.random.default_rng(symbols)
    for trial in range(300):
        stream = rng.integers(0, symbols, size=int(rng.integers(1, 120))).tolist()
        index = SuffixIndex(max_ngram=5)
        for tok in stream:  # built incrementally, as the engine does
            index.append(tok)
        found = index.find(stream, max_matches=100)
        n, ends = brute_force(stream, 5)
        if n == 0:
            assert found == []
            continue
        recent = sorted(ends)[-32:]  # the index looks at the most recent positions of one n-gram
        length = {e: full_length(stream, e) if n == 5 else n for e in recent}
        best = max(length.values())
        assert [m.end for m in found] == sorted((e for e in recent if length[e] == best), reverse=True), (stream, n)
        for m in found:
            assert m.length == best == length[m.end], (stream, m)
            np.testing.assert_array_equal(index.continuation(m, 7), stream[m.end + 1 : m.end + 8])


def test_continuation_tree_counts_where_the_text_branched():
    # "1 2 3" after 5, 6, 7 and (the tail) 4: three matches of the same length, followed by 9, 8, 9
    stream = [5, 1, 2, 3, 9, 6, 1, 2, 3, 8, 7, 1, 2, 3, 9, 4, 1, 2, 3]
    index = SuffixIndex(stream, max_ngram=3)
    tree = continuation_tree(index, index.find(stream, 4), max_depth=2)
    kids = np.flatnonzero(tree.parents == 0)
    assert sorted(tree.tokens[kids].tolist()) == [8, 9]
    count = {int(tree.tokens[k]): int(tree.count[k]) for k in kids}
    assert count == {9: 2, 8: 1}
    assert (tree.parents[1:] < np.arange(1, tree.tokens.size)).all()
    # a longer match wins alone: "4 1 2 3" occurred once before, followed by 8
    stream = [4, 1, 2, 3, 8, 6, 1, 2, 3, 9, 4, 1, 2, 3]
    index = SuffixIndex(stream, max_ngram=3)
    tree = continuation_tree(index, index.find(stream, 4), max_depth=1)
    assert tree.tokens[1:].tolist() == [8] and tree.count[1] == 1


def test_index_cost_stays_small_at_8k_tokens():
    """O(max_ngram) per append and a bounded query; counted in operations, not timed."""
    rng = np.random.default_rng(0)
    stream = rng.integers(0, 50, size=8192).tolist()
    index = SuffixIndex(stream)
    assert sum(len(v) for v in index._ends.values()) == sum(min(i + 1, index.max_ngram) for i in range(8192))
    prop = SuffixProposer(index).propose(stream[-64:], 63)
    assert prop.size <= 4 * 63  # at most MAX_MATCHES continuations of the asked depth


def chain(p: list[float], root=0) -> Proposal:
    n = len(p)
    return Proposal(CONTEXT, np.arange(root, root + n + 1, dtype=np.int32), np.arange(-1, n, dtype=np.int32),
                    np.array([1.0, *p]), np.zeros(n + 1, dtype=np.int32), np.ones(n + 1))


def fan(p: float, width: int) -> Proposal:
    return Proposal(CONTEXT, np.arange(width + 1, dtype=np.int32), np.array([-1] + [0] * width, dtype=np.int32),
                    np.array([1.0] + [p] * width), np.zeros(width + 1, dtype=np.int32), np.ones(width + 1))


FLAT = lambda k: 10.0 + 0.01 * (np.asarray(k, dtype=float) - 1)  # noqa: E731  (one more row is almost free)
STEEP = lambda k: 10.0 * np.asarray(k, dtype=float)  # noqa: E731  (every row costs a full decode)
XEON = CostModel(None, 64)  # the costs measured on this project's 2-core Xeon, Qwen2.5-Coder-0.5B
XEON.table = {1: 44.0, 2: 49.5, 3: 82.1, 4: 67.4, 5: 127.3, 12: 196.6, 20: 340.7, 48: 498.6, 64: 437.6}


def test_planner_takes_width_when_rows_are_almost_free():
    """Siblings pay only where verifying them and re-evaluating an accepted one (commit's second
    decode, needed when the accepted path leaves the batch's first path) both cost little."""
    plan = plan_round(merge(0, [fan(0.04, 20)]), FLAT, limit=64, reeval_ms=0.0)
    assert plan.rows == 16 and (plan.parents[1:] == 0).all()  # 15 siblings (16 is a size rounds use; 21 is not)
    priced = plan_round(merge(0, [fan(0.04, 20)]), FLAT, limit=64)  # re-evaluation at t(2) = 10 ms
    assert priced.rows == 2  # the likeliest child only: it is the first path, which needs no re-evaluation


def test_planner_takes_a_long_chain_when_acceptance_is_high():
    plan = plan_round(merge(0, [chain([0.98] * 63)]), XEON.verify_ms, limit=64)
    assert plan.rows >= 48, plan.rows
    np.testing.assert_array_equal(plan.parents, np.arange(-1, plan.rows - 1))
    short = plan_round(merge(0, [chain([0.5] * 63)]), XEON.verify_ms, limit=64)
    assert short.rows < 8  # the same costs, a doubtful chain: short


def test_planner_verifies_nothing_when_nothing_pays():
    plan = plan_round(merge(0, [chain([0.9] * 10), fan(0.3, 5)]), STEEP, limit=64)
    assert plan.plain and plan.rows == 1
    assert plan_round(merge(0, []), FLAT, limit=64).plain
    assert plan_round(merge(0, [chain([0.99] * 10)]), FLAT, limit=1).plain  # no room


def test_planner_prefers_a_kernel_friendly_size():
    """t(4) < t(3) on repacked kernels: a 4-row plan where a 3-row one would be dearer."""
    plan = plan_round(merge(0, [chain([0.7] * 10)]), XEON.verify_ms, limit=64)
    assert plan.rows == 4


def test_merge_keeps_the_higher_estimate_and_falling_probabilities():
    a = chain([0.5, 0.5])
    b = Proposal(CONTEXT << 1, np.array([0, 1, 7], dtype=np.int32), np.array([-1, 0, 1], dtype=np.int32),
                 np.array([1.0, 0.9, 0.95]), np.zeros(3, dtype=np.int32), np.ones(3))
    c = merge(0, [a, b])
    assert c.tokens.tolist() == [0, 1, 2, 7]
    assert c.prob[1] == pytest.approx(0.9) and c.sources[1] == (CONTEXT | CONTEXT << 1)
    assert c.prob[3] == pytest.approx(0.9 * 0.95)
    assert (c.prob[1:] <= c.prob[c.parents[1:]]).all()


def test_tested_nodes_follow_the_emitted_path():
    tokens = np.array([0, 5, 6, 7, 8], dtype=np.int32)  # root; 5 -> 7 -> 8; 6
    parents = np.array([-1, 0, 0, 1, 3], dtype=np.int32)
    nodes, hit = nodes_tested(tokens, parents, [5, 7, 3])
    assert nodes.tolist() == [1, 2, 3, 4] and hit.tolist() == [True, False, True, False]
    nodes, hit = nodes_tested(tokens, parents, [9])
    assert nodes.tolist() == [1, 2] and not hit.any()
    # a repeated sibling token: the first one is on the path, and the walk goes on below it
    tokens = np.array([0, 5, 5, 7], dtype=np.int32)  # root; 5 -> 7; 5
    parents = np.array([-1, 0, 0, 1], dtype=np.int32)
    nodes, hit = nodes_tested(tokens, parents, [5, 7])
    assert nodes.tolist() == [1, 2, 3] and hit.tolist() == [True, False, True]


def test_acceptance_model_learns_and_forgets():
    m = AcceptanceModel(np.array([0.5]))
    for _ in range(50):
        m.observe(np.zeros(4, dtype=np.int64), np.ones(4, dtype=bool))
    assert m.rate(0) > 0.95
    for _ in range(100):
        m.observe(np.zeros(4, dtype=np.int64), np.zeros(4, dtype=bool))
    assert m.rate(0) < 0.1


def test_cost_model_guesses_optimistically_only_where_nothing_was_measured():
    assert XEON.verify_ms(4) == 67.4 and XEON.verify_ms(64) == 437.6  # measured: as measured
    assert XEON.verify_ms(8) < XEON.verify_ms(5) + 4 * 44.0 * 0.1 + 1e-9  # unmeasured: at most the optimistic guess
    assert XEON.verify_ms(16) < float(np.interp(16, [12, 20], [196.6, 340.7]))
    assert XEON.verify_ms(80) == pytest.approx(437.6 + 16 * 4.4)


def test_replay_bound_rewards_only_what_the_sources_could_have_proposed():
    """The bench's replay bound: an answer that copies the prompt gets long verified chains; one
    the sources never saw gets plain steps only (exactly 1.0); costs pad to the cheapest size."""
    from dovetail_gguf.bench import replay_bound

    rng = np.random.default_rng(0)
    prompt = rng.integers(0, 1000, size=300).tolist()
    costs = {1: 10.0, 2: 11.0, 4: 12.0, 64: 40.0}
    copied = replay_bound(prompt, prompt[100:260], costs)
    assert copied > 3.0
    unseen = replay_bound(prompt, rng.integers(5000, 6000, size=100).tolist(), costs)
    assert unseen == pytest.approx(1.0)
    # with the prediction equal to the answer, the first tokens need no earlier match
    answer = rng.integers(2000, 3000, size=120).tolist()
    assert replay_bound(prompt, answer, costs, prediction=answer) > 3.0
    assert replay_bound(prompt, answer, costs) == pytest.approx(1.0)
