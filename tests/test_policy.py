"""The adaptive tree policy: pure decisions from costs and acceptance."""

from __future__ import annotations

import numpy as np
import pytest

from dovetail_gguf.policy import TreePolicy

# SmolLM2 on this machine, 2 threads: t(k) in ms, roughly (see benchmarks/verify_cost.py)
STEEP = {1: 12.0, 2: 15.0, 4: 23.0, 8: 38.0, 16: 67.0, 32: 130.0}
FLAT = {1: 55.0, 2: 60.0, 4: 61.0, 8: 110.0, 16: 187.0}  # a 7B on 16 cores (shared notes)


def policy(costs, draft_ms=0.0) -> TreePolicy:
    p = TreePolicy(max_nodes=16, max_depth=7, topk=10, costs_ms=costs, probe_every=4)
    p.draft_ms_per_depth = draft_ms
    return p


def test_good_acceptance_and_cheap_draft_choose_a_real_tree():
    p = policy(FLAT, draft_ms=1.0)
    for _ in range(20):
        p.observe(depth=7, accepted=6, draft_ms=7.0)
    depth, tokens = p.choose()
    # the fastest of all candidate trees by the policy's own model, found by brute force
    cands = [(int(d), int(t)) for d, t in zip(*p.candidates())]
    assert (depth, tokens) == max(cands, key=lambda c: float(p.speed(*c)))
    assert depth >= 4
    assert p.speed(depth, tokens) > 1 / FLAT[1] * 2  # a projected speedup of over 2x


def test_poor_acceptance_falls_back_to_plain_and_probes():
    p = policy(STEEP, draft_ms=4.0)
    for _ in range(20):
        p.observe(depth=3, accepted=0, draft_ms=12.0)
    choices = [p.choose() for _ in range(16)]
    probes = [i for i, c in enumerate(choices) if c is not None]
    assert probes == [3, 11]  # plain steps, probing after 4, then 8 more (failed probes back off)


def test_acceptance_estimate_falls_with_depth_and_tracks_observations():
    p = policy(STEEP)
    for _ in range(30):
        p.observe(depth=5, accepted=2, draft_ms=5.0)
    reach = p._reach
    assert all(reach[i] >= reach[i + 1] for i in range(len(reach) - 1))
    assert reach[1] > 0.95 and reach[2] > 0.95 and reach[3] < 0.05
    assert abs(p.draft_ms_per_depth - 1.0) < 1e-6


def test_steep_costs_prefer_small_trees():
    p = policy(STEEP, draft_ms=0.5)
    for _ in range(20):
        p.observe(depth=7, accepted=3, draft_ms=3.5)
    depth, tokens = p.choose()
    assert tokens <= 8  # big trees cost more than their extra acceptance brings


def test_a_fully_accepted_tree_makes_deeper_trees_worth_trying():
    p = policy(FLAT, draft_ms=0.5)
    for _ in range(10):
        p.observe(depth=1, accepted=1, draft_ms=0.5)
    assert p._reach[2] > 0.9  # unseen depths inherit the observed survival rate
    assert p.choose()[0] > 1


def test_a_round_that_catches_the_draft_up_does_not_set_the_draft_cost():
    p = policy(STEEP)
    p.observe(depth=1, accepted=1, draft_ms=None)  # first probe: the draft also read the whole prompt
    assert p.draft_ms_per_depth == 0.0 and p._reach[1] > 0.7  # acceptance still learned
    p.observe(depth=1, accepted=1, draft_ms=2.0)
    assert p.draft_ms_per_depth == 2.0  # the first typical round sets it
    p.observe(depth=1, accepted=1, draft_ms=None)
    assert p.draft_ms_per_depth == 2.0


def test_roofline_and_acceptance_by_depth_from_bench_records():
    from dovetail_gguf.bench import RunRecord, acceptance_by_depth, roofline

    runs = [RunRecord("dovetail", 0, 10, 1.0, rounds=4, depth_drafted=[4, 4, 2], depth_accepted=[3, 2, 1]),
            RunRecord("dovetail", 1, 10, 1.0, rounds=2, depth_drafted=[2], depth_accepted=[0])]
    assert acceptance_by_depth(runs) == [0.5, 0.5, 0.5]  # P(accepted >= d | reached d)
    linear = {k: 10.0 * k for k in range(1, 9)}  # a compute-bound CPU: k rows cost k times one (every size measured)
    assert roofline(linear, [0.9, 0.9, 0.9]) == (1.0, 0)  # nothing beats plain decoding there
    assert roofline(FLAT, []) == (1.0, 0)
    speed, depth = roofline(FLAT, [0.8, 0.75, 0.5])
    assert depth == 3 and speed == pytest.approx((1 + 0.8 + 0.75 + 0.5) * 55.0 / 61.0)
    assert roofline(FLAT, [0.5, 0.9]) == roofline(FLAT, [0.5, 0.5])  # a deeper level never accepts more


def test_where_not_even_a_perfect_draft_could_pay_probes_are_rare():
    linear = {k: 10.0 * k for k in (1, 2, 4, 8, 16)}  # k rows cost k decodes: a compute-bound CPU
    p = policy(linear, draft_ms=5.0)
    assert p.perfect_speed() < 1 / linear[1]
    probes = [i for i in range(140) if p.choose() is not None]
    assert probes == [67, 131]  # not after 4 plain steps, only at the longest gap (16 x 4), to re-measure
    p.draft_ms_per_depth = 0.0  # a free draft where extra rows cost little would pay
    p.costs_ms.update({2: 10.5, 4: 11.0})
    p.costs_changed(2)
    assert p.perfect_speed() > 1 / linear[1]


def test_where_a_perfect_draft_would_gain_little_probes_are_rare_too():
    """SmolLM2 on a 2-core Xeon: rows cost 1.6 t(1) and more, the draft 5 ms a level. A draft
    accepted whole would be about 10% faster than plain decoding; a real one, and the probes that
    catch it up, would be slower: probes wait for the longest gap."""
    from dovetail_gguf.policy import PROBE_MIN_GAIN

    measured = {1: 15.0, 2: 24.0, 3: 33.0, 4: 40.0, 8: 70.0, 16: 120.0, 17: 126.0}
    costs = {k: float(np.interp(k, list(measured), list(measured.values()))) for k in range(1, 18)}  # every size timed
    p = policy(costs, draft_ms=5.0)
    p._reach[1:] = 0.3  # acceptance measured low: no tree is chosen
    gain = p.perfect_speed() * costs[1]
    assert 1.0 < gain < PROBE_MIN_GAIN
    probes = [i for i in range(140) if p.choose() is not None]
    assert probes == [67, 131]
