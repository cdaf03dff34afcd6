"""Tree acceptance on synthetic trees: pure functions, exact expectations, chi-square for the sampling law."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dovetail_gguf.accept import Sampler, SamplingParams, accept_greedy
from law import target_distribution
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


def sampler(params: SamplingParams, seed: int) -> Sampler:
    return Sampler(SamplingParams(**{**params.__dict__, "seed": seed}))


def sample_first_two(tokens, parents, logits, params, n, seed=0):
    """(first emitted token, second emitted token or -1) over ``n`` rounds."""
    s = sampler(params, seed)
    out = []
    for _ in range(n):
        acc = s.walk(tokens, parents, logits)
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
    s = sampler(T1, 1)
    firsts = []
    for _ in range(5000):
        acc = s.walk(tokens, parents, logits)
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
    s = sampler(T1, 3)
    assert all(s.walk(tokens, parents, logits).path.tolist() == [0, 1] for _ in range(200))
    p = target_distribution(logits_of([0.5, 0.3, 0.15, 0.05]), SamplingParams(temperature=1.0, top_p=0.7))
    np.testing.assert_allclose(p, [0.5 / 0.8, 0.3 / 0.8, 0, 0])


# ---------------------------------------------------------------------- llama.cpp's chain
def reference_distribution(logits: np.ndarray, params: SamplingParams, recent=()) -> np.ndarray:
    """llama.cpp's default chain written plainly over the whole (sorted) vocabulary: logit bias,
    penalties, top-k, top-p and min-p at temperature 1, then temperature."""
    x = np.asarray(logits, dtype=np.float64).copy()
    for tok, b in params.logit_bias.items():
        x[tok] += b
    window = list(recent)[-params.repeat_last_n:] if params.repeat_last_n > 0 else []
    for tok in set(window):
        c = window.count(tok)
        x[tok] = x[tok] * params.repeat_penalty if x[tok] <= 0 else x[tok] / params.repeat_penalty
        x[tok] -= c * params.frequency_penalty + params.presence_penalty
    order = np.argsort(-x, kind="stable")
    keep = order[: params.top_k] if params.top_k else order
    p = np.exp(x[keep] - x[keep].max())
    p /= p.sum()
    if params.top_p < 1:
        n_keep = int(np.searchsorted(np.cumsum(p), params.top_p)) + 1
        keep, p = keep[:n_keep], p[:n_keep] / p[:n_keep].sum()
    if params.min_p > 0:
        ok = p >= params.min_p * p.max()
        keep = keep[ok]
    out = np.zeros(x.shape[0])
    out[keep] = np.exp((x[keep] - x[keep].max()) / params.temperature)
    return out / out.sum()


CHAINS = [
    dict(temperature=0.7),
    dict(temperature=0.8, top_k=40, top_p=0.95),
    dict(temperature=1.3, top_p=0.5),
    dict(temperature=1.0, top_p=0.999),  # a nucleus wider than the first head: it widens
    dict(temperature=0.5, min_p=0.05),
    dict(temperature=1.0, top_k=50, min_p=0.02, top_p=0.9),
    dict(temperature=1.0, repeat_penalty=1.5, presence_penalty=0.5, frequency_penalty=0.3, repeat_last_n=8),
    dict(temperature=0.9, logit_bias={3: 5.0, 7: -100.0}, top_k=20),
]


@pytest.mark.parametrize("settings", CHAINS)
def test_the_sampler_applies_llama_cpps_chain_in_its_order(settings):
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal(5000) * 3).astype(np.float32)
    logits[7] = logits.max() + 1  # the bias must push this one out
    recent = rng.integers(0, 20, size=30).tolist()
    params = SamplingParams(**settings)
    np.testing.assert_allclose(target_distribution(logits, params, recent),
                               reference_distribution(logits, params, recent), rtol=1e-5, atol=1e-9)


def test_temperature_comes_after_the_cuts():
    """llama.cpp cuts top-p at temperature 1 and applies the temperature to what is left: at a high
    temperature the nucleus stays the two likeliest tokens."""
    logits = logits_of([0.5, 0.3, 0.15, 0.05])
    p = target_distribution(logits, SamplingParams(temperature=2.0, top_p=0.7))
    assert (p > 0).tolist() == [True, True, False, False]


def test_a_walk_draws_what_plain_sampling_draws_with_the_same_seed():
    """One uniform per emitted token: a chain holding plain sampling's own choices is accepted
    whole, and gives the same tokens as step-by-step sampling with the same seed."""
    rng = np.random.default_rng(5)
    rows = (rng.standard_normal((6, 50)) * 2).astype(np.float32)
    params = SamplingParams(temperature=1.0, top_p=0.9, presence_penalty=1.0, seed=11)
    plain = Sampler(params, history=[1, 2, 3])
    chosen = []
    for row in rows:
        chosen.append(plain.choose(row))
        plain.accept(chosen[-1:])
    spec = Sampler(params, history=[1, 2, 3])
    tokens = np.array([99, *chosen[:-1]], np.int32)  # root, then the chain of plain's choices
    acc = spec.walk(tokens, np.arange(-1, 5, dtype=np.int32), rows)
    assert acc.path.tolist() == list(range(6)) and acc.next_token == chosen[-1]


def test_penalties_follow_each_nodes_own_ancestors():
    """Greedy with a frequency penalty: after the child with token 4 the penalty must see that 4
    (its ancestor, not yet committed), so the target's choice there is 6, not 4 again."""
    rows = np.zeros((3, 10), np.float32)
    rows[0, 4] = 3.0  # at the root: 4
    rows[1, 4], rows[1, 6] = 3.0, 2.5  # below 4: 4 again, unless 4 is penalised
    tokens = np.array([9, 4, 4], np.int32)  # root -> 4 -> 4
    parents = np.array([-1, 0, 1], np.int32)
    acc = Sampler(SamplingParams(frequency_penalty=1.0)).walk(tokens, parents, rows)
    assert acc.path.tolist() == [0, 1] and acc.next_token == 6
    acc = Sampler(SamplingParams()).walk(tokens, parents, rows)  # no penalty: the chain is accepted
    assert acc.path.tolist() == [0, 1, 2]


def test_penalised_second_tokens_keep_their_law_below_an_accepted_child():
    """Sampling with penalties over a two-level tree: the second token follows the law computed with
    the first one in its context (chi-square, as above)."""
    p_root = np.array([0.1, 0.5, 0.2, 0.2])
    p_a = np.array([0.1, 0.6, 0.2, 0.1])  # after token 1, before penalties
    params = SamplingParams(temperature=1.0, repeat_penalty=2.0, presence_penalty=0.5, seed=4)
    tokens = np.array([9, 1, 0], np.int32)
    parents = np.array([-1, 0, 0], np.int32)
    logits = np.stack([logits_of(p_root), logits_of(p_a), logits_of(np.full(4, 0.25))])
    pairs = sample_first_two(tokens, parents, logits, params, 30000, seed=4)
    expected = target_distribution(logits[1], params, [1])
    assert not np.allclose(expected, p_a, atol=0.05)  # the penalty changes this law
    second = pairs[pairs[:, 0] == 1, 1]
    stat, dof = chi2(np.bincount(second, minlength=4), expected)
    assert stat < chi2_critical(dof), stat


def test_logit_bias_keeps_a_token_out_of_greedy_choice():
    row = logits_of([0.7, 0.2, 0.1])
    assert Sampler(SamplingParams()).choose(row) == 0
    assert Sampler(SamplingParams(logit_bias={0: -100.0})).choose(row) == 1


@pytest.mark.parametrize("bad", [dict(min_p=1.5), dict(repeat_penalty=0.0), dict(repeat_last_n=-2),
                                 dict(presence_penalty=3.0), dict(logit_bias={5: 101.0})])
def test_bad_sampling_settings_are_refused(bad):
    """The sampler's settings come from GenerateOptions, which refuses them when built."""
    from dovetail_gguf.errors import InvalidArgumentError
    from dovetail_gguf.options import GenerateOptions

    with pytest.raises(InvalidArgumentError, match=next(iter(bad))):
        GenerateOptions(**bad)