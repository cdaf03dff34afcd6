"""Tree acceptance on synthetic trees: pure functions, exact expectations, chi-square for the sampling law."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dovetail_gguf.accept import SamplingParams, accept_greedy, accept_sampling, target_distribution
from dovetail_gguf.target import tree_layout

T1 = SamplingParams(temperature=1.0)


def logits_of(p: np.ndarray) -> np.ndarray:
    """Logits whose softmax at T = 1 is ``p`` (zeros become -inf)."""
    with np.errstate(divide="ignore"):
        return np.log(np.asarray(p, dtype=np.float64)).astype(np.float32)


def chi2_critical(dof: int, z: float = 3.09) -> float:
    """Upper 0.1% point of chi-square (Wilson-Hilferty)."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def chi2(counts: np.ndarray, p: np.ndarray) -> tuple[float, int]:
    keep = p > 0
    assert counts[~keep].sum() == 0, "a token of probability 0 was emitted"
    expected = counts.sum() * p[keep]
    return float(((counts[keep] - expected) ** 2 / expected).sum()), int(keep.sum()) - 1


def test_greedy_takes_the_deepest_matching_path_even_when_it_is_not_the_first():
    # root(0) -> a(5) -> b(6);  root -> c(7) -> d(8) -> e(9)
    tokens = np.array([0, 5, 6, 7, 8, 9], np.int32)
    parents = np.array([-1, 0, 1, 0, 3, 4], np.int32)
    lay = tree_layout(tokens, parents)
    argmax_after = {0: 7, 1: 1, 2: 1, 3: 8, 4: 9, 5: 3}  # the target continues root -> 7 -> 8 -> 9, then 3
    logits = np.zeros((6, 12), np.float32)
    for node, tok in argmax_after.items():
        logits[node, tok] = 5.0
    acc = accept_greedy(lay.tokens, lay.parents, lay.ancestors, logits)
    assert acc.path.tolist() == [0, 3, 4, 5] and acc.next_token == 3


def test_greedy_with_nothing_accepted_returns_the_root_and_the_targets_token():
    lay = tree_layout(np.array([0, 5, 6], np.int32), np.array([-1, 0, 0], np.int32))
    logits = np.zeros((3, 8), np.float32)
    logits[:, 2] = 1.0
    acc = accept_greedy(lay.tokens, lay.parents, lay.ancestors, logits)
    assert acc.path.tolist() == [0] and acc.next_token == 2


def sample_first_two(tokens, parents, logits, params, n, seed=0):
    """(first emitted token, second emitted token or -1) over ``n`` rounds."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        acc = accept_sampling(tokens, parents, logits, params, rng)
        emitted = [int(tokens[i]) for i in acc.path[1:]] + [acc.next_token]
        out.append((emitted[0], emitted[1] if len(emitted) > 1 else -1))
    return np.array(out)


@pytest.mark.parametrize("children", [[1, 3], [0, 1], [2], [3, 0, 1, 2]])
def test_first_token_follows_the_target_whatever_children_are_drafted(children):
    """Children covering part of the support, most of it, little of it, or all of it."""
    p0 = np.array([0.5, 0.3, 0.15, 0.05])
    tokens = np.array([9] + children, np.int32)
    parents = np.array([-1] + [0] * len(children), np.int32)
    logits = np.stack([logits_of(p0)] + [logits_of(np.full(4, 0.25))] * len(children))
    first = sample_first_two(tokens, parents, logits, T1, 20000)[:, 0]
    stat, dof = chi2(np.bincount(first, minlength=4), p0)
    assert stat < chi2_critical(dof), stat


def test_zero_probability_child_is_never_accepted_and_the_residual_is_untouched():
    p0 = np.array([0.6, 0.0, 0.4, 0.0])
    tokens = np.array([9, 1, 3], np.int32)  # both children have probability 0
    parents = np.array([-1, 0, 0], np.int32)
    logits = np.stack([logits_of(p0), logits_of(np.full(4, 0.25)), logits_of(np.full(4, 0.25))])
    rng = np.random.default_rng(1)
    firsts = []
    for _ in range(5000):
        acc = accept_sampling(tokens, parents, logits, T1, rng)
        assert acc.path.tolist() == [0]
        firsts.append(acc.next_token)
    stat, dof = chi2(np.bincount(firsts, minlength=4), p0)
    assert stat < chi2_critical(dof)


def test_two_levels_keep_the_law_when_the_residual_branch_is_taken_often():
    """Root children cover 0.45 of the mass, so the residual is sampled ~55% of the time; below an
    accepted child the second token must follow that child's own distribution."""
    p_root = np.array([0.1, 0.35, 0.25, 0.2, 0.1])
    p_a = np.array([0.05, 0.05, 0.6, 0.2, 0.1])  # after token 1
    p_b = np.array([0.3, 0.3, 0.2, 0.1, 0.1])  # after token 0
    tokens = np.array([9, 1, 0, 2, 3], np.int32)  # root -> 1 -> {2, 3};  root -> 0
    parents = np.array([-1, 0, 0, 1, 1], np.int32)
    logits = np.stack([logits_of(p_root), logits_of(p_a), logits_of(p_b),
                       logits_of(np.full(5, 0.2)), logits_of(np.full(5, 0.2))])
    pairs = sample_first_two(tokens, parents, logits, T1, 40000, seed=2)
    stat, dof = chi2(np.bincount(pairs[:, 0], minlength=5), p_root)
    assert stat < chi2_critical(dof)
    residual = np.isin(pairs[:, 0], [2, 3, 4]).mean()
    assert 0.5 < residual < 0.6  # the branch that a residual-sampling bug would distort
    for tok, p in ((1, p_a), (0, p_b)):
        second = pairs[pairs[:, 0] == tok, 1]
        stat, dof = chi2(np.bincount(second, minlength=5), p)
        assert stat < chi2_critical(dof), (tok, stat)


def test_a_certain_child_is_always_accepted_and_top_p_cuts_the_support():
    tokens = np.array([9, 2], np.int32)
    parents = np.array([-1, 0], np.int32)
    logits = np.stack([logits_of([0.0, 0.0, 1.0, 0.0]), logits_of([0.25] * 4)])
    rng = np.random.default_rng(3)
    assert all(accept_sampling(tokens, parents, logits, T1, rng).path.tolist() == [0, 1] for _ in range(200))
    p = target_distribution(logits_of([0.5, 0.3, 0.15, 0.05]), SamplingParams(temperature=1.0, top_p=0.7))
    np.testing.assert_allclose(p, [0.5 / 0.8, 0.3 / 0.8, 0, 0])
